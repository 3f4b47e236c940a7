"""One client's session with the engine server: a DEALER socket, the handshake, heartbeats,
and the streams of the requests it carries.

Replies are routed by the client's own wire ids to per-request streams. The connection fails
every open stream with `ServerUnavailableError` as soon as it knows the server is gone: the
socket monitor reports a dropped connection, or nothing arrived for `timeout_s` although the
server answers every heartbeat. Once lost, a connection stays lost; the client opens a new one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import msgspec
import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from engine.contract.errors import EngineDeadError, OverloadedError, ServerUnavailableError
from engine.contract.outputs import failed_output, to_images
from engine.contract.wire import Decoder, Encoder, WireError
from engine.request_stream import RequestStream
from engine.service.protocol import (
    PROTOCOL_VERSION,
    Error,
    Goodbye,
    Hello,
    Output,
    Ping,
    Pong,
    Rejected,
    ServerMessage,
    StateReply,
    Welcome,
    from_wire,
)

log = logging.getLogger("stepweave.client")

HEARTBEAT_S = 1.0
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class ClientStream(RequestStream):
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


def video_and_images(message: Output, output_type: str) -> tuple:
    """(images, video frames) of an output as the request asked for them; (None, None) when neither
    came, or when what came is not one array of the expected rank: images (N, H, W, C), or a
    video's frames (F, H, W, C)."""
    images, frames = message.images, message.frames
    if images is not None and frames is not None:
        return None, None
    for value in (images, frames):
        if value is not None and (not isinstance(value, np.ndarray) or value.ndim != 4):
            return None, None
    return (
        None if images is None else to_images(images, output_type),
        None if frames is None else to_images(frames, output_type),
    )


class ServerConnection:
    """One socket and one server session; once lost it stays lost."""

    def __init__(self, address: str, auth_token: str | None, timeout_s: float, server_key: bytes | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if server_key is not None:  # CURVE: encrypt, and talk only to the server holding this key
            self.socket.curve_serverkey = server_key
            self.socket.curve_publickey, self.socket.curve_secretkey = zmq.curve_keypair()
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
        try:
            self.socket.connect(address)
        except zmq.ZMQError as exc:
            self.monitor.close(linger=0)
            self.socket.close(linger=0)
            self.context.term()
            raise ValueError(f"cannot connect to {address!r}: {exc} (expected ipc://PATH or tcp://HOST:PORT)") from None
        self.encoder = Encoder()
        self.decoder = Decoder(ServerMessage, max_frames=2)  # an output and its images or frames
        self.streams: dict[str, ClientStream] = {}  # wire request id -> stream
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
            self.close(
                ServerUnavailableError(f"no stepweave server answered at {self.address} within {self.timeout_s:g} s")
            )
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
            images, frames = video_and_images(message, stream.output_type)
            if images is None and frames is None and (message.images is not None or message.frames is not None):
                kind = "image" if message.images is not None else "video"
                message = Output(
                    request_id=message.request_id,
                    step=0,
                    num_steps=0,
                    finished=True,
                    error=f"server sent a malformed {kind} frame",
                )
            if message.finished:
                del self.streams[message.request_id]
            message.request_id = stream.request_id
            stream.put(from_wire(message, images, frames))
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
        if message.kind == "overloaded":
            return OverloadedError(message.error)
        if message.kind == "shutting_down":
            return ServerUnavailableError(f"stepweave server at {self.address}: {message.error}")
        return RuntimeError(f"request rejected ({message.kind}): {message.error}")

    def _error(self, message: Error) -> None:
        if message.code in ("version", "auth"):
            self.close(
                ServerUnavailableError(f"stepweave server at {self.address} refused this client: {message.error}")
            )
        elif message.code == "no_session":
            self.close(
                ServerUnavailableError(
                    f"stepweave server at {self.address} dropped this client's session "
                    "(it restarted, or missed our heartbeats)"
                )
            )
        elif message.seq is not None and message.seq in self.replies:
            future = self.replies[message.seq]
            if not future.done():
                future.set_exception(RuntimeError(message.error))
        else:
            log.warning("server error (%s): %s", message.code, message.error)

    async def _watch(self) -> None:
        """The transport's own word that the server went away (closed socket, dead process) or
        that the two ends disagree on encryption (it would otherwise look like a silent server)."""
        event = parse_monitor_message(await self.monitor.recv_multipart())["event"]
        if event & HANDSHAKE_FAILED:
            error = (
                f"security handshake with the server at {self.address} failed: it uses CURVE and this client "
                "has no server_key or a wrong one, or this client uses CURVE and the server does not"
            )
        else:
            error = f"lost the connection to the stepweave server at {self.address}"
        self.close(ServerUnavailableError(error))

    async def _heartbeat(self, period: float) -> None:
        """Tell the server we are alive; notice a server that stopped answering (hung, stopped,
        or partitioned away without the transport noticing)."""
        while True:
            await asyncio.sleep(period)
            silent = time.monotonic() - self.last_heard
            if silent > self.timeout_s:
                self.close(
                    ServerUnavailableError(
                        f"stepweave server at {self.address} stopped answering: nothing received for {silent:.1f} s"
                    )
                )
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
