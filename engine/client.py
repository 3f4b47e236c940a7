"""Clients of the engine server: `AsyncEngineClient` (shaped like AsyncEngine) and
`EngineClient` (shaped like Omni), so code moves between the embedded engine and a shared
server by changing one constructor.

A client is one DEALER socket and one session on the server. It validates each request before
sending it (a bad one fails alone, with the message Omni gives), pings the server every second
and fails its requests with `ServerUnavailableError` when the connection drops (socket monitor)
or the server stops answering (heartbeat timeout), so a dead server never leaves a caller
waiting. `EngineClient` runs an AsyncEngineClient on a private event-loop thread, which also
keeps its heartbeats going while the caller blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from typing import AsyncIterator, Sequence

import msgspec
import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from engine.async_engine import RequestStream
from engine.core import normalize_prompt
from engine.omni import pair_prompts, progress_bar
from engine.outputs import RequestOutput, failed_output, to_images
from engine.sampling_params import SamplingParams
from engine.service_protocol import (
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
    ServerMessage,
    StateQuery,
    StateReply,
    Welcome,
    default_address,
    from_wire,
)
from engine.wire import Decoder, Encoder, WireError
from runner.executor import EngineDeadError

log = logging.getLogger("stepweave.client")

HEARTBEAT_S = 1.0


class ServerUnavailableError(EngineDeadError):
    """The server cannot be reached, refused this client, stopped answering or is shutting down."""


class _Stream(RequestStream):
    """One request's outputs as they arrive, under the caller's request id (the wire uses the
    client's own), with the output type to convert its images to."""

    def __init__(self, request_id: str, output_type: str):
        super().__init__(asyncio.get_running_loop())
        self.request_id = request_id
        self.output_type = output_type
        self.lost: ServerUnavailableError | None = None

    def fail(self, error: ServerUnavailableError) -> None:
        self.lost = error
        self.put(failed_output(self.request_id, str(error)))


class _Connection:
    """One socket and one server session; once lost it stays lost (the client opens a new one)."""

    def __init__(self, address: str, auth_token: str | None, timeout_s: float):
        self.address = address
        self.timeout_s = timeout_s
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            self.socket.connect(address)
        except zmq.ZMQError as exc:
            self.monitor.close(linger=0)
            self.socket.close(linger=0)
            self.context.term()
            raise ValueError(f"cannot connect to {address!r}: {exc} (expected ipc://PATH or tcp://HOST:PORT)") from None
        self.encoder = Encoder()
        self.decoder = Decoder(ServerMessage, max_frames=2)  # an output and its images
        self.streams: dict[str, _Stream] = {}  # wire request id -> stream
        self.replies: dict[int, asyncio.Future] = {}  # ping / state query seq -> reply
        self.loop = asyncio.get_running_loop()
        self.welcome: asyncio.Future = self.loop.create_future()
        self.lost: ServerUnavailableError | None = None
        self.last_heard = time.monotonic()
        self._seqs = itertools.count(1)
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch())]
        self._heartbeat_started = False
        self.post(Hello(protocol_version=PROTOCOL_VERSION, auth_token=auth_token))

    async def ready(self) -> Welcome:
        """The server's Welcome; raises ServerUnavailableError when there is none in time."""
        try:
            welcome = await asyncio.wait_for(asyncio.shield(self.welcome), self.timeout_s)
        except asyncio.TimeoutError:
            self.close(ServerUnavailableError(f"no stepweave server answered at {self.address} within {self.timeout_s:g} s"))
            raise self.lost from None
        if not self._heartbeat_started:
            self._heartbeat_started = True
            self._tasks.append(asyncio.create_task(self._heartbeat(min(HEARTBEAT_S, welcome.client_timeout_s / 4))))
        return welcome

    # -- sending -----------------------------------------------------------------------------
    def post(self, message: msgspec.Struct) -> None:
        self.send(self.encoder.encode(message))

    def send(self, frames: list) -> None:
        """Queue frames for the server (a DEALER queues while connecting; never blocks here)."""
        if self.lost is None:
            self.socket.send_multipart(frames, copy=False).add_done_callback(_consume)

    async def query(self, make) -> msgspec.Struct:
        """Send make(seq) and wait for the reply carrying that seq."""
        seq = next(self._seqs)
        future = asyncio.get_running_loop().create_future()
        self.replies[seq] = future
        self.post(make(seq))
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        finally:
            self.replies.pop(seq, None)

    # -- receiving ---------------------------------------------------------------------------
    async def _read(self) -> None:
        try:
            while True:
                frames = await self.socket.recv_multipart(copy=False)
                self.last_heard = time.monotonic()
                try:
                    message = self.decoder.decode(frames)
                except WireError as exc:
                    log.warning("ignoring an undecodable message from the server: %s", exc)
                    continue
                self._dispatch(message)
        except zmq.ZMQError as exc:
            self.close(ServerUnavailableError(f"connection to the stepweave server at {self.address} failed: {exc}"))

    def _dispatch(self, message) -> None:
        if isinstance(message, Output):
            stream = self.streams.get(message.request_id)
            if stream is None:  # aborted or abandoned here already
                return
            images = message.images
            if images is not None and not isinstance(images, np.ndarray):
                images = None
                message = Output(request_id=message.request_id, step=0, num_steps=0, finished=True, error="server sent a malformed image frame")
            elif images is not None:
                images = to_images(images, stream.output_type)
            if message.finished:
                del self.streams[message.request_id]
            message.request_id = stream.request_id
            stream.put(from_wire(message, images))
        elif isinstance(message, Rejected):
            stream = self.streams.pop(message.request_id, None)
            if stream is not None:
                stream.reject(self._rejection(message))
        elif isinstance(message, (Pong, StateReply)):
            future = self.replies.get(message.seq)
            if future is not None and not future.done():
                future.set_result(message)
        elif isinstance(message, Welcome):
            if not self.welcome.done():
                self.welcome.set_result(message)
        elif isinstance(message, Error):
            self._error(message)

    def _rejection(self, message: Rejected) -> BaseException:
        if message.kind in ("invalid", "duplicate"):
            return ValueError(message.error)
        if message.kind == "dead":
            return EngineDeadError(message.error)
        if message.kind == "shutting_down":
            return ServerUnavailableError(f"stepweave server at {self.address}: {message.error}")
        return RuntimeError(f"request rejected ({message.kind}): {message.error}")

    def _error(self, message: Error) -> None:
        if message.code in ("version", "auth"):
            self.close(ServerUnavailableError(f"stepweave server at {self.address} refused this client: {message.error}"))
        elif message.code == "no_session":
            self.close(ServerUnavailableError(f"stepweave server at {self.address} dropped this client's session (it restarted, or missed our heartbeats)"))
        elif message.seq is not None and message.seq in self.replies:
            future = self.replies[message.seq]
            if not future.done():
                future.set_exception(RuntimeError(message.error))
        else:
            log.warning("server error (%s): %s", message.code, message.error)

    async def _watch(self) -> None:
        """The transport's own word that the server went away (closed socket, dead process)."""
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.close(ServerUnavailableError(f"lost the connection to the stepweave server at {self.address}"))
                return

    async def _heartbeat(self, period: float) -> None:
        """Tell the server we are alive; notice a server that stopped answering (hung, stopped,
        or partitioned away without the transport noticing)."""
        while True:
            await asyncio.sleep(period)
            silent = time.monotonic() - self.last_heard
            if silent > self.timeout_s:
                self.close(ServerUnavailableError(f"stepweave server at {self.address} stopped answering: nothing received for {silent:.1f} s"))
                return
            self.post(Ping(0))

    # -- ending ------------------------------------------------------------------------------
    def close(self, error: ServerUnavailableError, goodbye: bool = False) -> None:
        """End the connection: every open request ends with `error`."""
        if self.lost is not None:
            return
        linger = 0
        if goodbye and self.welcome.done() and not self.welcome.exception():
            self.post(Goodbye())
            linger = 500
        self.lost = error
        for stream in self.streams.values():
            stream.fail(error)
        self.streams.clear()
        for future in [*self.replies.values(), self.welcome]:
            if not future.done():
                future.set_exception(error)
        if not self.welcome.cancelled():
            self.welcome.exception()  # mark it retrieved: nobody may be waiting for it any more
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=linger)
        self.context.term()

    def abandon(self) -> None:
        """Drop a connection whose event loop is gone: its sockets close (the server sees the
        disconnect and aborts its requests); its tasks died with their loop."""
        if self.lost is None:
            self.lost = ServerUnavailableError("connection abandoned: the client moved to another event loop")
            self.streams.clear()
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.socket.close(linger=0)
            self.context.term()


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("send failed: %s", future.exception())


