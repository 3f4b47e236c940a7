"""`stepweave gateway` over two `stepweave serve` engine servers: real processes on loopback.

100 concurrent requests spread over both engines; killing one engine mid-run fails exactly its
in-flight requests with 503, while the other engine's requests and every later request succeed.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.service_peers import GatewayProcess, ServerProcess, metric_samples

pytestmark = pytest.mark.slow

QUICK = {"prompt": "a fox", "size": "32x32", "num_inference_steps": 2}
# long enough to be surely in flight when its engine is killed
SLOW = {"prompt": "a slow fox", "size": "128x128", "num_inference_steps": 400}


@pytest.fixture(scope="module")
def engines(qwen_dir):
    procs = [ServerProcess(qwen_dir, "--max-num-seqs", "16") for _ in range(2)]
    try:
        yield [proc.wait_ready() for proc in procs]
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
def gateway(engines):
    proc = GatewayProcess([engine.address for engine in engines], "--health-interval", "0.2")
    try:
        yield proc.wait_ready()
        assert "Traceback" not in proc.log(), proc.log()
    finally:
        proc.stop()


def _routed(metrics: dict, address: str) -> float:
    return metrics.get(("stepweave_gateway_routed_requests_total", (("engine", address),)), 0.0)


def _metrics(gateway) -> dict:
    return metric_samples(httpx.get(f"{gateway.url}/metrics").text)


async def test_100_concurrent_requests_spread_over_both_engines(gateway, engines):
    before = _metrics(gateway)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
        models = (await client.get("/v1/models")).json()["data"]
        assert len(models) == 1  # both engines serve the same model
        posts = [client.post("/v1/images/generations", json={**QUICK, "seed": i}) for i in range(100)]
        responses = await asyncio.gather(*posts)
    assert [r.status_code for r in responses] == [200] * 100, {r.status_code: r.text for r in responses}
    seeds = sorted(r.json()["data"][0]["seed"] for r in responses)
    assert seeds == list(range(100))
    after = _metrics(gateway)
    shares = [_routed(after, e.address) - _routed(before, e.address) for e in engines]
    assert sum(shares) == 100 and min(shares) >= 30, shares  # fewest-outstanding routing spreads a burst
    assert after[("stepweave_requests_total", (("outcome", "ok"),))] >= 100


async def test_killing_an_engine_fails_only_its_in_flight_requests(gateway, engines):
    victim, survivor = engines
    async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
        tasks = [
            asyncio.ensure_future(client.post("/v1/images/generations", json={**SLOW, "seed": i})) for i in range(6)
        ]
        deadline = time.monotonic() + 30
        while True:  # until each engine has its 3 requests running
            metrics = _metrics(gateway)
            outstanding = [
                metrics.get(("stepweave_gateway_outstanding_requests", (("engine", e.address),))) for e in engines
            ]
            if outstanding == [3, 3]:
                break
            assert time.monotonic() < deadline, outstanding
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        victim.proc.kill()
        later = [client.post("/v1/images/generations", json={**QUICK, "seed": 100 + i}) for i in range(10)]
        later = await asyncio.gather(*later)
        slow = await asyncio.gather(*tasks)  # the survivor's finish; the victim's ended at the kill
        assert sorted(r.status_code for r in slow) == [200] * 3 + [503] * 3, [r.text for r in slow]
        for response in slow:
            if response.status_code == 503:
                assert response.json()["error"]["code"] == "engine_unavailable"
        assert [r.status_code for r in later] == [200] * 10, [r.text for r in later]
        health = await client.get("/health")
        assert health.status_code == 200  # one engine is still up
    metrics = _metrics(gateway)
    assert metrics[("stepweave_engine_up", (("engine", victim.address),))] == 0
    assert metrics[("stepweave_engine_up", (("engine", survivor.address),))] == 1


def test_a_gateway_with_no_engine_up_answers_503():
    gateway = GatewayProcess(["ipc:///tmp/sw-nobody/engine.sock"], "--engine-timeout", "0.5").wait_ready()
    try:
        assert httpx.get(f"{gateway.url}/health").status_code == 503
        response = httpx.post(f"{gateway.url}/v1/images/generations", json=QUICK)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
        metrics = _metrics(gateway)
        assert metrics[("stepweave_engine_up", (("engine", "ipc:///tmp/sw-nobody/engine.sock"),))] == 0
    finally:
        gateway.stop()
