"""A closed batch of concurrent CFG requests served with a given worker layout.

Shared by the CFG-parallel and pipeline-parallel benchmarks: both compare layouts on the same
requests in the same run and report throughput and latency ratios.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch


def serve(
    model: str, parallel_config, num_requests: int, steps: int, threads_per_worker: int = 1, single_repeats: int = 3
) -> dict:
    """Submit `num_requests` CFG requests at once; throughput and latency of the batch, and the
    median latency of one request alone over `single_repeats` runs."""
    from engine import Omni, SamplingParams
    from pipelines.model_info import ModelInfo

    torch.set_num_threads(threads_per_worker * parallel_config.world_size)
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
    with Omni(
        str(info.path), max_num_seqs=max(num_requests, 1), parallel_config=parallel_config, executor="mp"
    ) as omni:
        omni.generate(prompts[:1], SamplingParams(num_inference_steps=2, output_type="np"), use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        outputs = omni.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        singles = []
        for _ in range(single_repeats):
            t1 = time.perf_counter()
            omni.generate(prompts[:1], params[:1], use_tqdm=False)
            singles.append(time.perf_counter() - t1)
        stage_parameters = {
            rank: i["transformer_parameters"] for rank, i in sorted(omni.core.executor.worker_info.items())
        }
    errors = [o.error for o in outputs if o.error]
    if errors:
        raise RuntimeError(f"benchmark requests failed: {errors[:3]}")
    latencies = [o.metrics.latency_s for o in outputs]
    return {
        "throughput_rps": num_requests / wall,
        "mean_latency_s": sum(latencies) / len(latencies),
        "single_request_latency_s": statistics.median(singles),
        "single_request_samples_s": singles,
        "wall_s": wall,
        "worker_parameters": stage_parameters,
    }


def write_report(report: dict, json_path: str, plot_path: str | None, title: str) -> None:
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(report, indent=2))
    if not plot_path:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