class AsyncEngineClient:
    """Like AsyncEngine, over the server: `generate` yields progress then the final output;
    breaking out of it or `abort` ends the request on the server too."""

    def __init__(self, address: str | None = None, auth_token: str | None = None, *, timeout_s: float = 10.0):
        self.address = address or default_address()
        self.auth_token = auth_token
        self.timeout_s = timeout_s
        self._conn: _Connection | None = None
        self._wire_ids = itertools.count()
        self._active: dict[str, tuple[_Connection, str]] = {}  # caller's request id -> where it runs
        self._check = msgspec.msgpack.Decoder(ClientMessage)
        self._closed = False

    # -- public API --------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | dict,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield progress outputs (step k of n), then the final output with images. ValueError
        for a bad request; ServerUnavailableError when the server cannot be reached."""
        conn, wire_id, stream = await self._submit(prompt, sampling_params, request_id, stream=True)
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            self._end(stream.request_id, conn, wire_id, finished)

    async def abort(self, request_id: str) -> None:
        """End a request now: its stream yields a final output with error "request aborted"."""
        entry = self._active.pop(request_id, None)
        if entry is None:
            return
        conn, wire_id = entry
        stream = conn.streams.pop(wire_id, None)
        conn.post(Abort(wire_id))
        if stream is not None:
            stream.put(RequestOutput(request_id, 0, 0, finished=True, error="request aborted"))

    async def health(self) -> bool:
        """True when the server answers and takes new requests (False while it drains)."""
        try:
            conn = await self._connection()
            pong = await conn.query(Ping)
        except (ServerUnavailableError, asyncio.TimeoutError):
            return False
        return pong.serving

    async def debug_state(self) -> StateReply:
        """Request ids the workers and the server still hold (all clients'; for tests/debugging)."""
        conn = await self._connection()
        return await conn.query(StateQuery)

    async def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close(ServerUnavailableError("client closed"), goodbye=True)
            self._conn = None
        self._active.clear()

    async def __aenter__(self) -> "AsyncEngineClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- internals ---------------------------------------------------------------------------
    async def _connection(self) -> _Connection:
        if self._closed:
            raise RuntimeError("client is closed")
        if self._conn is not None and self._conn.loop is not asyncio.get_running_loop():
            self._conn.abandon()  # used from a new event loop (e.g. a second asyncio.run)
        if self._conn is None or self._conn.lost is not None:
            self._conn = _Connection(self.address, self.auth_token, self.timeout_s)
        conn = self._conn
        await conn.ready()
        return conn

    async def _submit(self, prompt, params, request_id, stream: bool) -> tuple[_Connection, str, _Stream]:
        conn = await self._connection()
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        if request_id in self._active:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        wire_id = str(next(self._wire_ids))
        params, frames = self._encode(conn, prompt, params, wire_id, stream)
        request_stream = _Stream(request_id, params.output_type)
        conn.streams[wire_id] = request_stream
        self._active[request_id] = (conn, wire_id)
        conn.send(frames)
        return conn, wire_id, request_stream

    def _encode(self, conn: _Connection, prompt, params, wire_id: str, stream: bool) -> tuple[SamplingParams, list]:
        """Validate here what needs no model (same messages as Omni), and check the message is
        one the server's typed decoder accepts, so a bad request fails alone."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        fields = normalize_prompt(prompt)
        params.validate()
        message = Generate(request_id=wire_id, params=params, stream=stream, **fields)
        try:
            frames = conn.encoder.encode(message)
            if len(frames) != 1:
                raise TypeError("arrays cannot be sent inside a request")
            self._check.decode(frames[0])
        except (TypeError, ValueError, OverflowError, msgspec.MsgspecError) as exc:
            raise ValueError(f"request cannot be sent to the server: {exc}") from None
        limit = conn.welcome.result().max_message_bytes
        if len(frames[0]) > limit:
            raise ValueError(f"request is {len(frames[0])} bytes; the server accepts at most {limit}")
        return params, frames

    def _end(self, request_id: str, conn: _Connection, wire_id: str, finished: bool) -> None:
        if self._active.get(request_id) == (conn, wire_id):
            del self._active[request_id]
        if conn.streams.pop(wire_id, None) is not None and not finished:
            conn.post(Abort(wire_id))

    async def _final(self, prompt, params, request_id: str) -> RequestOutput:
        """One request's final output, Omni-style: a bad request becomes an output with error;
        losing the server raises."""
        try:
            conn, wire_id, stream = await self._submit(prompt, params, request_id, stream=False)
        except ValueError as exc:
            return failed_output(request_id, f"ValueError: {exc}")
        finished = False
        try:
            output = await stream.get()
            finished = True
        except ValueError as exc:
            return failed_output(request_id, f"ValueError: {exc}")
        finally:
            self._end(request_id, conn, wire_id, finished)
        if stream.lost is not None:
            raise stream.lost
        return output

    async def _generate_all(self, prompts: list, params_list: list, request_ids: list[str], on_done=None) -> list[RequestOutput]:
        async def one(prompt, params, request_id):
            output = await self._final(prompt, params, request_id)
            if on_done is not None:
                on_done()
            return output

        tasks = [asyncio.ensure_future(one(*args)) for args in zip(prompts, params_list, request_ids)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # on error or cancellation: abort what still runs
                task.cancel()


class EngineClient:
    """Like Omni, over the server: `generate` returns final outputs in input order."""

    def __init__(self, address: str | None = None, auth_token: str | None = None, *, timeout_s: float = 10.0):
        self._client = AsyncEngineClient(address, auth_token, timeout_s=timeout_s)
        self.address = self._client.address
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stepweave-client", daemon=True)
        self._thread.start()
        self._closed = False

    def generate(
        self,
        prompts: str | dict | Sequence[str | dict],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        request_ids: Sequence[str] | None = None,
    ) -> list[RequestOutput]:
        """Submit every prompt at once; bad ones come back as outputs with `error` set.
        `request_ids` (optional) lets another thread `abort` one of them."""
        prompts, params_list = pair_prompts(prompts, sampling_params)
        if request_ids is None:
            request_ids = [f"req-{next(self._ids)}" for _ in prompts]
        elif len(request_ids) != len(prompts):
            raise ValueError(f"request_ids has {len(request_ids)} entries but there are {len(prompts)} prompts")
        bar = progress_bar(len(prompts), use_tqdm)
        try:
            return self._call(self._client._generate_all(prompts, params_list, list(request_ids), bar.update if bar else None))
        finally:
            if bar is not None:
                bar.close()

    def abort(self, request_id: str) -> None:
        self._call(self._client.abort(request_id))

    def health(self) -> bool:
        return self._call(self._client.health())

    def debug_state(self) -> StateReply:
        return self._call(self._client.debug_state())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._call(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> "EngineClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, coro):
        if self._closed and self._loop.is_closed():
            coro.close()
            raise RuntimeError("client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C or an error: the loop cancels the call, aborting its requests
            raise
