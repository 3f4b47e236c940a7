"""Chaos: what users do to a serving engine, repeated so the answers are numbers.

Five trials against real engines on the tiny preset:

- abort storm: requests that are aborted at random steps and resubmitted under the same ids,
  beside ones that run to the end; every finished image is compared with the same request run
  alone (wrong outputs), and every stream must end (lost or hung);
- kill -9 under load, with and without worker restarts: time until every stream has ended with
  an error (no restart), time until a fresh worker grid serves (restart), and whether the waiting
  requests then finish with the right images;
- soak: client processes killed mid-stream, round after round, against `stepweave serve`; the
  server's memory growth and whether it holds any state afterwards;
- hostile frames: junk, oversized and many-part messages; the server must answer and keep serving;
- flood: one client submits 200 long requests while a well-behaved client sends one request at
  a time; its p99 latency beside its unloaded p99 (goal: within 2x).

    python -m benchmarks.chaos --out docs/results/chaos.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
import zmq

from engine import AsyncEngine, AsyncEngineClient, EngineDeadError, SamplingParams
from engine.contract.wire import Encoder
from engine.service.protocol import PROTOCOL_VERSION, Hello

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "chaos-token-0123456789"
LANES = 10  # abort storm: request ids, each reused by a run of requests


def _params(seed: int, steps: int = 3) -> SamplingParams:
    return SamplingParams(num_inference_steps=steps, seed=seed, output_type="np")


async def _final(stream, timeout: float):
    """The stream's last output, or None if it did not end in time (hung)."""

    async def drain():
        out = None
        async for out in stream:
            pass
        return out

    try:
        return await asyncio.wait_for(drain(), timeout)
    except asyncio.TimeoutError:
        return None


# -- abort storm ---------------------------------------------------------------------------------
async def abort_storm(model: str, requests: int, rng: random.Random) -> dict:
    cases = [(f"a storm prompt number {i}", 100 + i) for i in range(6)]
    async with AsyncEngine(model=model, max_num_seqs=8) as engine:
        expected = {}
        for prompt, seed in cases:
            expected[(prompt, seed)] = (await _final(engine.generate(prompt, _params(seed)), 60)).images
        finished = wrong = lost = aborted = 0
        errors: Counter[str] = Counter()

        async def lane(k: int):
            """Requests one after another under one id: each may be aborted at a random point and
            the id reused at once by the next."""
            nonlocal finished, wrong, lost, aborted
            request_id = f"storm-{k}"
            for i in range(k, requests, LANES):
                prompt, seed = cases[rng.randrange(len(cases))]
                stream = engine.generate(prompt, _params(seed), request_id=request_id)
                if rng.random() < 0.5:
                    first = await stream.__anext__()
                    if not first.finished:
                        await asyncio.sleep(rng.random() * 0.05)
                        await engine.abort(request_id)
                        await stream.aclose()
                        aborted += 1
                        continue
                    out = first
                else:
                    out = await _final(stream, 60)
                await stream.aclose()
                if out is None or out.error is not None:
                    lost += 1
                    errors[str(out.error if out is not None else "hung")[:120]] += 1
                    continue
                finished += 1
                wrong += int(not np.allclose(out.images, expected[(prompt, seed)], atol=1e-5))

        started = time.perf_counter()
        await asyncio.gather(*(lane(k) for k in range(LANES)))
        state = await engine.worker_state_ids()
    return {
        "requests": requests,
        "finished": finished,
        "aborted": aborted,
        "lost_or_hung": lost,
        "wrong_outputs": wrong,
        "worker_state_left": len(state),
        "errors": dict(errors),
        "seconds": round(time.perf_counter() - started, 2),
    }


