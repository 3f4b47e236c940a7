"""The engine as a service: real `stepweave serve` processes, many clients, hostile input, death.

Servers run the in-process executor (one process each) on ipc sockets in short private
directories. Images are compared with what `Omni` returns for the same request.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import AsyncEngineClient, EngineClient, Omni, SamplingParams
from engine.client import ServerUnavailableError
from engine.server import check_bind_address, claim_ipc_path
from engine.service_protocol import (
    MAX_CLIENT_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Abort,
    Error,
    Generate,
    Hello,
    Output,
    Ping,
    Pong,
    Rejected,
    ServerMessage,
    Welcome,
)
from engine.wire import Decoder, Encoder

pytestmark = pytest.mark.slow

TOKEN = "test-token-0123456789"
ROOT = Path(__file__).resolve().parent.parent
# ~14 s of steps on the tiny model (512x512 makes each step cost): always aborted before its end
LONG = SamplingParams(num_inference_steps=1000, seed=1, height=512, width=512)


class ServerProcess:
    """`python -m engine.cli serve` on an ipc socket; its log goes to a file we can read."""

    def __init__(self, model, *args: str, executor: str = "inproc"):
        self.dir = tempfile.mkdtemp(prefix="sw-", dir="/tmp")  # ipc paths must stay short
        self.address = f"ipc://{self.dir}/engine.sock"
        self.log_path = Path(self.dir) / "server.log"
        self._log_file = open(self.log_path, "wb")
        command = [sys.executable, "-m", "engine.cli", "serve", "--model", str(model), "--executor", executor,
                   "--address", self.address, *args]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while "server ready" not in self.log():
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"server not ready after {timeout} s:\n{self.log()}"
            time.sleep(0.05)
        return self

    def children(self) -> set[int]:
        tasks = Path(f"/proc/{self.proc.pid}/task")
        return {int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class RawPeer:
    """A hand-driven DEALER: sends whatever frames a test wants and reads raw replies."""

    def __init__(self, address: str):
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.encoder, self.decoder = Encoder(), Decoder(ServerMessage, max_frames=2)

    def send(self, message) -> None:
        self.sock.send_multipart(self.encoder.encode(message))

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 10.0):
        assert self.sock.poll(int(timeout * 1000)), "no reply from the server"
        return self.decoder.decode(self.sock.recv_multipart())

    def recv_until(self, kind, timeout: float = 10.0):
        """The next reply of type `kind`, skipping others (outputs of earlier requests, pongs)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(message, kind):
                return message

    def drain(self) -> None:
        while self.sock.poll(200):
            self.sock.recv_multipart()

    def hello(self, token: str | None = TOKEN) -> Welcome | Error:
        self.send(Hello(protocol_version=PROTOCOL_VERSION, auth_token=token))
        return self.recv_until((Welcome, Error))

    def close(self) -> None:
        self.sock.close()
        self.context.term()


@pytest.fixture(scope="module")
def server(qwen_dir):
    """The shared server: token-protected, 3 s client timeout (so silent clients are reaped fast)."""
    proc = ServerProcess(qwen_dir, "--max-num-seqs", "16", "--auth-token", TOKEN, "--client-timeout", "3")
    try:
        yield proc.wait_ready()
        assert proc.proc.poll() is None, "the shared server died during the tests"
        assert "error handling a client message" not in proc.log(), proc.log()
    finally:
        proc.stop()


def _cases():
    """12 distinct requests (2 steps each): sizes, seeds, with and without true CFG."""
    cases = []
    for i in range(12):
        height, width = [(64, 64), (32, 32), (32, 64)][i % 3]
        prompt: dict = {"prompt": f"a lighthouse number {i} on a cliff"}
        if i % 2:
            prompt["negative_prompt"] = "fog"
        params = SamplingParams(num_inference_steps=2, seed=100 + i, true_cfg_scale=1.0 + i % 4, height=height, width=width, output_type="np")
        cases.append((prompt, params))
    return cases


