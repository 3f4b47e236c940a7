"""CFG-parallel throughput: cfg_parallel_size=2 against 1, one thread per rank, same run.

Beside the result it measures the limit on this machine: the size-1 path's CFG forward (both
branches' rows in one forward) over one branch's forward while another process computes the
other branch at the same time.
Usage: python benchmarks/cfg_parallel.py [--model medium-qwen-image] [--num-requests 8] [--steps 6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.forward_cost import concurrent_forward_seconds, forward_table  # noqa: E402
from benchmarks.parallel_workload import compare, write_report  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="CFG-parallel benchmark")
    parser.add_argument("--model", default="medium-qwen-image")
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="batches per layout, taken in turns (median)")
    parser.add_argument("--json", default="benchmarks/results/cfg_parallel.json")
    parser.add_argument("--plot", default="benchmarks/results/cfg_parallel.png")
    args = parser.parse_args(argv)
    from engine import ParallelConfig

    layouts = {f"cfg-{n}": ParallelConfig(cfg_parallel_size=n) for n in (1, 2)}
    systems = compare(args.model, layouts, args.num_requests, args.steps, rounds=args.rounds)
    n = args.num_requests
    forward = forward_table(args.model, [2, 2 * n])
    concurrent = {rows: concurrent_forward_seconds(args.model, rows=rows, processes=2) for rows in (1, n)}
    limit_single = forward[2] / concurrent[1]
    limit_batch = forward[2 * n] / concurrent[n]
    throughput_ratio = systems["cfg-2"]["throughput_rps"] / systems["cfg-1"]["throughput_rps"]
    single_speedup = systems["cfg-1"]["single_request_latency_s"] / systems["cfg-2"]["single_request_latency_s"]
    report = {
        "systems": systems,
        "throughput_ratio": throughput_ratio,
        "latency_ratio": systems["cfg-1"]["mean_latency_s"] / systems["cfg-2"]["mean_latency_s"],
        "single_request_speedup": single_speedup,
        "limit_single_request": limit_single,
        "limit_batch": limit_batch,
        "efficiency_batch": throughput_ratio / limit_batch,
        "efficiency_single_request": single_speedup / limit_single,
        # the measurements behind the limits: one process's forward of all CFG rows, and one
        # branch's rows while a second process runs the other branch's at the same time
        "forward_s_by_rows": {str(rows): seconds for rows, seconds in forward.items()},
        "concurrent_forward_s_by_rows": {str(rows): seconds for rows, seconds in concurrent.items()},
        "config": vars(args),
    }
    print("| system | req/s | mean latency s | single request s |\n|---|---|---|---|")
    for name, s in systems.items():
        print(
            f"| {name} | {s['throughput_rps']:.3f} | {s['mean_latency_s']:.2f} | {s['single_request_latency_s']:.2f} |"
        )
    print(
        f"cfg-2 / cfg-1: throughput x{report['throughput_ratio']:.2f}, mean latency x{report['latency_ratio']:.2f}, "
        f"single request x{report['single_request_speedup']:.2f}; limit x{limit_batch:.2f} (batch {n}), "
        f"x{limit_single:.2f} (one request); efficiency {report['efficiency_batch']:.2f} (batch), "
        f"{report['efficiency_single_request']:.2f} (one request)"
    )
    write_report(report, args.json, args.plot, f"CFG-parallel on {args.model}")
    return report


if __name__ == "__main__":
    main()
