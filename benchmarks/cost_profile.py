"""Measure a step-time cost profile of a model on this machine (benchmarks/profiles/NAME.json).

Runs bursts of requests through the AsyncEngine as it serves (worker processes, async
scheduling, every request streamed to a caller) at several batch sizes and image sizes, and
fits the cost model (engine/core/cost_model.py) on every batch's wall time as the engine
measures it (engine-side work included), so that the simulator's clock runs at the engine's
pace. The engine's startup profile (EngineConfig.cost_profile="measure") does the same with
fewer batches; this one is for the simulator and for loading at start.

Usage: python benchmarks/cost_profile.py --model small-qwen-image --out benchmarks/profiles/small-qwen-image-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
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

    from engine import AsyncEngine, SamplingParams
    from engine.core.cost_model import CostModel
    from pipelines.memory_estimate import read_vae_config, vae_stages

    prompt = {"prompt": "a lighthouse on a cliff at dusk", "negative_prompt": "blurry"}

    async def burst(engine, params: list) -> None:
        async def one(p):
            async for _ in engine.generate(prompt, p):
                pass

        await asyncio.gather(*(one(p) for p in params))

    model = CostModel(window=100_000, refit_every=1 << 30)
    engine = AsyncEngine(model=args.model, max_num_seqs=max(args.batch_sizes))
    try:
        asyncio.run(burst(engine, [SamplingParams(num_inference_steps=2, seed=0, output_type="np")]))  # warm-up
        core = engine.core
        core.scheduler.policy.cost_model = model  # from here on, every batch's wall time lands in `model`
        for _ in range(args.repeats):
            for side in args.sides:
                for n in args.batch_sizes:
                    params = [
                        SamplingParams(
                            num_inference_steps=args.steps, seed=i, height=side, width=side, output_type="np"
                        )
                        for i in range(n)
                    ]
                    asyncio.run(burst(engine, params))
        info = core.model_info
        vae_scale = 2 ** (len(vae_stages(read_vae_config(info.path))) - 1)
        patch = int(info.transformer_config.get("patch_size", 2))
        text_tokens = len(prompt["prompt"]) // 4 + 1
    finally:
        engine.shutdown()
    model.refit()
    report = model.to_json(
        name=args.model,
        source=(
            f"measured on this machine ({platform.processor() or platform.machine()}, {args.threads} torch thread(s), "
            f"CPU, float32) by benchmarks/cost_profile.py on {datetime.date.today()}: wall time of {model.observed} "
            "step batches served by AsyncEngine (worker processes, async scheduling, every request streamed)"
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