@pytest.fixture(scope="module")
def references(qwen_dir):
    cases = _cases()
    with Omni(model=str(qwen_dir), executor="inproc") as omni:
        outputs = omni.generate([p for p, _ in cases], [sp for _, sp in cases], use_tqdm=False)
    assert all(o.error is None for o in outputs)
    return cases, [o.images for o in outputs]


async def _wait_state(client: AsyncEngineClient, predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        state = await client.debug_state()
        if predicate(state) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.1)


def _empty(state) -> bool:
    return not state.worker_request_ids and not state.server_request_ids


# -- correctness under concurrency ---------------------------------------------------------------
def test_200_requests_from_4_clients_match_omni(server, references):
    cases, expected = references
    per_client = 50
    plans = {name: [(k * 5 + offset) % len(cases) for k in range(per_client)] for offset, name in enumerate("ABCD")}
    results: dict[str, list] = {}

    def sync_client(name):  # two Omni-shaped clients, each submitting its 50 prompts at once
        with EngineClient(server.address, TOKEN) as client:
            plan = plans[name]
            ids = [f"r-{k}" for k in range(per_client)]
            results[name] = client.generate([cases[i][0] for i in plan], [cases[i][1] for i in plan], use_tqdm=False, request_ids=ids)

    async def async_client(name):  # two AsyncEngine-shaped clients streaming 50 requests each
        async with AsyncEngineClient(server.address, TOKEN) as client:

            async def one(k, i):
                return [o async for o in client.generate(cases[i][0], cases[i][1], request_id=f"r-{k}")]

            streams = await asyncio.gather(*(one(k, i) for k, i in enumerate(plans[name])))
            for outputs in streams:
                progress = [o for o in outputs if not o.finished]
                assert all(0 < o.step <= o.num_steps == 2 for o in progress)
            results[name] = [outputs[-1] for outputs in streams]

    async def async_clients():
        await asyncio.gather(async_client("C"), async_client("D"))

    threads = [threading.Thread(target=sync_client, args=(name,)) for name in "AB"]
    for thread in threads:
        thread.start()
    asyncio.run(async_clients())
    for thread in threads:
        thread.join(60)
    assert sorted(results) == list("ABCD")
    for name, outputs in results.items():
        assert len(outputs) == per_client
        for k, (i, output) in enumerate(zip(plans[name], outputs)):
            # the same ids in every client: the server keeps each client's namespace apart
            assert output.request_id == f"r-{k}" and output.finished and output.error is None, output.error
            assert output.seed == cases[i][1].seed
            assert output.images.shape == expected[i].shape
            assert float(np.abs(output.images - expected[i]).max()) < 1e-4

    with EngineClient(server.address, TOKEN) as client:
        # PIL output, converted on the client from the float frame exactly as Omni converts it
        prompt, params = cases[0]
        (pil,) = client.generate(prompt, msgspec.structs.replace(params, output_type="pil"), use_tqdm=False)
        assert np.abs(np.asarray(pil.images[0], dtype=np.int16) - (expected[0][0] * 255).round()).max() <= 1
        state = client.debug_state()
        assert state.worker_request_ids == [] and state.server_request_ids == []
    assert os.stat(server.address[len("ipc://"):]).st_mode & 0o777 == 0o600


def test_bad_requests_fail_alone_like_omni(server, qwen_dir):
    bad = [
        ("ok", SamplingParams(num_inference_steps=0)),  # caught on the client
        ("ok", SamplingParams(num_inference_steps=2, height=40)),  # needs the model: caught by the server
        (7, SamplingParams(num_inference_steps=2)),
        ({"prompt": "x", "colour": "red"}, SamplingParams(num_inference_steps=2)),
        ("ok", SamplingParams(num_inference_steps=2, scheduler_config={"x": object()})),  # cannot be encoded
    ]
    good = ("fine", SamplingParams(num_inference_steps=2, seed=5, height=32, width=32, output_type="np"))
    prompts = [p for p, _ in bad] + [good[0]]
    params = [sp for _, sp in bad] + [good[1]]
    with Omni(model=str(qwen_dir), executor="inproc") as omni:
        want = omni.generate(prompts[:-1], params[:-1], use_tqdm=False)
    with EngineClient(server.address, TOKEN) as client:
        got = client.generate(prompts, params, use_tqdm=False)
        with pytest.raises(ValueError, match="2 entries but there are 3 prompts"):
            client.generate(["a", "b", "c"], params[:2])
    for g, w in zip(got[:4], want[:4]):
        assert g.finished and g.error == w.error and g.error.startswith("ValueError: ")
    assert got[4].error.startswith("ValueError: request cannot be sent")
    assert got[-1].error is None and got[-1].images.shape == (1, 32, 32, 3)


