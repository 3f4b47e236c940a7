"""The engine as a service: one AsyncEngine behind a ZeroMQ ROUTER socket.

`stepweave serve` runs this. Each client (a DEALER) opens a session with a versioned `Hello`;
its request ids are namespaced by the session on the server, so clients never see or touch each
other's requests. Every request becomes one task iterating `AsyncEngine.generate` and sending
its outputs back; scheduling, batching and backpressure stay in the engine. Whatever arrives is
decoded with types and size-checked; anything else gets an error reply or is dropped, never a
crash. A client that disconnects or stops sending heartbeats has its requests aborted: the
socket monitor reports every dropped connection, and with ROUTER_MANDATORY a probe to each
session then tells which peer is gone (ZMQ_ROUTER_NOTIFY would name it directly, but it is a
draft option that stock libzmq builds lack). SIGTERM stops taking requests, lets running ones
finish for up to the drain timeout, aborts the rest and shuts the engine's workers down. A dead
engine stops the server with exit code 1.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import itertools
import logging
import signal
import time
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from engine.async_engine import AsyncEngine
from engine.contract.errors import EngineDeadError
from engine.contract.input_images import MAX_INPUT_BYTES
from engine.contract.request_fields import PROMPT_KEYS
from engine.contract.wire import Decoder, Encoder, WireError
from engine.service.address import bind_local, check_bind_address, default_address, load_server_keys, remove_ipc_file
from engine.service.protocol import (
    MAX_CLIENT_FRAMES,
    MAX_CLIENT_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Abort,
    ClientMessage,
    Error,
    Generate,
    Goodbye,
    Hello,
    Output,
    Ping,
    Pong,
    Rejected,
    RequestRef,
    StateQuery,
    StateReply,
    Welcome,
    oversize_error,
    to_wire,
    without_paths,
)

log = logging.getLogger("stepweave.server")

# Room for msgpack framing above max_message_bytes before zmq cuts a peer off.
FRAME_SLACK_BYTES = 4096

# Requests one client may have in flight (waiting or running) at once; with admission taking
# turns between clients, this bounds how much of the queue a single client can hold.
DEFAULT_MAX_REQUESTS_PER_CLIENT = 256


class Session:
    """One connected client: its routing identity, namespace and running requests."""

    def __init__(self, identity: bytes, sid: str, now: float):
        self.identity = identity
        self.sid = sid
        self.last_seen = now
        self.requests: dict[str, asyncio.Task] = {}  # the client's request id -> its task


class EngineServer:
    """Serves one AsyncEngine to many clients on one ROUTER socket, from one event loop."""

    def __init__(
        self,
        engine: AsyncEngine,
        address: str | None = None,
        *,
        auth_token: str | None = None,
        curve_secret_key: str | Path | None = None,
        client_timeout_s: float = 15.0,
        drain_timeout_s: float = 30.0,
        max_message_bytes: int = MAX_CLIENT_MESSAGE_BYTES,
        max_requests_per_client: int = DEFAULT_MAX_REQUESTS_PER_CLIENT,
    ):
        self.address = address or default_address()
        local = check_bind_address(self.address, auth_token)
        self.curve_keys = None if curve_secret_key is None else load_server_keys(curve_secret_key)
        if not local and self.curve_keys is None:
            log.warning(
                "%s is reachable from other machines and unencrypted: the auth token and every image travel "
                "in the clear (pass --curve-secret-key, see `stepweave keygen`)",
                self.address,
            )
        self.engine = engine
        self.model = engine.core.model_name  # what clients are told: no server paths
        self.auth_token = auth_token
        self.client_timeout_s = client_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.max_message_bytes = max_message_bytes
        limit = max_requests_per_client
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_requests_per_client must be a positive integer, got {limit!r}")
        self.max_requests_per_client = max_requests_per_client
        self.bound_address: str | None = None
        self._sessions: dict[bytes, Session] = {}
        self._sids = itertools.count()
        self._encoder = Encoder()
        self._decoder = Decoder(ClientMessage, max_frames=MAX_CLIENT_FRAMES)
        self._ref_decoder = msgspec.msgpack.Decoder(RequestRef)
        self._draining = False
        self.other_requests: set[asyncio.Task] = set()  # another front door's (the HTTP API's): drained too
        self.exit_code = 0
        self._stop: asyncio.Event | None = None
        self._socket: zmq.asyncio.Socket | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Begin the graceful shutdown (what SIGTERM and SIGINT do)."""
        if self._stop is not None and not self._stop.is_set():
            log.info("shutdown requested: draining in-flight requests (up to %.0f s)", self.drain_timeout_s)
            self._draining = True
            self._stop.set()

    async def serve(self) -> None:
        """Bind, serve until request_stop(), drain, shut the engine down."""
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (RuntimeError, ValueError):  # not the main thread (embedded): no signals
                pass
        context = zmq.asyncio.Context()
        self._socket = context.socket(zmq.ROUTER)
        try:
            self._bind(self._socket)
            if self.curve_keys is not None:
                log.info("CURVE encryption on; clients pin the server key %s", self.curve_keys[0].decode())
            ready = "stepweave server ready: serving %s on %s (protocol %d)"
            log.info(ready, self.model, self.bound_address, PROTOCOL_VERSION)
            monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            tasks = [
                asyncio.create_task(self._receive_loop()),
                asyncio.create_task(self._reap_silent_sessions()),
                asyncio.create_task(self._watch_disconnects(monitor)),
                asyncio.create_task(self._watch_engine()),
            ]
            await self._stop.wait()
            await self._drain()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._socket.disable_monitor()
            monitor.close(linger=0)
        finally:
            await loop.run_in_executor(None, self.engine.shutdown)
            self._socket.close(linger=1000)  # let the last outputs and errors go out
            context.term()
            if self.bound_address is not None:  # ours, not another server's
                remove_ipc_file(self.address)
            log.info("stepweave server stopped; engine shut down")

    def _bind(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop a final output to a slow (but live) client
        # A frame larger than this (an input image's may reach MAX_INPUT_BYTES) cuts the peer off
        # inside zmq before it is buffered; the receive loop drops parts beyond MAX_CLIENT_FRAMES.
        sock.setsockopt(zmq.MAXMSGSIZE, max(self.max_message_bytes, MAX_INPUT_BYTES) + FRAME_SLACK_BYTES)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a gone peer fails: how we find it
        if self.curve_keys is not None:
            sock.curve_publickey, sock.curve_secretkey = self.curve_keys
            sock.curve_server = True
        self.bound_address = bind_local(sock, self.address)

    async def _watch_engine(self) -> None:
        """A dead engine (a worker crashed) cannot serve again: stop with exit code 1, so that a
        supervisor restarts the service, instead of refusing every request from now on."""
        while not self.engine.is_dead:
            await asyncio.sleep(0.5)
        log.error("the engine died; stopping the server (exit code 1) so it can be restarted")
        self.exit_code = 1
        self.request_stop()

    async def _drain(self) -> None:
        tasks = [t for s in self._sessions.values() for t in s.requests.values()] + list(self.other_requests)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.drain_timeout_s)
            error = f"server shut down before the request finished (drain timeout {self.drain_timeout_s:g} s)"
            for task in pending:
                task.cancel()  # its engine request (a client's or the HTTP API's) is aborted as the task unwinds
            for session in list(self._sessions.values()):
                for request_id, task in list(session.requests.items()):
                    if task in pending:
                        self._post(
                            session.identity,
                            Output(request_id=request_id, step=0, num_steps=0, finished=True, error=error),
                        )
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:
                log.info("aborted %d request(s) still running after the drain timeout", len(pending))

    # -- receiving ---------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        while True:
            frames = await self._receive_frames()
            try:
                self._handle(frames)
            except Exception:  # a bug handling one message must not take the server down
                log.exception("error handling a client message")

    async def _receive_frames(self) -> list:
        """The identity, up to MAX_CLIENT_FRAMES body frames (a message and its input images),
        and the count of the rest (dropped unread)."""
        frames = [await self._socket.recv(copy=False)]
        extra = 0
        while self._socket.getsockopt(zmq.RCVMORE):
            frame = await self._socket.recv(copy=False)
            if len(frames) <= MAX_CLIENT_FRAMES:
                frames.append(frame)
            else:
                extra += 1
        frames.append(extra)
        return frames

    def _handle(self, frames: list) -> None:
        identity, body, extra = frames[0].bytes, frames[1:-1], frames[-1]
        if not body or extra:
            error = f"expected a message of 1 to {MAX_CLIENT_FRAMES} frames, got {len(body) + extra} frames"
            self._post(identity, Error(code="malformed", error=error))
            return
        if (oversize := oversize_error(body, self.max_message_bytes)) is not None:
            self._post(identity, Error(code="oversize", error=oversize))
            return
        session = self._sessions.get(identity)
        try:
            message = self._decoder.decode(body)
        except WireError as exc:
            self._reject_malformed(identity, session, body[0], exc)
            return
        if isinstance(message, Hello):
            self._hello(identity, session, message)
            return
        if session is None:
            self._post(
                identity, Error(code="no_session", error="no session: send Hello first (or this server restarted)")
            )
            return
        session.last_seen = time.monotonic()
        if isinstance(message, Generate):
            self._generate(session, message)
        elif isinstance(message, Abort):
            task = session.requests.pop(message.request_id, None)
            if task is not None:  # the client already ended its stream; no reply needed
                task.cancel()
        elif isinstance(message, Ping):
            self._post(identity, Pong(message.seq, serving=self.serving))
        elif isinstance(message, StateQuery):
            asyncio.create_task(self._state(session, message.seq))
        elif isinstance(message, Goodbye):
            self._drop_session(identity, "client closed")

    def _reject_malformed(self, identity: bytes, session: Session | None, frame, exc: WireError) -> None:
        """Route the error to the request it names when possible, so that request fails alone."""
        try:
            ref = self._ref_decoder.decode(frame.buffer)
        except (msgspec.DecodeError, msgspec.ValidationError):
            ref = None
        if session is not None and ref is not None and ref.request_id not in session.requests:
            self._post(identity, Rejected(request_id=ref.request_id, kind="invalid", error=f"malformed request: {exc}"))
        else:
            self._post(identity, Error(code="malformed", error=str(exc)))

    def _hello(self, identity: bytes, session: Session | None, hello: Hello) -> None:
        if hello.protocol_version != PROTOCOL_VERSION:
            self._post(
                identity,
                Error(
                    code="version",
                    error=f"client speaks protocol {hello.protocol_version}; this server speaks {PROTOCOL_VERSION}",
                ),
            )
            return
        if self.auth_token is not None and not hmac.compare_digest(
            (hello.auth_token or "").encode(), self.auth_token.encode()
        ):
            self._post(identity, Error(code="auth", error="authentication failed: missing or wrong auth token"))
            return
        if session is None:
            session = Session(identity, f"c{next(self._sids)}", time.monotonic())
            self._sessions[identity] = session
        session.last_seen = time.monotonic()
        welcome = Welcome(
            protocol_version=PROTOCOL_VERSION,
            model=self.model,
            client_timeout_s=self.client_timeout_s,
            max_message_bytes=self.max_message_bytes,
        )
        self._post(identity, welcome)

    @property
    def serving(self) -> bool:
        return not self._draining and not self.engine.is_dead

    # -- requests ----------------------------------------------------------------------------
    def _generate(self, session: Session, message: Generate) -> None:
        request_id = message.request_id
        refusal = None
        if self._draining:
            refusal = "shutting_down", "server is shutting down; not taking new requests"
        elif request_id in session.requests:
            refusal = "duplicate", f"request_id {request_id!r} is already in flight"
        elif len(session.requests) >= self.max_requests_per_client:
            refusal = (
                "overloaded",
                (
                    f"this client already has {len(session.requests)} requests in flight "
                    f"(max_requests_per_client={self.max_requests_per_client})"
                ),
            )
        if refusal is not None:
            self._post(session.identity, Rejected(request_id=request_id, kind=refusal[0], error=refusal[1]))
        else:
            session.requests[request_id] = asyncio.create_task(self._run_request(session, message))

    async def _run_request(self, session: Session, message: Generate) -> None:
        """Stream one request's outputs to its client. Images always come back as float arrays
        (one zero-copy frame); the client turns them into what the request asked for."""
        request_id, identity = message.request_id, session.identity
        prompt = {key: getattr(message, key) for key in PROMPT_KEYS}
        started, outcome, steps = time.monotonic(), "aborted", 0
        try:
            message.params.validate()  # as the client sent them: output_type is replaced just below
            params = msgspec.structs.replace(message.params, output_type="np")
            stream = self.engine.generate(prompt, params, request_id=f"{session.sid}:{request_id}", client=session.sid)
            async for output in stream:
                steps = output.step
                if output.finished:
                    outcome = "ok" if output.error is None else f"failed: {output.error}"
                    outcome = "aborted" if output.error == "request aborted" else outcome
                if output.finished or message.stream:
                    self._post(identity, to_wire(output, request_id))
        except (ValueError, RuntimeError) as exc:  # bad request, dead engine, engine shut down
            outcome = f"rejected: {exc}"
            kind = "invalid" if isinstance(exc, ValueError) else "dead"
            if not isinstance(exc, (ValueError, EngineDeadError)):
                kind = "shutting_down"
            self._post(identity, Rejected(request_id=request_id, kind=kind, error=str(exc)))
        except Exception as exc:  # a bug here must still end the client's request, not hang it
            log.exception("request %s of session %s failed", request_id, session.sid)
            error = f"internal server error: {type(exc).__name__}: {exc}"
            outcome = f"failed: {error}"
            self._post(identity, Output(request_id=request_id, step=0, num_steps=0, finished=True, error=error))
        finally:
            if session.requests.get(request_id) is asyncio.current_task():
                del session.requests[request_id]
            log.info(
                "request %s client %s: %d/%d steps, %.2f s, %s",
                request_id,
                session.sid,
                steps,
                message.params.num_inference_steps,
                time.monotonic() - started,
                outcome,
            )

    async def _state(self, session: Session, seq: int) -> None:
        try:
            worker_ids = await self.engine.worker_state_ids()
        except Exception as exc:
            self._post(session.identity, Error(code="state", error=f"{type(exc).__name__}: {exc}", seq=seq))
            return
        # A session sees only its own requests, by the ids it chose (the engine's ids carry the
        # session's namespace).
        prefix = f"{session.sid}:"
        own = sorted({wid[len(prefix) :] for wid in worker_ids if wid.startswith(prefix)})
        reply = StateReply(
            seq=seq,
            worker_request_ids=own,
            server_request_ids=sorted(session.requests),
            sessions=len(self._sessions),
            all_worker_requests=len(worker_ids),
            all_server_requests=sum(len(s.requests) for s in self._sessions.values()),
        )
        self._post(session.identity, reply)

    # -- sessions ----------------------------------------------------------------------------
    def _drop_session(self, identity: bytes, reason: str) -> None:
        session = self._sessions.pop(identity, None)
        if session is None:
            return
        if session.requests:
            log.info("session %s: %s; aborting %d request(s)", session.sid, reason, len(session.requests))
        for task in session.requests.values():
            task.cancel()
        session.requests.clear()

    async def _watch_disconnects(self, monitor: zmq.asyncio.Socket) -> None:
        """On every dropped connection, probe each session: the send to the peer that left
        fails (ROUTER_MANDATORY) and that session's requests are aborted at once."""
        while True:
            await monitor.recv_multipart()
            for _ in range(2):  # once now, once after the pipe's teardown surely finished
                for session in list(self._sessions.values()):
                    # Pong(0) is what every heartbeat gets anyway: live clients ignore it
                    self._post(session.identity, Pong(0, serving=self.serving))
                await asyncio.sleep(0.05)

    async def _reap_silent_sessions(self) -> None:
        """Clients ping every second or so; one silent for client_timeout_s is gone (hung,
        partitioned, or died without the transport noticing)."""
        period = min(1.0, self.client_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            deadline = time.monotonic() - self.client_timeout_s
            for session in [s for s in self._sessions.values() if s.last_seen < deadline]:
                self._drop_session(session.identity, f"no heartbeat for {self.client_timeout_s:g} s")

    def _post(self, identity: bytes, message: msgspec.Struct) -> None:
        """Queue one message for one client (never blocks: no send high-water mark). A peer
        that is gone makes the send fail; its session, if any, ends. Errors name no server paths
        (tracebacks and exception messages from workers are cut to file names)."""
        if getattr(message, "error", None):
            message = msgspec.structs.replace(message, error=without_paths(message.error))
        frames = self._encoder.encode(message)
        try:
            future = self._socket.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError as exc:
            self._send_failed(identity, exc)
            return
        future.add_done_callback(functools.partial(self._sent, identity))

    def _sent(self, identity: bytes, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._send_failed(identity, future.exception())

    def _send_failed(self, identity: bytes, exc: BaseException) -> None:
        if isinstance(exc, zmq.ZMQError) and exc.errno == zmq.EHOSTUNREACH:
            self._drop_session(identity, "client disconnected")
        else:
            log.warning("could not send to a client: %s", exc)
