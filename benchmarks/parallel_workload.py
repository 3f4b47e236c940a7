"""A closed batch of concurrent CFG requests served with each of several worker layouts.

Shared by the CFG-parallel and pipeline-parallel benchmarks: both compare layouts on the same
requests in the same run and report throughput and latency ratios.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.plotting import headless_pyplot


def compare(
    model: str, layouts: dict, num_requests: int, steps: int, rounds: int = 3, single_repeats: int = 3
) -> dict[str, dict]:
    """Submit `num_requests` CFG requests at once to an engine per layout; throughput and latency
    of the batch, and the latency of one request alone. Every engine is started first and they
    take turns, round after round, so that load from elsewhere on a shared machine hits every
    layout alike; each figure is the median over rounds (one worker thread per rank)."""
    import contextlib

    from engine import Omni, SamplingParams
    from pipelines.model_info import ModelInfo

    info = ModelInfo.load(model)
    prompts = [
        {"prompt": f"a lighthouse on a cliff, variant {i}", "negative_prompt": "blurry, low quality"}
        for i in range(num_requests)
    ]
    params = [
        SamplingParams(
            num_inference_steps=steps, seed=i, output_type="np", height=info.default_height, width=info.default_width
        )
        for i in range(num_requests)
    ]
    walls = {name: [] for name in layouts}
    mean_latencies = {name: [] for name in layouts}
    singles = {name: [] for name in layouts}
    with contextlib.ExitStack() as stack:
        engines = {}
        for name, config in layouts.items():
            torch.set_num_threads(config.world_size)  # the executor gives each worker one thread
            engines[name] = stack.enter_context(
                Omni(str(info.path), max_num_seqs=max(num_requests, 1), parallel_config=config, executor="mp")
            )
        for omni in engines.values():  # warm-up
            omni.generate(prompts[:1], SamplingParams(num_inference_steps=2, output_type="np"), use_tqdm=False)
        for _ in range(rounds):
            for name, omni in engines.items():
                t0 = time.perf_counter()
                outputs = omni.generate(prompts, params, use_tqdm=False)
                walls[name].append(time.perf_counter() - t0)
                errors = [o.error for o in outputs if o.error]
                if errors:
                    raise RuntimeError(f"benchmark requests failed: {errors[:3]}")
                mean_latencies[name].append(statistics.mean(o.metrics.latency_s for o in outputs))
        for _ in range(single_repeats):
            for name, omni in engines.items():
                t0 = time.perf_counter()
                omni.generate(prompts[:1], params[:1], use_tqdm=False)
                singles[name].append(time.perf_counter() - t0)
        parameters = {
            name: {rank: i["transformer_parameters"] for rank, i in sorted(omni.core.executor.worker_info.items())}
            for name, omni in engines.items()
        }
    return {
        name: {
            "throughput_rps": num_requests / statistics.median(walls[name]),
            "mean_latency_s": statistics.median(mean_latencies[name]),
            "single_request_latency_s": statistics.median(singles[name]),
            "wall_s": walls[name],
            "mean_latency_samples_s": mean_latencies[name],
            "single_request_samples_s": singles[name],
            "worker_parameters": parameters[name],
        }
        for name in layouts
    }


def write_report(report: dict, json_path: str, plot_path: str | None, title: str) -> None:
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(report, indent=2))
    plt = headless_pyplot(plot_path) if plot_path else None
    if plt is None:
        return

    systems = report["systems"]
    names = list(systems)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(names, [systems[n]["throughput_rps"] for n in names], color="tab:blue")
    axes[0].set_ylabel("requests / s")
    axes[0].set_title("throughput")
    axes[1].bar(names, [systems[n]["mean_latency_s"] for n in names], color="tab:orange")
    axes[1].set_ylabel("seconds")
    axes[1].set_title("mean latency")
    fig.suptitle(title)
    fig.tight_layout()
    Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot_path, dpi=100)