async def test_async_client_shapes_match_async_engine(server):
    async with AsyncEngineClient(server.address, TOKEN) as client:
        assert await client.health()
        with pytest.raises(ValueError, match="height must be a multiple of 16"):
            await client.generate("x", SamplingParams(num_inference_steps=2, height=40)).__anext__()
        first = client.generate("one", LONG, request_id="dup")
        await first.__anext__()
        with pytest.raises(ValueError, match="already in flight"):
            await client.generate("two", request_id="dup").__anext__()
        await first.aclose()
        assert _empty(await _wait_state(client, _empty))


# -- aborts, disconnects and vanished clients -------------------------------------------------------
DYING_CLIENT = f"""
import sys, time, msgspec, zmq
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(sys.argv[1])
enc, dec = msgspec.msgpack.encode, msgspec.msgpack.decode
sock.send(enc({{"type": "hello", "protocol_version": {PROTOCOL_VERSION}, "auth_token": sys.argv[2]}}))
assert dec(sock.recv())["type"] == "welcome"
params = {{"num_inference_steps": 1000, "seed": 1, "height": 512, "width": 512}}
# final output only: nothing is sent to this client while its request runs
sock.send(enc({{"type": "generate", "request_id": "doomed", "params": params, "prompt": "doomed", "stream": False}}))
print("sent", flush=True)
while True:  # heartbeats until killed, so only the disconnect can free its request
    sock.send(enc({{"type": "ping", "seq": 0}}))
    time.sleep(0.2)
"""


async def test_aborts_and_vanished_clients_free_server_and_worker_state(server):
    async with AsyncEngineClient(server.address, TOKEN) as client:
        # abort(): the stream ends with "request aborted"
        stream = client.generate("abort me", LONG, request_id="a")
        assert not (await stream.__anext__()).finished
        await client.abort("a")
        rest = [o async for o in stream]
        assert rest[-1].finished and rest[-1].error == "request aborted"
        # leaving the loop aborts on the server too
        async for _ in client.generate("leave me", LONG, request_id="b"):
            break
        # a client process killed mid-request
        dying = subprocess.Popen([sys.executable, "-c", DYING_CLIENT, server.address, TOKEN], stdout=subprocess.PIPE)
        line = await asyncio.get_running_loop().run_in_executor(None, dying.stdout.readline)
        assert line.strip() == b"sent"
        state = await _wait_state(client, lambda s: len(s.worker_request_ids) == 1)
        assert len(state.server_request_ids) == 1 and state.server_request_ids[0].endswith(":doomed"), state
        t0 = time.monotonic()
        dying.kill()
        dying.wait()
        state = await _wait_state(client, _empty)
        assert _empty(state), state
        assert time.monotonic() - t0 < 2.0  # the disconnect, not the 3 s heartbeat timeout, freed it

        # a client that stays connected but silent (hung) is dropped after --client-timeout
        silent = RawPeer(server.address)
        try:
            assert isinstance(silent.hello(), Welcome)
            silent.send(Generate(request_id="hung", params=LONG, prompt="hung"))
            silent.recv_until(Output)
            t0 = time.monotonic()
            assert len((await client.debug_state()).worker_request_ids) == 1
            state = await _wait_state(client, _empty, timeout=10)
            assert _empty(state) and time.monotonic() - t0 > 1.5, state
            silent.send(Ping(1))
            assert silent.recv_until(Error).code == "no_session"
        finally:
            silent.close()


