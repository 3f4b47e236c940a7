"""Per-request overhead of the HTTP API (`stepweave serve --http`, and through `stepweave
gateway`) against the embedded AsyncEngine and AsyncEngineClient, and the gateway over two
engine servers against one at saturation, measured in the same run.

Overhead: the workload of benchmarks/client_overhead.py (tiny model, few steps, small images,
so the front door is a visible share), one request at a time, the paths taking turns request by
request. Every remote path talks to the same server process (the ZeroMQ and HTTP doors share its
engine), with the in-process executor and one intra-op thread, like the embedded engine here.
The HTTP paths also PNG-encode and base64 the image, as the API must.
Saturation: a burst of concurrent HTTP requests to a gateway over one engine server and to a
gateway over two, alternating; requests per second.
Usage: python benchmarks/http_overhead.py [--model tiny-qwen-image] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.plotting import headless_pyplot  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class _Process:
    """A `python -m engine.cli ...` process whose log says when it is ready and where."""

    def __init__(self, args: list[str], log_path: Path, threads: int):
        self.log_path = log_path
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        with open(log_path, "wb") as log:
            command = [sys.executable, "-m", "engine.cli", *args]
            # a session of its own, as a service under a supervisor has: with the kernel's
            # autogroup scheduling, CPU time is shared per session, so servers started inside this
            # script's session would split one share however many there are
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    async def ready(self, marker: str, pattern: str, timeout_s: float = 300.0) -> str | None:
        deadline = time.monotonic() + timeout_s
        while marker not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"not ready (exit {self.proc.poll()}):\n{self.log_path.read_text(errors='replace')}")
            await asyncio.sleep(0.2)
        match = re.search(pattern, self.log_path.read_text(errors="replace"))
        return None if match is None else match.group(1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _body(args, seed: int) -> dict:
    size = f"{args.size}x{args.size}"
    return {"prompt": f"a lighthouse {seed}", "size": size, "num_inference_steps": args.steps, "seed": seed}


async def _sequential(paths: dict, n: int) -> dict[str, list[float]]:
    """n requests per path, one at a time, the paths taking turns request by request (so a
    busy moment on the shared machine hits every path alike)."""
    latencies = {name: [] for name in paths}
    for i in range(n):
        for name, run in paths.items():
            t0 = time.perf_counter()
            await run(i)
            latencies[name].append(time.perf_counter() - t0)
    return latencies


def _cpu_s(pids: list[int]) -> list[float]:
    """CPU seconds (user + system, all threads) each process has used so far."""
    return [sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids]


async def _burst(http: httpx.AsyncClient, url: str, args, pids: list[int]) -> tuple[float, list[float]]:
    """Requests per second for a burst of concurrent HTTP requests, and the cores each of
    `pids` kept busy meanwhile (CPU seconds over wall seconds)."""
    body = {**_body(args, 0), "size": f"{args.burst_size}x{args.burst_size}", "num_inference_steps": args.burst_steps}
    cpu0, t0 = _cpu_s(pids), time.perf_counter()
    posts = [http.post(f"{url}/v1/images/generations", json={**body, "seed": i}) for i in range(args.burst)]
    responses = await asyncio.gather(*posts)
    elapsed = time.perf_counter() - t0
    cores = [(after - before) / elapsed for before, after in zip(cpu0, _cpu_s(pids))]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:1]
    return args.burst / elapsed, cores


async def measure(args) -> dict:
    from engine import AsyncEngine, AsyncEngineClient, SamplingParams

    directory = Path(tempfile.mkdtemp(prefix="sw-http-bench-", dir="/tmp"))
    addresses = [f"ipc://{directory}/engine{i}.sock" for i in range(2)]
    common = ["--model", args.model, "--executor", "inproc", "--max-num-seqs", str(args.max_num_seqs)]
    servers = [
        _Process(["serve", *common, "--address", addresses[0], "--http", "127.0.0.1:0"], directory / "s0.log", 1),
        _Process(["serve", *common, "--address", addresses[1]], directory / "s1.log", 1),
    ]
    gateways = [
        _Process(
            ["gateway", "--http", "127.0.0.1:0", *[f"--engine={a}" for a in engine_set]], directory / f"g{i}.log", 1
        )
        for i, engine_set in enumerate([addresses[:1], addresses])
    ]
    engine = AsyncEngine(args.model, max_num_seqs=args.max_num_seqs, executor="inproc")
    client = AsyncEngineClient(addresses[0])
    http = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=args.burst))
    params = SamplingParams(num_inference_steps=args.steps, seed=0, height=args.size, width=args.size, output_type="np")
    loop = asyncio.get_running_loop()
    try:
        server_url = await servers[0].ready("server ready", r"HTTP API \(OpenAI Images\) on (\S+)")
        await servers[1].ready("server ready", r"()")
        gateway_urls = [await g.ready("gateway ready", r"gateway ready: (\S+) over") for g in gateways]

        async def embedded(i):
            async for last in engine.generate(f"a lighthouse {i}", params):
                pass
            assert last.error is None, last.error

        async def remote(i):
            async for last in client.generate(f"a lighthouse {i}", params):
                pass
            assert last.error is None, last.error

        def over_http(url):
            async def run(i):
                response = await http.post(f"{url}/v1/images/generations", json=_body(args, i))
                assert response.status_code == 200, response.text

            return run

        paths = {
            "embedded": embedded,
            "async_client": remote,
            "http": over_http(server_url),
            "gateway": over_http(gateway_urls[0]),
        }
        latencies = {name: [] for name in paths}
        rates = {"one_engine": [], "two_engines": []}
        cores = {"one_engine": [], "two_engines": []}
        # engine server 0, engine server 1, the gateway in use, and this process (the HTTP client)
        pids = {
            "one_engine": [servers[0].proc.pid, servers[1].proc.pid, gateways[0].proc.pid, os.getpid()],
            "two_engines": [servers[0].proc.pid, servers[1].proc.pid, gateways[1].proc.pid, os.getpid()],
        }
        load_before = os.getloadavg()[0]
        await _sequential(paths, 2)  # warm-up: first-call costs stay out of the numbers
        await _burst(http, gateway_urls[1], args, pids["two_engines"])
        for _ in range(args.rounds):
            for name, values in (await _sequential(paths, args.requests)).items():
                latencies[name] += values
            for key, url in (("one_engine", gateway_urls[0]), ("two_engines", gateway_urls[1])):
                rate, used = await _burst(http, url, args, pids[key])
                rates[key].append(rate)
                cores[key].append(used)
        load_after = os.getloadavg()[0]
    finally:
        await http.aclose()
        await client.close()
        await loop.run_in_executor(None, engine.shutdown)
        for process in [*gateways, *servers]:
            process.stop()
        shutil.rmtree(directory, ignore_errors=True)

    ms = 1e3
    result = {}
    for name, values in latencies.items():
        result[f"{name}_p50_ms"] = statistics.median(values) * ms
        result[f"{name}_p90_ms"] = sorted(values)[int(0.9 * (len(values) - 1))] * ms
    for name in ("async_client", "http", "gateway"):
        result[f"{name}_overhead_ms"] = result[f"{name}_p50_ms"] - result["embedded_p50_ms"]
        result[f"{name}_ratio"] = result[f"{name}_p50_ms"] / result["embedded_p50_ms"]
    result["one_engine_req_per_s"] = statistics.median(rates["one_engine"])
    result["two_engines_req_per_s"] = statistics.median(rates["two_engines"])
    result["two_engines_speedup"] = result["two_engines_req_per_s"] / result["one_engine_req_per_s"]
    result["cpu_cores"] = os.cpu_count()
    # cores each process kept busy during the bursts (1.0: a core of its own): engine servers 0
    # and 1, the gateway, and the benchmark's HTTP client
    for key in ("one_engine", "two_engines"):
        used = [statistics.median(c[k] for c in cores[key]) for k in range(4)]
        result[f"{key}_cores_used"] = dict(zip(("engine0", "engine1", "gateway", "client"), used))
    result["load_average_1m"] = [load_before, load_after]  # the machine's, other users' jobs included
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-qwen-image")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--requests", type=int, default=30, help="sequential requests per path per round")
    parser.add_argument("--burst", type=int, default=64, help="concurrent requests in the saturation burst")
    parser.add_argument("--burst-steps", type=int, default=8)
    parser.add_argument("--burst-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every engine")
    parser.add_argument("--json", default="benchmarks/results/http_overhead.json")
    parser.add_argument("--plot", default="benchmarks/results/http_overhead.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = asyncio.run(measure(args))
    print(f"model {args.model}, {args.steps} steps at {args.size}x{args.size}, {args.rounds} rounds")
    print("| path | p50 ms/request | p90 ms | overhead vs embedded (p50) |")
    print("|---|---|---|---|")
    print(f"| embedded AsyncEngine | {r['embedded_p50_ms']:.2f} | {r['embedded_p90_ms']:.2f} | — |")
    for name in ("async_client", "http", "gateway"):
        p50, p90, overhead, ratio = (r[f"{name}_{k}"] for k in ("p50_ms", "p90_ms", "overhead_ms", "ratio"))
        print(f"| {name} | {p50:.2f} | {p90:.2f} | {overhead:+.2f} ms (x{ratio:.2f}) |")
    print(
        f"saturation ({args.burst} at once, {args.burst_steps} steps at {args.burst_size}x{args.burst_size}): "
        f"gateway over 1 engine {r['one_engine_req_per_s']:.2f} req/s, over 2 engines "
        f"{r['two_engines_req_per_s']:.2f} req/s (x{r['two_engines_speedup']:.2f}) on {r['cpu_cores']} cores"
    )
    for key in ("one_engine", "two_engines"):
        print(f"cores used, {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in r[f"{key}_cores_used"].items()))
    print(f"load average (1 min) before / after: {r['load_average_1m'][0]:.1f} / {r['load_average_1m'][1]:.1f}")
    report = {"results": r, "config": vars(args)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        _plot(r, args, args.plot)
    return report


def _plot(r: dict, args, path: str) -> None:
    plt = headless_pyplot(path)
    if plt is None:
        return
    fig, (seq, sat) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = ["embedded", "async_client", "http", "gateway"]
    labels = ["embedded\nAsyncEngine", "AsyncEngine\nClient", "HTTP", "HTTP via\ngateway"]
    seq.bar(labels, [r[f"{n}_p50_ms"] for n in names], color=["grey", "C0", "C1", "C2"])
    seq.set_ylabel("p50 latency per request (ms)")
    seq.set_title(f"one request at a time ({args.steps} steps, {args.size}²)")
    sat.bar(["1 engine server", "2 engine servers"], [r["one_engine_req_per_s"], r["two_engines_req_per_s"]])
    sat.set_ylabel("requests / s")
    sat.set_title(f"gateway, {args.burst} at once ({r['cpu_cores']} cores)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
