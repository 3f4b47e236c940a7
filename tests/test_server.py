"""The engine as a service: a real `stepweave serve` process shared by many clients, hostile
input, aborts and vanished clients.

The server runs the in-process executor (one process) on an ipc socket in a short private
directory. Images are compared with what `Omni` returns for the same request.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import AsyncEngineClient, EngineClient, Omni, SamplingParams, ServerUnavailableError
from engine.contract.input_images import MAX_INPUT_BYTES
from engine.service.address import claim_ipc_path
from engine.service.protocol import (
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
    Welcome,
)
from tests.service_peers import LONG, TOKEN, RawPeer, ServerProcess, no_request_state, wait_state

pytestmark = pytest.mark.slow


PER_CLIENT = 64  # the shared server's cap on one client's requests in flight


@pytest.fixture(scope="module")
def server(qwen_dir):
    """The shared server: token-protected, 3 s client timeout (so silent clients are reaped fast)."""
    proc = ServerProcess(
        qwen_dir,
        "--max-num-seqs",
        "16",
        "--auth-token",
        TOKEN,
        "--client-timeout",
        "3",
        "--max-requests-per-client",
        str(PER_CLIENT),
    )
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
        params = SamplingParams(
            num_inference_steps=2,
            seed=100 + i,
            true_cfg_scale=1.0 + i % 4,
            height=height,
            width=width,
            output_type="np",
        )
        cases.append((prompt, params))
    return cases


@pytest.fixture(scope="module")
def references(qwen_dir):
    cases = _cases()
    with Omni(model=str(qwen_dir), executor="inproc") as omni:
        outputs = omni.generate([p for p, _ in cases], [sp for _, sp in cases], use_tqdm=False)
    assert all(o.error is None for o in outputs)
    return cases, [o.images for o in outputs]


# -- correctness under concurrency ---------------------------------------------------------------
async def test_an_id_reused_after_finish_or_abort_gets_a_fresh_request_and_a_live_one_is_refused(server, references):
    """Over the wire as embedded: the id names one request at a time, and whatever ran under it
    before (prompt, state, a late result) never reaches the next request with that id."""
    cases, expected = references

    async def final(client, i):
        outputs = [o async for o in client.generate(cases[i][0], cases[i][1], request_id="fox")]
        return outputs[-1]

    async with AsyncEngineClient(server.address, TOKEN) as client:
        first, second = await final(client, 0), await final(client, 1)  # reused after finishing
        assert np.abs(first.images - expected[0]).max() < 1e-4
        assert np.abs(second.images - expected[1]).max() < 1e-4
        live = client.generate("a long one", LONG, request_id="fox")
        await live.__anext__()
        with pytest.raises(ValueError, match="'fox' is already in flight"):
            await client.generate("a second fox", LONG, request_id="fox").__anext__()
        await client.abort("fox")  # aborted mid-run, then reused at once
        await live.aclose()
        third = await final(client, 2)
        assert third.num_steps == 2 and np.abs(third.images - expected[2]).max() < 1e-4


def test_200_requests_from_4_clients_match_omni(server, references):
    cases, expected = references
    per_client = 50
    plans = {name: [(k * 5 + offset) % len(cases) for k in range(per_client)] for offset, name in enumerate("ABCD")}
    results: dict[str, list] = {}

    def sync_client(name):  # two Omni-shaped clients, each submitting its 50 prompts at once
        with EngineClient(server.address, TOKEN) as client:
            plan = plans[name]
            ids = [f"r-{k}" for k in range(per_client)]
            results[name] = client.generate(
                [cases[i][0] for i in plan], [cases[i][1] for i in plan], use_tqdm=False, request_ids=ids
            )

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
        for k, (i, output) in enumerate(zip(plans[name], outputs, strict=True)):
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
        assert no_request_state(client.debug_state())
    assert os.stat(server.address[len("ipc://") :]).st_mode & 0o777 == 0o600


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
    for g, w in zip(got[:4], want[:4], strict=True):
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
        assert no_request_state(await wait_state(client, no_request_state))


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
        state = await wait_state(client, lambda s: s.all_worker_requests == 1)
        assert state.all_server_requests == 1, state
        # another session's request is counted, never named
        assert state.worker_request_ids == [] and state.server_request_ids == [], state
        t0 = time.monotonic()
        dying.kill()
        dying.wait()
        state = await wait_state(client, no_request_state)
        assert no_request_state(state), state
        assert time.monotonic() - t0 < 2.0  # the disconnect, not the 3 s heartbeat timeout, freed it

        # a client that stays connected but silent (hung) is dropped after --client-timeout
        silent = RawPeer(server.address)
        try:
            assert isinstance(silent.hello(), Welcome)
            silent.send(Generate(request_id="hung", params=LONG, prompt="hung"))
            silent.recv_until(Output)
            t0 = time.monotonic()
            assert (await client.debug_state()).all_worker_requests == 1
            state = await wait_state(client, no_request_state, timeout=10)
            assert no_request_state(state) and time.monotonic() - t0 > 1.5, state
            silent.send(Ping(1))
            assert silent.recv_until(Error).code == "no_session"
        finally:
            silent.close()


# -- hostile input -----------------------------------------------------------------------------------
TAGS = ["hello", "generate", "abort", "ping", "state_query", "goodbye", "launch", ""]
JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
TAGGED = st.builds(
    lambda tag, fields: {"type": tag, **fields},
    st.sampled_from(TAGS),
    st.dictionaries(
        st.sampled_from(["request_id", "params", "prompt", "seq", "protocol_version", "auth_token", "stream"]),
        JUNK,
        max_size=4,
    ),
)
FRAMES = st.one_of(
    st.lists(st.binary(max_size=300), min_size=1, max_size=3),
    JUNK.map(lambda v: [msgspec.msgpack.encode(v)]),
    TAGGED.map(lambda v: [msgspec.msgpack.encode(v)]),
)


def test_fuzzed_and_malformed_messages_get_errors_and_the_server_keeps_serving(server):
    greeted, stranger = RawPeer(server.address), RawPeer(server.address)
    try:
        welcome = greeted.hello()
        assert isinstance(welcome, Welcome) and "/" not in welcome.model  # no server paths

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
        # strict decoding: a misspelt field, an unknown output type, a field of another family
        typo = {"type": "generate", "request_id": "typo", "params": {"num_inference_stpes": 3}, "prompt": "x"}
        greeted.send_raw([msgspec.msgpack.encode(typo)])
        rejected = greeted.recv_until(Rejected)
        assert rejected.request_id == "typo" and "unknown field `num_inference_stpes`" in rejected.error, rejected
        greeted.send(Generate(request_id="bogus", params=SamplingParams(output_type="bogus"), prompt="x"))
        rejected = greeted.recv_until(Rejected)
        assert rejected.kind == "invalid" and "output_type must be one of" in rejected.error, rejected
        greeted.send(Generate(request_id="label", params=SamplingParams(), prompt="x", class_label=3))
        rejected = greeted.recv_until(Rejected)
        assert rejected.kind == "invalid" and "class_label is not an input" in rejected.error, rejected
        # one client's requests in flight are capped; the others' are not affected
        for i in range(PER_CLIENT):
            greeted.send(Generate(request_id=f"many-{i}", params=LONG, prompt="x", stream=False))
        greeted.send(Generate(request_id="one-too-many", params=LONG, prompt="x"))
        rejected = greeted.recv_until(Rejected)
        assert rejected.request_id == "one-too-many" and rejected.kind == "overloaded", rejected
        assert f"max_requests_per_client={PER_CLIENT}" in rejected.error
        for i in range(PER_CLIENT):
            greeted.send(Abort(f"many-{i}"))
        greeted.send_raw([b"x"] * 300)  # extra parts are dropped as they are read
        assert "got 300 frames" in greeted.recv_until(Error).error
        greeted.send(Generate(request_id="zero", params=SamplingParams(num_inference_steps=0), prompt="x"))
        rejected = greeted.recv_until(Rejected)
        assert rejected.kind == "invalid" and "num_inference_steps must be" in rejected.error
        greeted.send(Generate(request_id="twice", params=LONG, prompt="x"))
        greeted.send(Generate(request_id="twice", params=LONG, prompt="x"))
        assert greeted.recv_until(Rejected).kind == "duplicate"
        greeted.send(Abort("twice"))
        greeted.send_raw([b"\x00" * (MAX_CLIENT_MESSAGE_BYTES + 1)])
        assert greeted.recv_until(Error).code == "oversize"
        # far over the largest frame (an input image's): zmq cuts the peer off before buffering it
        greeted.send_raw([b"\x00" * (MAX_INPUT_BYTES + 8 * MAX_CLIENT_MESSAGE_BYTES)])
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
        (output,) = client.generate(
            "still serving", SamplingParams(num_inference_steps=2, height=32, width=32), use_tqdm=False
        )
        assert output.error is None
        state = client.debug_state()
        deadline = time.monotonic() + 10
        while not no_request_state(state) and time.monotonic() < deadline:
            time.sleep(0.1)
            state = client.debug_state()
        assert no_request_state(state), state


def test_clients_without_the_token_are_refused(server):
    with EngineClient(server.address, timeout_s=3) as client:
        assert client.health() is False
        with pytest.raises(ServerUnavailableError, match="authentication failed"):
            client.generate("x", SamplingParams(num_inference_steps=2), use_tqdm=False)


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


def test_errors_for_clients_name_files_but_no_server_paths():
    import traceback

    from engine.service.protocol import without_paths

    try:
        msgspec.msgpack.decode(b"\xc1")
    except msgspec.DecodeError:
        text = traceback.format_exc() + f"RuntimeError: out of memory (at {os.path.abspath(__file__)}:12)"
    redacted = without_paths(text)
    assert os.path.dirname(os.path.abspath(__file__)) not in redacted and "site-packages" not in redacted
    assert "test_server.py:12)" in redacted and "1/2 of the steps" in without_paths("1/2 of the steps")