# -- hostile input -----------------------------------------------------------------------------------
TAGS = ["hello", "generate", "abort", "ping", "state_query", "goodbye", "launch", ""]
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
TAGGED = st.builds(
    lambda tag, fields: {"type": tag, **fields},
    st.sampled_from(TAGS),
    st.dictionaries(st.sampled_from(["request_id", "params", "prompt", "seq", "protocol_version", "auth_token", "stream"]), JUNK, max_size=4),
)
FRAMES = st.one_of(
    st.lists(st.binary(max_size=300), min_size=1, max_size=3),
    JUNK.map(lambda v: [msgspec.msgpack.encode(v)]),
    TAGGED.map(lambda v: [msgspec.msgpack.encode(v)]),
)


def test_fuzzed_and_malformed_messages_get_errors_and_the_server_keeps_serving(server):
    greeted, stranger = RawPeer(server.address), RawPeer(server.address)
    try:
        assert isinstance(greeted.hello(), Welcome)

        @given(frames=FRAMES)
        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(frames):
            greeted.send_raw(frames)
            stranger.send_raw(frames)

        fuzz()
        for peer in (greeted, stranger):
            peer.drain()  # the replies to the fuzz
            peer.send(Ping(77))  # still answered: a Pong, or no_session (the stranger; a fuzzed goodbye)
            reply = peer.recv_until((Pong, Error))
            assert isinstance(reply, Pong) or reply.code == "no_session", reply
        assert isinstance(greeted.hello(), Welcome)  # the fuzz may have said goodbye

        # the named cases, each with its reply
        stranger.send(Ping(1))
        assert stranger.recv_until(Error).code == "no_session"
        stranger.send(Hello(protocol_version=PROTOCOL_VERSION + 1, auth_token=TOKEN))
        assert stranger.recv_until(Error).code == "version"
        assert stranger.hello(token=None).code == "auth"
        assert stranger.hello(token=TOKEN[:-1] + "x").code == "auth"
        greeted.send_raw([msgspec.msgpack.encode({"type": "launch", "target": "moon"})])
        assert greeted.recv_until(Error).code == "malformed"
        greeted.send_raw([b"\xc1\xff\x00"])
        assert greeted.recv_until(Error).code == "malformed"
        greeted.send_raw([b"a", b"b"])
        assert greeted.recv_until(Error).code == "malformed"
        typed = {"type": "generate", "request_id": "typed", "params": {"num_inference_steps": "many"}, "prompt": "x"}
        greeted.send_raw([msgspec.msgpack.encode(typed)])
        rejected = greeted.recv_until(Rejected)
        assert rejected.request_id == "typed" and rejected.kind == "invalid" and "malformed request" in rejected.error
        greeted.send(Generate(request_id="zero", params=SamplingParams(num_inference_steps=0), prompt="x"))
        rejected = greeted.recv_until(Rejected)
        assert rejected.kind == "invalid" and "num_inference_steps must be" in rejected.error
        greeted.send(Generate(request_id="twice", params=LONG, prompt="x"))
        greeted.send(Generate(request_id="twice", params=LONG, prompt="x"))
        assert greeted.recv_until(Rejected).kind == "duplicate"
        greeted.send(Abort("twice"))
        greeted.send_raw([b"\x00" * (MAX_CLIENT_MESSAGE_BYTES + 1)])
        assert greeted.recv_until(Error).code == "oversize"
        # far over the limit: zmq cuts the peer off before buffering it; its session ends
        greeted.send_raw([b"\x00" * (8 * MAX_CLIENT_MESSAGE_BYTES)])
        deadline = time.monotonic() + 10
        while True:  # the DEALER reconnects as a new peer, which the server does not know
            greeted.send(Ping(2))
            reply = greeted.recv_until((Pong, Error))
            if isinstance(reply, Error):
                assert reply.code == "no_session"
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        greeted.close()
        stranger.close()
    assert server.proc.poll() is None
    with EngineClient(server.address, TOKEN) as client:
        assert client.health()
        (output,) = client.generate("still serving", SamplingParams(num_inference_steps=2, height=32, width=32), use_tqdm=False)
        assert output.error is None
        state = client.debug_state()
        deadline = time.monotonic() + 10
        while not (state.worker_request_ids == [] and state.server_request_ids == []) and time.monotonic() < deadline:
            time.sleep(0.1)
            state = client.debug_state()
        assert state.worker_request_ids == [] and state.server_request_ids == [], state