# -- kill -9 under load --------------------------------------------------------------------------
async def kill_under_load(model: str, restarts: int) -> dict:
    async with AsyncEngine(model=model, max_num_seqs=2, max_worker_restarts=restarts) as engine:
        cases = [(f"kill prompt {i}", 200 + i) for i in range(6)]
        expected = {}
        if restarts:
            for prompt, seed in cases[2:]:
                expected[prompt] = (await _final(engine.generate(prompt, _params(seed)), 60)).images
        long = SamplingParams(num_inference_steps=1000, seed=1)
        streams = [engine.generate(prompt, long if i < 2 else _params(seed)) for i, (prompt, seed) in enumerate(cases)]
        firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await asyncio.gather(*firsts[:2])  # the two long ones are running; the rest wait
        (process,) = engine.core.executor.processes
        killed = time.perf_counter()
        os.kill(process.pid, signal.SIGKILL)
        outs = []
        for first, stream in zip(firsts, streams):
            try:
                out = await asyncio.wait_for(first, 60)
                outs.append(out if out.finished else await _final(stream, 60))
            except EngineDeadError as exc:
                outs.append(exc)
        ended = time.perf_counter() - killed
        result = {"max_worker_restarts": restarts, "seconds_until_every_stream_ended": round(ended, 2)}
        failed = [o for o in outs if isinstance(o, Exception) or o is None or o.error is not None]
        result["failed_requests"] = len(failed)
        result["lost_or_hung"] = sum(o is None for o in outs)
        if restarts:
            waiting = outs[2:]
            result["waiting_requests_finished"] = sum(not isinstance(o, Exception) and o.error is None for o in waiting)
            result["wrong_outputs"] = sum(
                not np.allclose(o.images, expected[prompt], atol=1e-5)
                for o, (prompt, _) in zip(waiting, cases[2:])
                if not isinstance(o, Exception) and o.error is None
            )
            result["restart_seconds"] = round(engine.core.stats.restart_s, 2)
            result["first_start_seconds"] = round(engine.core.stats.startup_s, 2)
        else:
            result["engine_dead"] = engine.is_dead
    return result


# -- a real server ---------------------------------------------------------------------------------
class Server:
    def __init__(self, model: str, *args: str):
        self.dir = tempfile.mkdtemp(prefix="sw-chaos-", dir="/tmp")
        self.log_path = Path(self.dir) / "server.log"
        command = [sys.executable, "-m", "engine.cli", "serve", "--model", model, "--address"]
        command += [f"ipc://{self.dir}/engine.sock", "--auth-token", TOKEN, "--client-timeout", "3", *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while "server ready" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{self.log_path.read_text(errors='replace')}")
            time.sleep(0.1)
        self.address = re.search(r"on (\S+) \(protocol", self.log_path.read_text()).group(1)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


DYING_CLIENT = """
import asyncio, sys
from engine import AsyncEngineClient, SamplingParams
async def main():
    async with AsyncEngineClient(sys.argv[1], sys.argv[2]) as client:
        streams = [client.generate(f"soak {i}", SamplingParams(num_inference_steps=200, seed=i)) for i in range(4)]
        pending = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        print("streaming", flush=True)  # killed from here on, its requests still running or queued
        await asyncio.sleep(30)
asyncio.run(main())
"""


async def soak(server: Server, rounds: int) -> dict:
    async with AsyncEngineClient(server.address, TOKEN) as client:
        await _final(client.generate("warm up", _params(0)), 60)
        start_rss = server.rss_mb()
        for _ in range(rounds):
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", DYING_CLIENT, server.address, TOKEN], cwd=ROOT, stdout=subprocess.PIPE
                )
                for _ in range(3)
            ]
            for proc in procs:
                await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + 20
        state = await client.debug_state()
        while (state.all_worker_requests or state.all_server_requests) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            state = await client.debug_state()
        still_serves = (await _final(client.generate("after the soak", _params(1)), 60)).error is None
    return {
        "rounds": rounds,
        "clients_killed_mid_stream": 3 * rounds,
        "requests_abandoned": 12 * rounds,
        "server_rss_growth_mb": round(server.rss_mb() - start_rss, 1),
        "state_left": state.all_worker_requests + state.all_server_requests,
        "still_serves": still_serves,
    }


