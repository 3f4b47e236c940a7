"""README's digit grid: every digit in several settings, all generated in one co-batched run.

Each row is one (seed, steps, CFG scale) setting, each column one digit; all requests go to one
engine at once with fewer batch slots than requests, so requests with different step counts and
CFG scales share step batches and later ones join as earlier ones finish. Every cell is labelled
by the digit classifier (`benchmarks/quality.py` measures that at scale).

Usage: python benchmarks/digits_grid.py [--out docs/digits_grid.png] [--scale 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# (seed, num_inference_steps, true_cfg_scale or None for no CFG) per row.
ROWS = ((0, 20, None), (1, 8, None), (2, 30, None), (3, 20, 2.0), (4, 12, 3.0), (5, 28, 4.0))


def generate_grid(model: str, max_num_seqs: int) -> tuple[np.ndarray, list[dict]]:
    """Images (rows, 10, H, W, 3) in [0, 1] and one record per cell."""
    from engine import Omni, SamplingParams
    from pipelines.presets.digits_data import prompt_for

    prompts, params, cells = [], [], []
    for seed, steps, cfg in ROWS:
        for digit in range(10):
            prompts.append({"prompt": prompt_for(digit), "negative_prompt": "" if cfg else None})
            params.append(SamplingParams(num_inference_steps=steps, true_cfg_scale=cfg, seed=seed, output_type="np"))
            cells.append({"digit": digit, "seed": seed, "steps": steps, "cfg": cfg})
    with Omni(model=model, max_num_seqs=max_num_seqs) as omni:
        outputs = omni.generate(prompts, params, use_tqdm=False)
    for output in outputs:
        if output.error is not None:
            raise RuntimeError(output.error)
    images = np.concatenate([o.images for o in outputs])
    return images.reshape(len(ROWS), 10, *images.shape[1:]), cells


def render(images: np.ndarray, scale: int, gap: int = 2) -> np.ndarray:
    """Tile (rows, cols, H, W, 3) into one uint8 picture, each image enlarged `scale` times."""
    rows, cols, h, w, _ = images.shape
    big = images.repeat(scale, axis=2).repeat(scale, axis=3)
    h, w = h * scale, w * scale
    canvas = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 0.6, dtype=np.float32)
    for r in range(rows):
        for c in range(cols):
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            canvas[y : y + h, x : x + w] = big[r, c]
    return (canvas * 255).round().astype(np.uint8)


def main(argv=None) -> dict:
    from PIL import Image

    from pipelines.presets.digit_classifier import DigitClassifier

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-qwen-image")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="fewer than the 60 requests, so they join late")
    parser.add_argument("--scale", type=int, default=3)
    parser.add_argument("--out", default="docs/digits_grid.png")
    args = parser.parse_args(argv)
    images, cells = generate_grid(args.model, args.max_num_seqs)
    predicted = DigitClassifier().predict(images.reshape(-1, *images.shape[2:]))
    correct = int((predicted == np.array([c["digit"] for c in cells])).sum())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render(images, args.scale)).save(args.out)
    for row, (seed, steps, cfg) in enumerate(ROWS):
        labels = " ".join(str(p) for p in predicted[row * 10 : (row + 1) * 10])
        print(f"row {row}: seed {seed}, {steps} steps, CFG {cfg or 'none'}: classified as {labels}")
    print(f"wrote {args.out}: {correct}/{len(cells)} classified as the named digit")
    return {"correct": correct, "cells": len(cells)}


if __name__ == "__main__":
    main()
