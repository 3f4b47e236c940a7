"""Measure a step-time cost profile of a model on this machine (benchmarks/profiles/NAME.json).

Runs bursts of requests through the real engine (worker processes, async scheduling, as it
serves) at several batch sizes and image sizes, fits the cost model (engine/core/cost_model.py)
on every batch's measured worker time, and adds the engine's own time per batch (the worker's
measured idle wait between batches) to the per-batch overhead, so that the simulator's clock
runs at the engine's pace. The engine's startup profile (EngineConfig.cost_profile="measure")
does the same with fewer batches; this one is for the simulator and for loading at start.

Usage: python benchmarks/cost_profile.py --model small-qwen-image --out benchmarks/profiles/small-qwen-image-cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small-qwen-image")
    parser.add_argument("--out", default="benchmarks/profiles/small-qwen-image-cpu.json")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 128], help="square image sizes to profile")
    parser.add_argument("--steps", type=int, default=8, help="steps per profiling request")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from engine import Omni, SamplingParams
    from engine.core.cost_model import CostModel
    from pipelines.memory_estimate import read_vae_config, vae_stages

    model = CostModel(window=100_000, refit_every=1 << 30)
    with Omni(args.model, max_num_seqs=max(args.batch_sizes)) as omni:
        core = omni.core
        prompt = {"prompt": "a lighthouse on a cliff at dusk", "negative_prompt": "blurry"}
        warm = SamplingParams(num_inference_steps=2, seed=0, output_type="np")
        omni.generate([prompt], warm, use_tqdm=False)
        core.scheduler.policy.cost_model = model
        idle0, gaps0 = core.stats.worker_idle_s, core.stats.worker_idle_gaps
        for _ in range(args.repeats):
            for side in args.sides:
                for n in args.batch_sizes:
                    params = [
                        SamplingParams(
                            num_inference_steps=args.steps, seed=i, height=side, width=side, output_type="np"
                        )
                        for i in range(n)
                    ]
                    omni.generate([prompt] * n, params, use_tqdm=False)
        idle = (core.stats.worker_idle_s - idle0) / max(1, core.stats.worker_idle_gaps - gaps0)
        info = core.model_info
        vae_scale = 2 ** (len(vae_stages(read_vae_config(info.path))) - 1)
        patch = int(info.transformer_config.get("patch_size", 2))
        text_tokens = len(prompt["prompt"]) // 4 + 1
    model.refit()
    model.coef[0] += idle
    report = model.to_json(
        name=args.model,
        source=(
            f"measured on this machine ({platform.processor() or platform.machine()}, {args.threads} torch thread(s), "
            f"CPU, float32) by benchmarks/cost_profile.py on {datetime.date.today()}: "
            f"{model.observed} batches; engine time per batch (worker idle) {idle * 1e3:.2f} ms added to 'batch'"
        ),
        command="python benchmarks/cost_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        geometry={"vae_scale": vae_scale, "patch": patch, "rows": 2, "text_tokens": text_tokens},
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    import json

    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["coefficients"], indent=2))
    return report


if __name__ == "__main__":
    main()
