"""The handwritten digits the `digits-qwen-image` preset is trained on, and the prompts that name them.

scikit-learn ships 1,797 8x8 digits inside its package (`load_digits`, no download), the one
real image dataset reachable here. The preset draws them at `SIDE`x`SIDE`, dark ink on white
paper, upscaled bilinearly; `to_8x8` undoes that (area average back to 8x8 on the dataset's
0..16 ink scale), so a classifier fitted on the original digits can score generated images.

scikit-learn is imported only when the data is asked for: the preset itself loads committed
weights and needs none of this.
"""

from __future__ import annotations

import numpy as np

# Pixel size of the images the preset draws (two 16-pixel Qwen-Image tokens a side).
SIDE = 32

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Phrasings the transformer is trained on; `{word}` is the digit's name, `{d}` its numeral.
PHRASINGS = (
    "a handwritten digit {word}",
    "the number {d}",
    "{d}",
    "the digit {word}",
    "a handwritten {d}",
    "{word}",
)

# Prompts that stand for "no prompt": the text dropped in training, the negative prompt for CFG.
UNCONDITIONAL = ("", " ")


def prompt_for(digit: int) -> str:
    """The canonical prompt for `digit`, as README's first command writes it."""
    return PHRASINGS[0].format(word=WORDS[digit], d=digit)


def prompts_for(digit: int) -> list[str]:
    return [p.format(word=WORDS[digit], d=digit) for p in PHRASINGS]


def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) float32 ink in 0..16, labels (N,) int64) of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def to_pixels(digits_8x8: np.ndarray):
    """8x8 ink (0..16) -> (N, 3, SIDE, SIDE) torch float32 in [-1, 1]: white paper (+1), black ink (-1)."""
    import torch

    ink = torch.from_numpy(np.asarray(digits_8x8, dtype=np.float32) / 16.0)[:, None]
    big = torch.nn.functional.interpolate(ink, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return (1.0 - 2.0 * big.clamp(0.0, 1.0)).expand(-1, 3, -1, -1).contiguous()


def to_8x8(images: np.ndarray) -> np.ndarray:
    """Generated images (N, H, W, 3) in [0, 1] (paper 1, ink 0), H and W multiples of 8 ->
    (N, 64) on the dataset's 0..16 ink scale, by averaging 8x8 blocks of equal area."""
    images = np.asarray(images, dtype=np.float32)
    n, h, w, _ = images.shape
    ink = 1.0 - images.mean(axis=-1)
    blocks = ink.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return (16.0 * blocks).reshape(n, 64)
