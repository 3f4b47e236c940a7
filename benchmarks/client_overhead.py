"""Per-request overhead of the client path (EngineClient -> `stepweave serve`) against the
embedded AsyncEngine, measured in the same run.

Both run the same model with the in-process executor and one intra-op thread, on the same
requests; rounds alternate between the systems so machine noise hits both alike. Sequential:
one request at a time, so latency = engine work + front-door overhead, and the difference of
medians is the overhead of the socket, the session and the encoding. Burst: N requests at once,
wall time / N (what the overhead costs under continuous batching).
Usage: python benchmarks/client_overhead.py [--model tiny-qwen-image] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.plotting import headless_pyplot  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _start_server(args, address: str, log_path: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "engine.cli",
        "serve",
        "--model",
        args.model,
        "--executor",
        "inproc",
        "--address",
        address,
        "--max-num-seqs",
        str(args.max_num_seqs),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


async def _wait_ready(client, server: subprocess.Popen, log_path: Path, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await client.health():
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}:\n{log_path.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise RuntimeError("server did not become ready")
        await asyncio.sleep(0.2)


async def _sequential(generate, n: int, params) -> list[float]:
    """Latency of n requests, one after the other."""
    latencies = []
    for i in range(n):
        t0 = time.perf_counter()
        last = None
        async for last in generate(f"a lighthouse {i}", params):
            pass
        assert last.error is None, last.error
        latencies.append(time.perf_counter() - t0)
    return latencies


async def _burst(generate, n: int, params) -> float:
    """Wall time per request of n concurrent requests."""

    async def one(i):
        last = None
        async for last in generate(f"a harbour {i}", params):
            pass
        assert last.error is None, last.error

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return (time.perf_counter() - t0) / n


async def measure(args) -> dict:
    from engine import AsyncEngine, AsyncEngineClient, EngineClient, SamplingParams

    params = SamplingParams(num_inference_steps=args.steps, seed=0, height=args.size, width=args.size, output_type="np")
    directory = tempfile.mkdtemp(prefix="sw-bench-", dir="/tmp")
    address = f"ipc://{directory}/engine.sock"
    log_path = Path(directory) / "server.log"
    server = _start_server(args, address, log_path)
    engine = AsyncEngine(args.model, max_num_seqs=args.max_num_seqs, executor="inproc")
    client = AsyncEngineClient(address)
    sync_client = EngineClient(address)
    loop = asyncio.get_running_loop()

    async def sync_generate(prompt, p):  # the Omni-shaped client, called from a thread as a user would
        (output,) = await loop.run_in_executor(None, lambda: sync_client.generate([prompt], p, use_tqdm=False))
        yield output

    systems = {"embedded": engine.generate, "async_client": client.generate, "sync_client": sync_generate}
    latencies = {name: [] for name in systems}
    bursts = {"embedded": [], "client": []}
    try:
        await _wait_ready(client, server, log_path)
        for generate in systems.values():  # warm-up: first-call costs stay out of the numbers
            await _sequential(generate, 1, params)
        for _ in range(args.rounds):
            for name, generate in systems.items():
                latencies[name] += await _sequential(generate, args.requests, params)
            bursts["embedded"].append(await _burst(engine.generate, args.burst, params))
            bursts["client"].append(await _burst(client.generate, args.burst, params))
    finally:
        await client.close()
        await loop.run_in_executor(None, sync_client.close)
        await loop.run_in_executor(None, engine.shutdown)
        server.terminate()
        server.wait(60)
        shutil.rmtree(directory, ignore_errors=True)

    ms = 1e3
    result = {}
    for name, values in latencies.items():
        result[f"{name}_p50_ms"] = statistics.median(values) * ms
        result[f"{name}_p90_ms"] = sorted(values)[int(0.9 * (len(values) - 1))] * ms
    for name in ("async_client", "sync_client"):
        result[f"{name}_overhead_ms"] = result[f"{name}_p50_ms"] - result["embedded_p50_ms"]
        result[f"{name}_ratio"] = result[f"{name}_p50_ms"] / result["embedded_p50_ms"]
    result["embedded_burst_per_request_ms"] = statistics.median(bursts["embedded"]) * ms
    result["client_burst_per_request_ms"] = statistics.median(bursts["client"]) * ms
    result["client_burst_overhead_ms"] = result["client_burst_per_request_ms"] - result["embedded_burst_per_request_ms"]
    result["client_burst_ratio"] = result["client_burst_per_request_ms"] / result["embedded_burst_per_request_ms"]
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-qwen-image")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--requests", type=int, default=30, help="sequential requests per system per round")
    parser.add_argument("--burst", type=int, default=32, help="concurrent requests in the burst measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, the same for both")
    parser.add_argument("--json", default="benchmarks/results/client_overhead.json")
    parser.add_argument("--plot", default="benchmarks/results/client_overhead.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = asyncio.run(measure(args))
    print(f"model {args.model}, {args.steps} steps at {args.size}x{args.size}, {args.rounds} rounds")
    print("| path | p50 ms/request | p90 ms | overhead vs embedded (p50) |")
    print("|---|---|---|---|")
    print(f"| embedded AsyncEngine | {r['embedded_p50_ms']:.2f} | {r['embedded_p90_ms']:.2f} | — |")
    for name, label in (("async_client", "AsyncEngineClient -> server"), ("sync_client", "EngineClient -> server")):
        p50, p90 = r[f"{name}_p50_ms"], r[f"{name}_p90_ms"]
        overhead, ratio = r[f"{name}_overhead_ms"], r[f"{name}_ratio"]
        print(f"| {label} | {p50:.2f} | {p90:.2f} | {overhead:+.2f} ms (x{ratio:.2f}) |")
    print(f"| burst of {args.burst}, embedded | {r['embedded_burst_per_request_ms']:.2f} | | — |")
    print(
        f"| burst of {args.burst}, AsyncEngineClient | {r['client_burst_per_request_ms']:.2f} | | "
        f"{r['client_burst_overhead_ms']:+.2f} ms (x{r['client_burst_ratio']:.2f}) |"
    )
    report = {"results": r, "config": vars(args)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        _plot(r, args, args.plot)
    return report


def _plot(r: dict, args, path: str) -> None:
    """Per-request time of each path, sequential and in a burst, side by side."""
    plt = headless_pyplot(path)
    if plt is None:
        return
    fig, (seq, burst) = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = ["embedded\nAsyncEngine", "AsyncEngine\nClient", "EngineClient"]
    seq.bar(
        labels, [r["embedded_p50_ms"], r["async_client_p50_ms"], r["sync_client_p50_ms"]], color=["grey", "C0", "C1"]
    )
    seq.set_ylabel("p50 latency per request (ms)")
    seq.set_title("one request at a time")
    burst.bar(labels[:2], [r["embedded_burst_per_request_ms"], r["client_burst_per_request_ms"]], color=["grey", "C0"])
    burst.set_ylabel("wall time / request (ms)")
    burst.set_title(f"{args.burst} requests at once")
    fig.suptitle(f"client path overhead, {args.model}, {args.steps} steps at {args.size}x{args.size}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