def hostile_frames(server: Server, count: int, rng: random.Random) -> dict:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    sock.send(Encoder().encode(Hello(protocol_version=PROTOCOL_VERSION, auth_token=TOKEN))[0])
    sock.poll(10_000)
    sock.recv_multipart()
    replies = 0
    kinds = ["junk", "truncated", "unknown-field", "many-parts", "oversize"]
    for i in range(count):
        kind = kinds[i % len(kinds)]
        if kind == "junk":
            frames = [rng.randbytes(rng.randint(1, 300))]
        elif kind == "truncated":
            frames = [msgspec.msgpack.encode({"type": "generate", "request_id": f"t{i}", "params": {}})[:-3]]
        elif kind == "unknown-field":
            frames = [msgspec.msgpack.encode({"type": "generate", "request_id": f"u{i}", "params": {"stepz": 1}})]
        elif kind == "many-parts":
            frames = [b"x"] * 200
        else:
            frames = [b"\x00" * ((1 << 20) + 1)]
        sock.send_multipart(frames)
        if sock.poll(5000):
            sock.recv_multipart()
            replies += 1
    sock.close()
    context.term()
    return {"messages": count, "answered": replies, "server_alive": server.proc.poll() is None}


async def flood(server: Server, flood_requests: int, samples: int) -> dict:
    polite_params = SamplingParams(num_inference_steps=4, seed=3)

    async def polite_latencies(client) -> list[float]:
        latencies = []
        for i in range(samples):
            t0 = time.perf_counter()
            out = await _final(client.generate(f"polite {i}", polite_params), 120)
            assert out is not None and out.error is None, out
            latencies.append(time.perf_counter() - t0)
        return latencies

    async with AsyncEngineClient(server.address, TOKEN) as polite, AsyncEngineClient(server.address, TOKEN) as bully:
        await _final(polite.generate("warm up", polite_params), 120)  # first-request costs are not latency
        unloaded = await polite_latencies(polite)
        long = SamplingParams(num_inference_steps=20, seed=5)
        flood_tasks = [
            asyncio.ensure_future(_final(bully.generate(f"flood {i}", long), 600)) for i in range(flood_requests)
        ]
        await asyncio.sleep(1.0)  # the flood is queued before the polite client asks again
        loaded = await polite_latencies(polite)
        queued_behind = sum(not t.done() for t in flood_tasks)
        for task in flood_tasks:
            task.cancel()
        await asyncio.gather(*flood_tasks, return_exceptions=True)
    p99 = lambda xs: float(np.percentile(xs, 99))  # noqa: E731
    return {
        "flood_requests": flood_requests,
        "flood_still_queued_when_done": queued_behind,
        "polite_unloaded_p50_s": round(float(np.median(unloaded)), 3),
        "polite_under_flood_p50_s": round(float(np.median(loaded)), 3),
        "polite_unloaded_p99_s": round(p99(unloaded), 3),
        "polite_under_flood_p99_s": round(p99(loaded), 3),
        "p99_ratio": round(p99(loaded) / p99(unloaded), 2),
    }


TRIALS = ("storm", "kill", "soak", "hostile", "flood")


async def main_async(args) -> dict:
    rng = random.Random(0)
    results = {"model": args.model}
    only = set(args.only or TRIALS)

    def report(name: str, value: dict) -> None:
        results[name] = value
        print(name, value, flush=True)

    if "storm" in only:
        report("abort_storm", await abort_storm(args.model, args.storm_requests, rng))
    if "kill" in only:
        for restarts in (0, 1):
            report(f"kill_under_load_restarts_{restarts}", await kill_under_load(args.model, restarts))
    if only & {"soak", "hostile", "flood"}:
        server = Server(args.model, "--max-num-seqs", "4", "--executor", "mp")
        try:
            if "soak" in only:
                report("soak", await soak(server, args.soak_rounds))
            if "hostile" in only:
                report("hostile_frames", hostile_frames(server, args.hostile_messages, rng))
            if "flood" in only:
                report("flood", await flood(server, args.flood_requests, args.polite_samples))
        finally:
            server.stop()
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-qwen-image")
    parser.add_argument("--storm-requests", type=int, default=120)
    parser.add_argument("--soak-rounds", type=int, default=5)
    parser.add_argument("--hostile-messages", type=int, default=100)
    parser.add_argument("--flood-requests", type=int, default=200)
    parser.add_argument("--polite-samples", type=int, default=10)
    parser.add_argument("--only", nargs="+", choices=TRIALS, help="run only these trials (default: all)")
    parser.add_argument("--out", default="docs/results/chaos.json")
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
