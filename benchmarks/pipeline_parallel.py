"""Pipeline-parallel throughput: PP=2 against PP=1, one thread per stage, same run.

The bound beside it, measured in the same run: every step, each stage must run its own blocks
over all 2N CFG rows of N requests, while the other stage does the same on the same cores. So
PP=2 can finish at most N requests per (steps x the slower stage's block time), measured with
both stages' blocks running at once; everything else a step does (embeddings, the output head,
scheduler steps, the VAE, Python) is counted as free, which makes it an upper bound. The limit on
the PP=2 / PP=1 ratio is that bound over PP=1's measured throughput, so efficiency is PP=2's
throughput over its bound. One request alone cannot overlap stages, so its latency limit is 1x.
Usage: python benchmarks/pipeline_parallel.py [--model medium-qwen-image] [--num-requests 8] [--steps 6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.forward_cost import concurrent_stage_block_seconds  # noqa: E402
from benchmarks.parallel_workload import compare, write_report  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Pipeline-parallel benchmark")
    parser.add_argument("--model", default="medium-qwen-image")
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="batches per layout, taken in turns (median)")
    parser.add_argument("--json", default="benchmarks/results/pipeline_parallel.json")
    parser.add_argument("--plot", default="benchmarks/results/pipeline_parallel.png")
    args = parser.parse_args(argv)
    from engine import ParallelConfig

    layouts = {f"pp-{n}": ParallelConfig(pipeline_parallel_size=n) for n in (1, 2)}
    systems = compare(args.model, layouts, args.num_requests, args.steps, rounds=args.rounds)
    n = args.num_requests  # CFG: every stage runs its blocks over 2n rows per step
    stage_block_s = concurrent_stage_block_seconds(args.model, rows=2 * n, stages=2)
    bound_rps = n / (args.steps * max(stage_block_s))
    limit = bound_rps / systems["pp-1"]["throughput_rps"]
    throughput_ratio = systems["pp-2"]["throughput_rps"] / systems["pp-1"]["throughput_rps"]
    report = {
        "systems": systems,
        "throughput_ratio": throughput_ratio,
        "limit": limit,
        "efficiency": throughput_ratio / limit,
        "stage_block_s": stage_block_s,
        "pp2_bound_rps": bound_rps,
        "single_request_latency_ratio": systems["pp-2"]["single_request_latency_s"]
        / systems["pp-1"]["single_request_latency_s"],
        "stage_parameters": systems["pp-2"]["worker_parameters"],
        "config": vars(args),
    }
    print("| system | req/s | mean latency s | single request s |\n|---|---|---|---|")
    for name, s in systems.items():
        print(
            f"| {name} | {s['throughput_rps']:.3f} | {s['mean_latency_s']:.2f} | {s['single_request_latency_s']:.2f} |"
        )
    print(
        f"pp-2 / pp-1: throughput x{report['throughput_ratio']:.2f} (limit x{limit:.2f}, efficiency "
        f"{report['efficiency']:.2f}), single-request latency "
        f"x{report['single_request_latency_ratio']:.2f}; parameters per stage {report['stage_parameters']}"
    )
    write_report(report, args.json, args.plot, f"Pipeline-parallel on {args.model}")
    return report


if __name__ == "__main__":
    main()
