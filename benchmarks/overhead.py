"""Per-step engine overhead: stepweave (worker process and in-process) against diffusers itself.

One request alone, so every system does the same work per step. Per-step time is the slope
between a short and a long run (prompt encoding and VAE decoding cancel out); the systems take
turns, round after round, and each figure is the median round. For the worker process it also
reports how long the worker sat idle between consecutive steps of the running request, with and
without async scheduling (the engine sending step k+1 before step k's results are back).
Usage: python benchmarks/overhead.py [--models tiny-qwen-image small-qwen-image]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _slope_sample(run, short: int, long: int) -> float:
    """Seconds per step from one short and one long run: (t(long) - t(short)) / (long - short)."""
    t0 = time.perf_counter()
    run(short)
    t1 = time.perf_counter()
    run(long)
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / (long - short)


def measure(model: str, short: int, long: int, repeats: int) -> dict:
    """Every system is loaded at once and sampled in turn, round after round, so a burst of load
    from elsewhere on a shared machine hits all of them alike; each figure is the median round."""
    import contextlib

    import diffusers

    from engine import Omni, SamplingParams
    from pipelines.model_info import ModelInfo

    info = ModelInfo.load(model)
    size = dict(height=info.default_height, width=info.default_width)
    prompt = "a lighthouse on a cliff at sunset"
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(info.path))
    pipe.set_progress_bar_config(disable=True)

    def direct(steps):
        pipe(
            prompt=prompt,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **size,
        )

    def served(omni):
        def run(steps):
            params = SamplingParams(num_inference_steps=steps, seed=0, output_type="np", **size)
            (out,) = omni.generate([prompt], params, use_tqdm=False)
            assert out.error is None, out.error

        return run

    layouts = {
        "inproc": {"executor": "inproc"},
        "mp": {"executor": "mp", "async_scheduling": True},
        "mp_sync": {"executor": "mp", "async_scheduling": False},
    }
    with contextlib.ExitStack() as stack:
        engines = {name: stack.enter_context(Omni(str(info.path), **kwargs)) for name, kwargs in layouts.items()}
        systems = {"direct": direct, **{name: served(omni) for name, omni in engines.items()}}
        for run in systems.values():
            run(short)  # warm-up
        for omni in engines.values():
            omni.core.stats = type(omni.core.stats)()  # count idle gaps of the measured runs only
        samples = {name: [] for name in systems}
        for _ in range(repeats):
            for name, run in systems.items():
                samples[name].append(_slope_sample(run, short, long))
        stats = {name: omni.core.stats for name, omni in engines.items()}

    direct_step = statistics.median(samples["direct"])
    result = {"model": model, "direct_step_us": direct_step * 1e6, "samples_us": {}}
    for name, values in samples.items():
        result["samples_us"][name] = [v * 1e6 for v in values]
        if name == "direct":
            continue
        per_step = statistics.median(values)
        result[f"{name}_step_us"] = per_step * 1e6
        result[f"{name}_overhead_us"] = (per_step - direct_step) * 1e6
        result[f"{name}_ratio"] = per_step / direct_step
        if name.startswith("mp"):
            # Only gaps between consecutive batches of a running request: the pause between
            # one request's end and the next one's start is the benchmark's, not the engine's.
            gaps = stats[name].worker_idle_gaps
            result[f"{name}_worker_idle_per_step_us"] = stats[name].worker_idle_s / max(gaps, 1) * 1e6
            result[f"{name}_worker_idle_gaps"] = gaps
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-qwen-image", "small-qwen-image"])
    parser.add_argument("--short", type=int, default=4)
    parser.add_argument("--long", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="benchmarks/results/overhead.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(m, args.short, args.long, args.repeats) for m in args.models]
    print(
        "| model | diffusers µs/step | inproc µs/step (overhead) | mp µs/step (overhead) "
        "| mp worker idle µs/step async / sync |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['direct_step_us']:.0f} | {r['inproc_step_us']:.0f} ({r['inproc_overhead_us']:+.0f}) "
            f"| {r['mp_step_us']:.0f} ({r['mp_overhead_us']:+.0f}) "
            f"| {r['mp_worker_idle_per_step_us']:.0f} / {r['mp_sync_worker_idle_per_step_us']:.0f} |"
        )
    report = {"results": rows, "config": vars(args)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
