"""The server's address policy, backpressure and life cycle: SIGTERM drains, a hung or killed
server fails its clients' requests fast, a crashed worker stops the server. Each test that needs
a server starts its own, since it ends it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import zmq

from engine import AsyncEngineClient, EngineClient, SamplingParams, ServerUnavailableError
from engine.service.address import check_bind_address, load_public_key
from tests.service_peers import LONG, TOKEN, ServerProcess, collect

pytestmark = pytest.mark.slow


def test_address_policy_requires_a_token_beyond_loopback(capsys):
    for local in (
        "ipc:///tmp/x.sock",
        "tcp://127.0.0.1:5555",
        "tcp://localhost:5555",
        "tcp://[::1]:5555",
        "tcp://127.0.0.1:*",
    ):
        check_bind_address(local, None)
    for remote in (
        "tcp://0.0.0.0:5555",
        "tcp://*:5555",
        "tcp://10.1.2.3:5555",
        "tcp://example.org:5555",
        "tcp://eth0:5555",
    ):
        with pytest.raises(ValueError, match="--auth-token"):
            check_bind_address(remote, None)
        with pytest.raises(ValueError, match="at least 16 characters"):
            check_bind_address(remote, "short")
        check_bind_address(remote, TOKEN)
    for bad in ("udp://127.0.0.1:5", "127.0.0.1:5555", "tcp://127.0.0.1", "tcp://127.0.0.1:99999"):
        with pytest.raises(ValueError):
            check_bind_address(bad, TOKEN)
    from engine.cli import main

    assert main(["serve", "--address", "tcp://0.0.0.0:5555", "--auth-token", ""]) == 2  # refused before loading
    assert "exposes the engine beyond this machine" in capsys.readouterr().err


async def test_overload_is_rejected_at_once_and_sigterm_drains(qwen_dir):
    # a worker process here, so the clean exit is seen to take the workers down with it
    proc = ServerProcess(qwen_dir, "--max-num-seqs", "1", "--max-waiting", "1", "--drain-timeout", "10", executor="mp")
    proc.wait_ready()
    workers = proc.children()
    assert len(workers) == 1
    try:
        async with AsyncEngineClient(proc.address) as client:
            running = client.generate("running", LONG)
            await running.__anext__()
            waiting = client.generate("waiting", LONG)
            waiting_task = asyncio.ensure_future(waiting.__anext__())
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            overflow = [o async for o in client.generate("one too many", LONG)]
            assert time.monotonic() - t0 < 1.0
            assert overflow[-1].finished and "overloaded" in overflow[-1].error
            await running.aclose()
            await waiting_task
            await waiting.aclose()

            # SIGTERM: the running request finishes, the queued one is aborted after the drain
            # timeout, new requests are refused, and the server exits cleanly
            short = SamplingParams(
                num_inference_steps=400, seed=3, height=256, width=256, output_type="np"
            )  # ~1.2 s idle
            finishing = client.generate("finishing", short)
            await finishing.__anext__()
            stuck = asyncio.ensure_future(collect(client.generate("stuck", LONG)))
            await asyncio.sleep(0.1)
            proc.proc.send_signal(signal.SIGTERM)
            while await client.health():
                await asyncio.sleep(0.05)
            with pytest.raises(ServerUnavailableError, match="shutting down"):
                await client.generate("late", short).__anext__()
            outputs = [o async for o in finishing]
            assert outputs[-1].error is None and outputs[-1].images.shape == (1, 256, 256, 3)
            stuck_outputs = await asyncio.wait_for(stuck, 30)
            assert "server shut down before the request finished" in stuck_outputs[-1].error
        code = await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 30)
        assert code == 0, proc.log()
        assert "engine shut down" in proc.log() and not Path(proc.address[len("ipc://") :]).exists()
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        proc.stop()


async def test_stopped_or_killed_server_fails_requests_fast(qwen_dir):
    proc = ServerProcess(qwen_dir).wait_ready()
    try:
        # hung (SIGSTOP): the heartbeat timeout ends the request with a clear error
        async with AsyncEngineClient(proc.address, timeout_s=1.5) as client:
            stream = client.generate("frozen", LONG)
            await stream.__anext__()
            proc.proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            outputs = await asyncio.wait_for(collect(stream), 10)
            assert time.monotonic() - t0 < 4
            assert outputs[-1].finished and "stopped answering" in outputs[-1].error
        proc.proc.send_signal(signal.SIGCONT)

        # killed: the lost connection fails every open request at once, sync and async alike
        sync_client = EngineClient(proc.address, timeout_s=2)
        async with AsyncEngineClient(proc.address, timeout_s=2) as client:
            stream = client.generate("doomed", LONG)
            await stream.__anext__()
            loop = asyncio.get_running_loop()
            blocked = loop.run_in_executor(None, lambda: sync_client.generate(["doomed too"] * 3, LONG, use_tqdm=False))
            await asyncio.sleep(0.5)
            proc.proc.kill()
            t0 = time.monotonic()
            outputs = await asyncio.wait_for(collect(stream), 10)
            assert "lost the connection" in outputs[-1].error
            with pytest.raises(ServerUnavailableError, match="lost the connection"):
                await asyncio.wait_for(blocked, 10)
            assert time.monotonic() - t0 < 1.5
            # later calls fail within the handshake timeout, and health says so
            t0 = time.monotonic()
            with pytest.raises(ServerUnavailableError, match="no stepweave server answered"):
                await client.generate("after", LONG).__anext__()
            assert await client.health() is False
            assert time.monotonic() - t0 < 6
        sync_client.close()
    finally:
        proc.stop()


async def test_a_crashed_worker_fails_only_running_requests_and_the_server_keeps_serving(qwen_dir):
    """stepweave serve restarts its workers by default: the running request fails, a waiting one
    (another client's) runs on the new workers, and the clients keep their sessions."""
    proc = ServerProcess(qwen_dir, "--max-num-seqs", "1", executor="mp").wait_ready()
    try:
        (worker,) = proc.children()
        async with AsyncEngineClient(proc.address) as client, AsyncEngineClient(proc.address) as other:
            stream = client.generate("crash", LONG)
            await stream.__anext__()
            queued = asyncio.ensure_future(collect(other.generate("queued", SamplingParams(num_inference_steps=2))))
            await asyncio.sleep(0.3)
            os.kill(worker, signal.SIGKILL)
            outputs = await asyncio.wait_for(collect(stream), 60)
            assert outputs and outputs[-1].finished and "crashed" in outputs[-1].error, outputs
            done = await asyncio.wait_for(queued, 60)
            assert done[-1].error is None and len(done[-1].images) == 1
            after = await collect(client.generate("after", SamplingParams(num_inference_steps=2)))
            assert after[-1].error is None and await client.health()
        assert proc.proc.poll() is None and "workers restarted in" in proc.log(), proc.log()
    finally:
        proc.stop()


async def test_with_restarts_off_a_crashed_worker_stops_the_server(qwen_dir):
    proc = ServerProcess(qwen_dir, "--max-worker-restarts", "0", executor="mp").wait_ready()
    try:
        (worker,) = proc.children()
        async with AsyncEngineClient(proc.address) as client:
            stream = client.generate("crash", LONG)
            await stream.__anext__()
            os.kill(worker, signal.SIGKILL)
            outputs = await asyncio.wait_for(collect(stream), 15)
            assert outputs[-1].finished and "died" in outputs[-1].error, outputs[-1].error
        # nothing left to serve with: the server exits non-zero so a supervisor restarts it
        code = await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 30)
        assert code == 1 and "the engine died" in proc.log(), proc.log()
    finally:
        proc.stop()


