"""Text-to-video throughput: stepweave against diffusers' own `WanPipeline`, one request at a time.

Every request arrives at once (saturated): prompts with a negative prompt (CFG, two transformer
calls per step), step counts cycling through --steps, one size and frame count, so forwards of
requests at compatible steps can join. On a Wan 2.2 model (two transformers split at the
boundary) requests on different sides of it call different transformers in the same step batch,
which run as separate forwards. Systems, on the same weights in one process with one intra-op
thread:
- `diffusers-sequential`: `WanPipeline.from_pretrained(DIR)` run request after request;
- `stepweave-N`: `Omni` (in-process executor) with max_num_seqs=N, all requests submitted at once.
The limit beside them is the whole pipeline perfectly batched: diffusers making one video alone
against N videos in one call (same prompts, the median step count, all at one step: no joins,
expert splits or finishing at different times to lose on), per video, timed in the same run.
The systems run in alternating rounds (--rounds, 3) and each reports its median round.
Usage: python benchmarks/video_throughput.py [--model tiny-wan22] [--requests 16] [--max-num-seqs 8]
       [--height 64 --width 64 --num-frames 17] [--rounds 3] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.plotting import headless_pyplot  # noqa: E402

PROMPTS = ["waves breaking on a beach at dawn", "a red fox running through snow", "rain on a city street at night"]
NEGATIVE = "blurry, static"


def _workload(args) -> list[tuple[dict, dict]]:
    """(prompt dict, diffusers call options) per request."""
    work = []
    for i in range(args.requests):
        prompt = {"prompt": PROMPTS[i % len(PROMPTS)], "negative_prompt": NEGATIVE}
        options = dict(
            num_inference_steps=args.steps[i % len(args.steps)],
            height=args.height,
            width=args.width,
            num_frames=args.num_frames,
            seed=i,
        )
        work.append((prompt, options))
    return work


def run_diffusers(path: Path, work) -> dict:
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    latencies = []
    for prompt, options in work:
        options = dict(options)
        generator = torch.Generator().manual_seed(options.pop("seed"))
        pipe(**prompt, **options, generator=generator, output_type="np")
        latencies.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "throughput_rps": len(work) / elapsed, "mean_latency_s": sum(latencies) / len(work)}


def run_stepweave(path: Path, work, max_num_seqs: int) -> dict:
    from engine import Omni, SamplingParams

    params = [
        SamplingParams(
            num_inference_steps=o["num_inference_steps"],
            height=o["height"],
            width=o["width"],
            num_frames=o["num_frames"],
            seed=o["seed"],
            output_type="np",
        )
        for _, o in work
    ]
    with Omni(model=str(path), executor="inproc", max_num_seqs=max_num_seqs) as omni:
        adapter = omni.core.executor.runner.pipeline
        start = time.perf_counter()
        outputs = omni.generate([p for p, _ in work], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        calls, forwards = adapter.forward_calls, adapter.forwards_run
    failed = [o.error for o in outputs if o.error is not None]
    if failed:
        raise SystemExit(f"stepweave failed a request: {failed[0]}")
    return {
        "seconds": elapsed,
        "throughput_rps": len(work) / elapsed,
        "mean_latency_s": sum(o.metrics.latency_s for o in outputs) / len(work),
        "forward_calls": calls,
        "forwards_run": forwards,
    }


def batch_seconds(path: Path, args, rows: int, repeats: int = 2) -> float:
    """Seconds for diffusers to make `rows` videos in one call (one batch, the median step count):
    the whole pipeline perfectly batched, text encoder and VAE included."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    steps = sorted(args.steps)[len(args.steps) // 2]
    options = dict(height=args.height, width=args.width, num_frames=args.num_frames, num_inference_steps=steps)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(rows)]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        pipe(prompt=prompts, negative_prompt=[NEGATIVE] * rows, **options, output_type="np")
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-wan22")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 6, 8, 10])
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--num-frames", type=int, default=17)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from pipelines.model_info import resolve_model

    path = resolve_model(args.model)
    work = _workload(args)
    name = f"stepweave-{args.max_num_seqs}"
    rounds: dict[str, list[dict]] = {"diffusers-sequential": [], name: []}
    ones, manys = [], []
    for _ in range(args.rounds):  # alternating, so load from other processes hits both alike
        rounds["diffusers-sequential"].append(run_diffusers(path, work))
        rounds[name].append(run_stepweave(path, work, args.max_num_seqs))
        ones.append(batch_seconds(path, args, 1))
        manys.append(batch_seconds(path, args, args.max_num_seqs))
    # each system's median round by throughput; the limit from each call's fastest time
    systems = {k: sorted(v, key=lambda r: r["throughput_rps"])[len(v) // 2] for k, v in rounds.items()}
    one, many = min(ones), min(manys)
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
        "systems": systems,
        "rounds": rounds,
        "batch_s_by_rows": {"1": one, str(args.max_num_seqs): many},
        "limit": args.max_num_seqs * one / many,
    }
    base = systems["diffusers-sequential"]["throughput_rps"]
    for name, result in systems.items():
        print(f"{name:22s} {result['throughput_rps']:.2f} req/s ({result['throughput_rps'] / base:.2f}x)")
    joined = systems[name]
    print(f"stepweave joined {joined['forward_calls']} forward calls into {joined['forwards_run']} forwards")
    print(
        f"{'limit, same run':22s} {report['limit']:.2f}x (diffusers: 1 video {one:.2f} s, "
        f"{args.max_num_seqs} in one batch {many:.2f} s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        _plot(report, args.plot)
    return report


def _plot(report: dict, path: str) -> None:
    plt = headless_pyplot(path)
    if plt is None:
        return
    names = list(report["systems"])
    values = [report["systems"][n]["throughput_rps"] for n in names]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(names, values, color=["#999999", "#3366cc"])
    ax.axhline(values[0] * report["limit"], color="#cc3333", linestyle="--", label="limit, same run")
    ax.set_ylabel("videos / s")
    ax.set_title(f"{report['config']['model']}: {report['config']['requests']} videos at once")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
