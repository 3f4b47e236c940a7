"""Measure a step-time cost profile of a model on this machine (benchmarks/profiles/NAME.json).

Runs bursts of requests through the AsyncEngine as it serves (worker processes, async
scheduling, every request streamed to a caller) and fits the cost model
(engine/core/cost_model.py) on every batch's wall time as the engine measures it (engine-side
work included), so that the simulator's clock runs at the engine's pace. Bursts of one size at
several batch sizes separate the per-row from the per-token terms; mixed bursts (sizes
alternating, step counts staggered so that requests finish in different batches) separate the
per-forward and per-decode-call costs from the per-batch one; a serving stream (requests of mixed
sizes and steps arriving one by one) adds the batches of serving, where requests start and decode
alone. The engine's startup profile
(EngineConfig.cost_profile="measure") does less of the same; this one is for the simulator and
for loading at start.

Then it times diffusers' own pipeline calls on the same model (batches of equal requests, two
step counts) and fits the same features to them (`diffusers` section), for the simulator's
diffusers baselines: the pipeline runs the CFG branches as separate forwards and encodes prompts
in the call, so its costs are not the engine's.

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
    parser.add_argument("--no-diffusers", action="store_true", help="skip timing diffusers' pipeline")
    parser.add_argument("--stream", type=int, default=48, help="requests of the serving stream after the bursts")
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
            for n in args.batch_sizes:
                bursts = [[(side, args.steps)] * n for side in args.sides]
                if n > 1:  # sizes alternate, steps staggered: mixed forwards, decodes in different batches
                    bursts.append([(args.sides[i % len(args.sides)], args.steps + 3 * (i // 2 % 3)) for i in range(n)])
                for plan in bursts:
                    params = [
                        SamplingParams(num_inference_steps=steps, seed=i, height=side, width=side, output_type="np")
                        for i, (side, steps) in enumerate(plan)
                    ]
                    asyncio.run(burst(engine, params))
        info = core.model_info
        vae_scale = 2 ** (len(vae_stages(read_vae_config(info.path))) - 1)
        patch = int(info.transformer_config.get("patch_size", 2))
        serve_stream(engine, model, args, burst, vae_scale * patch)
        text_tokens = len(prompt["prompt"]) // 4 + 1
    finally:
        engine.shutdown()
    geometry = {"vae_scale": vae_scale, "patch": patch, "rows": 2, "text_tokens": text_tokens}
    diffusers_model = None if args.no_diffusers else profile_diffusers(info, args, geometry)
    model.refit()
    report = model.to_json(
        name=args.model,
        source=(
            f"measured on this machine ({platform.processor() or platform.machine()}, {args.threads} torch thread(s), "
            f"CPU, float32) by benchmarks/cost_profile.py on {datetime.date.today()}: wall time of {model.observed} "
            "step batches served by AsyncEngine (worker processes, async scheduling, every request streamed)"
        ),
        command="python benchmarks/cost_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        geometry=geometry,
    )
    if diffusers_model is not None:
        report["diffusers"] = diffusers_model.to_json(
            source="timed calls of the model's diffusers pipeline on this machine, batches of equal requests"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    import json

    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["coefficients"], indent=2))
    return report


def serve_stream(engine, model, args, burst, scale: int) -> None:
    """Requests of mixed sizes and step counts arriving one by one (Poisson, one request's
    service time apart on average, as the bursts' fit predicts it): the batches of serving, where
    requests start, run beside others and finish (decode alone) at different times, which bursts
    that start and end together under-represent."""
    import asyncio
    import random

    from engine import SamplingParams
    from engine.core.cost_model import RequestShape

    if not args.stream:
        return
    model.refit()
    rng = random.Random(0)
    plan = [
        (rng.choice(args.sides), rng.choice([args.steps // 2, args.steps, 2 * args.steps])) for _ in range(args.stream)
    ]
    alone = [model.run_alone_time(RequestShape(2, (side // scale) ** 2, 8), steps) for side, steps in plan]
    mean = sum(alone) / len(alone)

    async def stream():
        gaps = [rng.expovariate(1.0 / mean) for _ in plan]

        async def one(i, side, steps):
            await asyncio.sleep(sum(gaps[:i]))
            params = SamplingParams(num_inference_steps=steps, seed=i, height=side, width=side, output_type="np")
            await burst(engine, [params])

        await asyncio.gather(*(one(i, side, steps) for i, (side, steps) in enumerate(plan)))

    asyncio.run(stream())


def profile_diffusers(info, args, geometry: dict):
    """The cost model of diffusers' pipeline calls: each call's time against the sum of its
    batches' features (benchmarks/simulator.call_features)."""
    import inspect

    import diffusers

    from benchmarks import throughput
    from benchmarks.simulator import call_features
    from engine.core.cost_model import CostModel, RequestShape

    takes = inspect.signature(info.pipeline_type.__call__).parameters
    throughput.CFG_KEY = "true_cfg_scale" if "true_cfg_scale" in takes else "guidance_scale"
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(info.path))
    pipe.set_progress_bar_config(disable=True)
    scale = geometry["vae_scale"] * geometry["patch"]
    model = CostModel(window=100_000, refit_every=1 << 30)

    def call(side: int, n: int, steps: int) -> float:
        prompts, negatives = throughput.PROMPTS, throughput.NEGATIVES
        specs = [throughput.Spec(i, 0.0, steps, prompts[i % len(prompts)], negatives[i % 3], i) for i in range(n)]
        return throughput._call(pipe, specs, (side, side))

    call(args.sides[0], 1, 2)  # warm-up
    for _ in range(args.repeats):
        for side in args.sides:
            tokens = (side // scale) ** 2
            shape = RequestShape(geometry["rows"], tokens, geometry["text_tokens"], forward_key=(side, side))
            for n in args.batch_sizes:
                for steps in (args.steps // 2, args.steps):
                    model.observe(call_features([shape] * n, steps), call(side, n, steps))
    model.refit()
    return model


if __name__ == "__main__":
    main()