async def test_curve_encrypts_a_tcp_server_and_clients_pin_its_key(qwen_dir, tmp_path):
    from engine.cli import main

    assert main(["keygen", str(tmp_path / "keys")]) == 0
    public, secret = tmp_path / "keys" / "server.key", tmp_path / "keys" / "server.key_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    proc = ServerProcess(
        qwen_dir, "--auth-token", TOKEN, "--curve-secret-key", str(secret), address="tcp://127.0.0.1:*"
    )
    proc.wait_ready()
    try:
        assert proc.address.startswith("tcp://127.0.0.1:")
        params = SamplingParams(num_inference_steps=2, seed=4, height=32, width=32, output_type="np")
        for key in (public, load_public_key(public).decode()):  # the certificate file, or the key as text
            async with AsyncEngineClient(proc.address, TOKEN, server_key=key) as client:
                outputs = [o async for o in client.generate("over an encrypted channel", params)]
                assert outputs[-1].error is None and outputs[-1].images.shape == (1, 32, 32, 3)
        # no key (plain text), or another server's key: refused at the handshake, said clearly
        for key in (None, zmq.curve_keypair()[0]):
            async with AsyncEngineClient(proc.address, TOKEN, server_key=key, timeout_s=5) as client:
                t0 = time.monotonic()
                with pytest.raises(ServerUnavailableError, match="security handshake"):
                    await client.generate("x", params).__anext__()
                assert time.monotonic() - t0 < 3
        with pytest.raises(ValueError, match="not a Z85 CURVE public key"):
            AsyncEngineClient(proc.address, server_key="~" * 40)
        assert proc.proc.poll() is None
    finally:
        proc.stop()
