"""Serving throughput and latency: stepweave against diffusers baselines on one open-loop workload.

Requests arrive as a Poisson process with a mix of step counts, all with true CFG and a negative
prompt. The same requests, on the same weights, are served by:
- `diffusers-sequential`: diffusers' own pipeline, one request at a time in arrival order;
- `diffusers-static`: the diffusers pipeline on batches of waiting requests that share their
  parameters (up to the same batch size), each batch run to completion;
- `stepweave-N`: the AsyncEngine with max_num_seqs=N, requests submitted at their arrival times;
- `stepweave-adapter-N` (with --adapter): the same through the generic diffusers adapter, for a
  model that also has a hand-split family (models without one always run through the adapter).
The baselines run on a simulated clock (a server that is idle jumps to the next arrival; compute
durations are real), which gives them every benefit of the doubt. The CFG scale goes to the
pipeline's `true_cfg_scale` where it has one (Qwen-Image, FLUX), else to `guidance_scale` (SD3).
A pipeline that takes an input image (image-to-image, e.g. --model tiny-flux-img2img) gets one
seeded picture of the output's size in every request, at the pipeline's default strength.
Usage: python benchmarks/throughput.py [--model small-qwen-image] [--max-num-seqs 1 4 8 16] [--rate R] [--adapter]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.plotting import headless_pyplot  # noqa: E402

PROMPTS = [
    "a lighthouse on a cliff at dusk",
    "an old map of a harbour town",
    "a red fox in fresh snow",
    "a glass teapot on a wooden table",
    "a steam train crossing a stone bridge",
    "a field of sunflowers under a storm",
]
NEGATIVES = ["blurry", "low quality, jpeg artifacts", "dark, noisy"]
CFG_SCALE = 4.0
CFG_KEY = "true_cfg_scale"  # set in main() from the pipeline's signature
# The input image of every request, for pipelines that take one (image-to-image); set in main().
INPUT_IMAGE = None


@dataclass
class Spec:
    index: int
    arrival: float
    steps: int
    prompt: str
    negative: str
    seed: int


@dataclass
class Done:
    arrival: float
    start: float
    finish: float
    steps: int


def make_workload(num: int, rate: float, steps_mix: list[int], seed: int) -> list[Spec]:
    rng = random.Random(seed)
    clock, specs = 0.0, []
    for i in range(num):
        clock += rng.expovariate(rate)
        specs.append(Spec(i, clock, rng.choice(steps_mix), rng.choice(PROMPTS), rng.choice(NEGATIVES), seed * 1000 + i))
    return specs


# -- diffusers baselines ---------------------------------------------------------------------
def _call(pipe, specs: list[Spec], size: tuple[int, int]) -> float:
    t0 = time.perf_counter()
    pipe(
        prompt=[s.prompt for s in specs],
        negative_prompt=[s.negative for s in specs],
        **{CFG_KEY: CFG_SCALE},
        num_inference_steps=specs[0].steps,
        height=size[0],
        width=size[1],
        generator=[torch.Generator().manual_seed(s.seed) for s in specs],
        output_type="np",
        **({} if INPUT_IMAGE is None else {"image": [INPUT_IMAGE] * len(specs)}),
    )
    return time.perf_counter() - t0


def serve_diffusers(pipe, specs: list[Spec], size, max_batch: int) -> tuple[list[Done], list[int]]:
    """max_batch=1 is sequential serving; otherwise static batches of equal parameters."""
    pending, done, batches, clock = list(specs), [], [], 0.0
    while pending:
        clock = max(clock, pending[0].arrival)
        waiting = [s for s in pending if s.arrival <= clock]
        head = waiting[0]
        batch = [s for s in waiting if s.steps == head.steps][:max_batch]
        duration = _call(pipe, batch, size)
        for s in batch:
            done.append(Done(s.arrival, clock, clock + duration, s.steps))
            pending.remove(s)
        batches.append(len(batch))
        clock += duration
    return done, batches


# -- stepweave ---------------------------------------------------------------------------------
async def _serve_stepweave(engine, specs: list[Spec], size) -> list[Done]:
    from engine import SamplingParams

    start = time.perf_counter()

    async def one(spec: Spec) -> Done:
        await asyncio.sleep(max(0.0, spec.arrival - (time.perf_counter() - start)))
        arrival = time.perf_counter() - start
        params = SamplingParams(
            num_inference_steps=spec.steps,
            **{CFG_KEY: CFG_SCALE},
            seed=spec.seed,
            height=size[0],
            width=size[1],
            output_type="np",
        )
        final = None
        prompt = {"prompt": spec.prompt, "negative_prompt": spec.negative}
        if INPUT_IMAGE is not None:
            prompt["image"] = INPUT_IMAGE
        async for final in engine.generate(prompt, params):
            pass
        if final.error:
            raise RuntimeError(final.error)
        finish = time.perf_counter() - start
        # Latency counts from the scheduled arrival, as for the baselines: a late submission
        # (the event loop busy) is the server's delay, not the client's.
        return Done(spec.arrival, arrival + (final.metrics.queue_time_s or 0.0), finish, spec.steps)

    return await asyncio.gather(*(one(s) for s in specs))


def serve_stepweave(
    model: str, specs: list[Spec], size, max_num_seqs: int, executor: str, adapter: bool = False, **options
) -> tuple[list[Done], float]:
    from engine import AsyncEngine

    engine = AsyncEngine(
        model=model, max_num_seqs=max_num_seqs, executor=executor, diffusers_adapter=adapter, **options
    )
    try:
        warm = [Spec(0, 0.0, 2, PROMPTS[0], NEGATIVES[0], 0)]
        asyncio.run(_serve_stepweave(engine, warm, size))
        before = (engine.core.stats.rows, engine.core.stats.batches)
        done = asyncio.run(_serve_stepweave(engine, specs, size))
        rows, batches = engine.core.stats.rows - before[0], engine.core.stats.batches - before[1]
    finally:
        engine.shutdown()
    return done, rows / max(batches, 1)


# -- the limit -----------------------------------------------------------------------------------
def diffusers_forward_pattern(pipe, size, steps: int = 3) -> tuple[float, int]:
    """How diffusers' own pipeline runs one request's step: transformer calls per step and rows
    per call (Qwen-Image's true CFG: two calls of one row; a pipeline batching CFG: one of two)."""
    calls, rows = [], []

    def count(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        calls.append(1)
        rows.append(int(hidden.shape[0]))

    handle = pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)
    try:
        _call(pipe, [Spec(0, 0.0, steps, PROMPTS[0], NEGATIVES[0], 0)], size)
    finally:
        handle.remove()
    return len(calls) / steps, max(rows)


def batch_compute_limit(model: str, pipe, size, batch_sizes: list[int], cost: dict) -> dict:
    """An upper bound on the speedup over diffusers-sequential that batching forwards can give on
    this machine: diffusers' own transformer work per request-step (measured calls of measured
    rows) over the cheapest per-request cost of one forward holding every CFG row of N requests,
    for each N served. Everything else (encoding, decoding, scheduler steps) is left out, so the
    bound is optimistic; an efficiency (speedup / limit) above 1 beyond noise is a bug."""
    from benchmarks.forward_cost import forward_table

    calls_per_step, rows_per_call = diffusers_forward_pattern(pipe, size)
    rows_per_request = round(calls_per_step * rows_per_call)
    forward = forward_table(model, [rows_per_call, *(rows_per_request * n for n in batch_sizes)], size=size, **cost)
    sequential_forward_s = calls_per_step * forward[rows_per_call]
    per_request = {n: forward[rows_per_request * n] / n for n in batch_sizes}
    best = min(per_request, key=per_request.get)
    return {
        "limit": sequential_forward_s / per_request[best],
        "best_batch": best,
        "diffusers_calls_per_step": calls_per_step,
        "diffusers_rows_per_call": rows_per_call,
        "rows_per_request": rows_per_request,
        "forward_s_by_rows": {str(rows): seconds for rows, seconds in sorted(forward.items())},
    }


# -- report ------------------------------------------------------------------------------------
def summarize(done: list[Done], occupancy: float) -> dict:
    latencies = sorted(d.finish - d.arrival for d in done)
    makespan = max(d.finish for d in done) - min(d.arrival for d in done)
    return {
        "throughput_rps": len(done) / makespan,
        "steps_per_s": sum(d.steps for d in done) / makespan,
        "mean_latency_s": statistics.mean(latencies),
        "p50_latency_s": latencies[len(latencies) // 2],
        "p99_latency_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "mean_queue_s": statistics.mean(d.start - d.arrival for d in done),
        "mean_batch_occupancy": occupancy,
        "latencies_s": latencies,
    }


def plot(report: dict, path: str) -> bool:
    """Latency CDFs and throughput bars; False (with a note) when matplotlib is not installed."""
    plt = headless_pyplot(path)
    if plt is None:
        return False

    fig, (cdf, bars) = plt.subplots(1, 2, figsize=(10, 4))
    for name, system in report["systems"].items():
        lat = system["latencies_s"]
        cdf.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=name)
    cdf.set_xlabel("latency (s)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("latency CDF")
    cdf.legend()
    names = list(report["systems"])
    values = [report["systems"][n]["throughput_rps"] for n in names]
    drawn = bars.bar(range(len(names)), values, color="tab:green")
    bars.bar_label(drawn, labels=[f"{v:.2f}" for v in values], padding=2, fontsize=8)
    bars.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    bars.set_ylabel("requests / s")
    bars.set_ylim(0, max(values) * 1.15)
    bars.set_title("throughput")
    fig.suptitle(f"{report['config']['model']}, {load_label(report['config'])}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return True


def load_label(config: dict) -> str:
    """How the requests arrived: all at once ("saturated") or as a Poisson process at a rate."""
    if config["rate"] * config["sequential_service_s"] >= config["num_requests"]:
        return f"saturated: all {config['num_requests']} requests at once"
    return f"{config['num_requests']} requests, Poisson arrivals at {config['rate']:.2f} req/s"


def say(message: str) -> None:
    """Progress on stderr, so the table on stdout stays clean to pipe."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv=None, prog: str | None = None, parser_class: type = argparse.ArgumentParser) -> dict:
    """`prog` and `parser_class`: how `stepweave bench` names the command and reports mistakes."""
    parser = parser_class(
        prog=prog,
        description="stepweave throughput against diffusers baselines",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="small-qwen-image", help="preset name or diffusers directory")
    parser.add_argument("--num-requests", type=int, default=32, help="requests in the workload")
    parser.add_argument("--rate", type=float, default=None, help="req/s (default: 1.5x what sequential sustains)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload (arrivals, prompts, step counts)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 30, 40], help="step counts the requests mix")
    parser.add_argument(
        "--max-num-seqs", type=int, nargs="+", default=[8], help="one stepweave system per value (and static batch)"
    )
    parser.add_argument("--executor", choices=["mp", "inproc"], default="mp", help="stepweave's executor")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every system's model")
    parser.add_argument("--adapter", action="store_true", help="also serve through the generic diffusers adapter")
    parser.add_argument("--height", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument("--device", default="cpu", help="every system's device: cpu or cuda")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: float32)")
    parser.add_argument("--json", default="benchmarks/results/throughput.json", help="where the report is written")
    parser.add_argument("--plot", default="benchmarks/results/throughput.png", help="where the plot is written")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # the stepweave worker inherits the same budget

    import diffusers

    from pipelines.model_info import ModelInfo

    say(f"loading {args.model} (the diffusers baselines run on the same weights)")
    info = ModelInfo.load(args.model)
    size = (args.height or info.default_height, args.width or info.default_width)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(info.path), dtype=dtype).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    options = {"device": args.device, "dtype": args.dtype}
    global CFG_KEY, INPUT_IMAGE
    call_parameters = inspect.signature(type(pipe).__call__).parameters
    CFG_KEY = "true_cfg_scale" if "true_cfg_scale" in call_parameters else "guidance_scale"
    if "image" in call_parameters:  # image-to-image: one seeded picture of the output's size for every request
        pixels = np.random.default_rng(args.seed).integers(0, 256, (*size, 3), dtype=np.uint8)
        INPUT_IMAGE = Image.fromarray(pixels)
    say("timing one request alone to set the arrival rate")
    probe = Spec(0, 0.0, min(args.steps), PROMPTS[0], NEGATIVES[0], 0)
    _call(pipe, [probe], size)  # warm-up
    short = _call(pipe, [probe], size)
    long = _call(pipe, [Spec(0, 0.0, max(args.steps), PROMPTS[0], NEGATIVES[0], 0)], size)
    per_step = (long - short) / max(1, max(args.steps) - min(args.steps))
    service = short + per_step * (statistics.mean(args.steps) - min(args.steps))
    rate = args.rate or 1.5 / service
    args.rate = rate
    specs = make_workload(args.num_requests, rate, args.steps, args.seed)

    say(f"{len(specs)} requests at {rate:.2f} req/s, {size[0]}x{size[1]}, steps {args.steps}")
    systems = {}
    say("serving with diffusers-sequential")
    done, batches = serve_diffusers(pipe, specs, size, max_batch=1)
    systems["diffusers-sequential"] = summarize(done, 1.0)
    say("serving with diffusers-static")
    done, batches = serve_diffusers(pipe, specs, size, max_batch=max(args.max_num_seqs))
    systems["diffusers-static"] = summarize(done, statistics.mean(batches))
    for n in args.max_num_seqs:
        say(f"serving with stepweave-{n}")
        done, occupancy = serve_stepweave(str(info.path), specs, size, n, args.executor, **options)
        systems[f"stepweave-{n}"] = summarize(done, occupancy)
        if args.adapter:
            say(f"serving with stepweave-adapter-{n}")
            done, occupancy = serve_stepweave(str(info.path), specs, size, n, args.executor, adapter=True, **options)
            systems[f"stepweave-adapter-{n}"] = summarize(done, occupancy)

    base = systems["diffusers-sequential"]["throughput_rps"]
    limit = None  # measured with a hand-split family's forward_rows; adapter-only models have none
    if not info.family.steps_whole_calls:
        say("measuring the batch-compute limit")
        cost = {"threads": torch.get_num_threads(), "device": args.device, "dtype": args.dtype}
        limit = batch_compute_limit(str(info.path), pipe, size, args.max_num_seqs, cost)
    report = {
        "systems": systems,
        "speedup": {name: s["throughput_rps"] / base for name, s in systems.items()},
        "batch_compute_limit": limit["limit"] if limit else None,
        "limit_detail": limit,
        "efficiency": {name: s["throughput_rps"] / base / limit["limit"] for name, s in systems.items()}
        if limit
        else {},
        "config": {**vars(args), "sequential_service_s": service},
    }
    print("| system | req/s | x sequential | steps/s | p50 s | p99 s | mean queue s | batch occupancy | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in systems.items():
        print(
            f"| {name} | {s['throughput_rps']:.3f} | {s['throughput_rps'] / base:.2f} | {s['steps_per_s']:.1f} | "
            f"{s['p50_latency_s']:.2f} | {s['p99_latency_s']:.2f} | {s['mean_queue_s']:.2f} | "
            f"{s['mean_batch_occupancy']:.2f} | {report['efficiency'].get(name, float('nan')):.2f} |"
        )
    if limit is not None:
        print(
            f"batch-compute limit: x{limit['limit']:.2f} (diffusers: {limit['diffusers_calls_per_step']:g} calls of "
            f"{limit['diffusers_rows_per_call']} row(s) per step; best batch {limit['best_batch']})"
        )
    print(f"arrival rate {rate:.2f} req/s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    say(f"wrote {args.json}")
    if args.plot and plot(report, args.plot):
        say(f"wrote {args.plot}")
    return report


if __name__ == "__main__":
    main()