def test_clients_without_the_token_are_refused(server):
    with EngineClient(server.address, timeout_s=3) as client:
        assert client.health() is False
        with pytest.raises(ServerUnavailableError, match="authentication failed"):
            client.generate("x", SamplingParams(num_inference_steps=2), use_tqdm=False)


# -- policy, backpressure, shutdown, death -------------------------------------------------------------
def test_ipc_address_is_never_taken_from_a_running_server(server, capsys):
    from engine.cli import main

    assert main(["serve", "--model", "unused", "--address", server.address]) == 2  # refused before loading
    assert "another server is running there" in capsys.readouterr().err
    with EngineClient(server.address, TOKEN) as client:
        assert client.health()  # and the running server still has its socket
    stale = Path(server.dir) / "stale.sock"  # a short path: unix socket paths are limited
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))
    claim_ipc_path(f"ipc://{stale}")  # a dead server's leftover is cleared
    assert not stale.exists()
    stale.write_text("not a socket")
    with pytest.raises(ValueError, match="not a socket"):
        claim_ipc_path(f"ipc://{stale}")


def test_address_policy_requires_a_token_beyond_loopback(capsys):
    for local in ("ipc:///tmp/x.sock", "tcp://127.0.0.1:5555", "tcp://localhost:5555", "tcp://[::1]:5555", "tcp://127.0.0.1:*"):
        check_bind_address(local, None)
    for remote in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555", "tcp://example.org:5555", "tcp://eth0:5555"):
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
    proc = ServerProcess(qwen_dir, "--max-num-seqs", "1", "--max-waiting", "1", "--drain-timeout", "3", executor="mp")
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
            short = SamplingParams(num_inference_steps=400, seed=3, height=256, width=256, output_type="np")  # ~1.2 s
            finishing = client.generate("finishing", short)
            await finishing.__anext__()
            stuck = asyncio.ensure_future(_collect(client.generate("stuck", LONG)))
            await asyncio.sleep(0.1)
            proc.proc.send_signal(signal.SIGTERM)
            while await client.health():
                await asyncio.sleep(0.05)
            with pytest.raises(ServerUnavailableError, match="shutting down"):
                await client.generate("late", short).__anext__()
            outputs = [o async for o in finishing]
            assert outputs[-1].error is None and outputs[-1].images.shape == (1, 256, 256, 3)
            stuck_outputs = await asyncio.wait_for(stuck, 10)
            assert "server shut down before the request finished" in stuck_outputs[-1].error
        code = await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 30)
        assert code == 0, proc.log()
        assert "engine shut down" in proc.log() and not Path(proc.address[len("ipc://"):]).exists()
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        proc.stop()


async def _collect(stream):
    return [o async for o in stream]


async def test_stopped_or_killed_server_fails_requests_fast(qwen_dir):
    proc = ServerProcess(qwen_dir).wait_ready()
    try:
        # hung (SIGSTOP): the heartbeat timeout ends the request with a clear error
        async with AsyncEngineClient(proc.address, timeout_s=1.5) as client:
            stream = client.generate("frozen", LONG)
            await stream.__anext__()
            proc.proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            outputs = await asyncio.wait_for(_collect(stream), 10)
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
            outputs = await asyncio.wait_for(_collect(stream), 10)
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


async def test_a_crashed_worker_fails_its_requests_and_stops_the_server(qwen_dir):
    proc = ServerProcess(qwen_dir, executor="mp").wait_ready()
    try:
        (worker,) = proc.children()
        async with AsyncEngineClient(proc.address) as client:
            stream = client.generate("crash", LONG)
            await stream.__anext__()
            os.kill(worker, signal.SIGKILL)
            outputs = await asyncio.wait_for(_collect(stream), 15)
            assert outputs[-1].finished and "died" in outputs[-1].error, outputs[-1].error
        # nothing left to serve with: the server exits non-zero so a supervisor restarts it
        code = await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 30)
        assert code == 1 and "the engine died" in proc.log(), proc.log()
    finally:
        proc.stop()
