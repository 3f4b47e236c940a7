"""Clients of the engine server: `AsyncEngineClient` (shaped like AsyncEngine) and
`EngineClient` (shaped like Omni), so code moves between the embedded engine and a shared
server by changing one constructor.

A client holds one `ServerConnection` (a session on the server). It validates each request
before sending it, so a bad one fails alone with the message Omni gives. `EngineClient` runs an
AsyncEngineClient on a private event-loop thread, which also keeps its heartbeats going while
the caller blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from pathlib import Path
from typing import AsyncIterator, Sequence

import msgspec

from engine.contract.errors import ServerUnavailableError
from engine.contract.outputs import RequestOutput, failed_output
from engine.contract.request_fields import pair_prompts, request_fields
from engine.contract.sampling_params import SamplingParams
from engine.generation_info import attach_generation_info
from engine.progress import progress_bar
from engine.service.address import default_address, load_public_key
from engine.service.connection import ClientStream, ServerConnection
from engine.service.protocol import Abort, ClientMessage, Generate, Ping, StateQuery, StateReply

__all__ = ["AsyncEngineClient", "EngineClient", "ServerUnavailableError"]


class AsyncEngineClient:
    """Like AsyncEngine, over the server: `generate` yields progress then the final output;
    breaking out of it or `abort` ends the request on the server too."""

    def __init__(
        self,
        address: str | None = None,
        auth_token: str | None = None,
        *,
        server_key: str | bytes | Path | None = None,
        timeout_s: float = 10.0,
    ):
        """`server_key`: the server's CURVE public key (Z85 text or its certificate file) when it
        runs with --curve-secret-key; the traffic is then encrypted and only that server answers."""
        self.address = address or default_address()
        self.auth_token = auth_token
        self.server_key = None if server_key is None else load_public_key(server_key)
        self.timeout_s = timeout_s
        self._conn: ServerConnection | None = None
        self._wire_ids = itertools.count()
        self._active: dict[str, tuple[ServerConnection, str]] = {}  # caller's request id -> where it runs
        self._check = msgspec.msgpack.Decoder(ClientMessage)
        self._closed = False

    # -- public API --------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | dict,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        raise_when_lost: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Yield progress outputs (step k of n), then the final output with images. ValueError
        for a bad request; ServerUnavailableError when the server cannot be reached. A server
        lost mid-request ends the stream with a failed output, or, with `raise_when_lost`, raises
        ServerUnavailableError (a gateway tells a dead engine from a failed request that way)."""
        conn, wire_id, stream, settings = await self._submit(prompt, sampling_params, request_id, stream=True)
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                if finished and raise_when_lost and stream.lost is not None:
                    raise stream.lost
                if finished:
                    _attach_info(output, conn, settings)
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

    async def served_model(self) -> str:
        """The model the server named in its welcome (no server paths)."""
        conn = await self._connection()
        return conn.welcome.result().model

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
    async def _connection(self) -> ServerConnection:
        if self._closed:
            raise RuntimeError("client is closed")
        if self._conn is not None and self._conn.loop is not asyncio.get_running_loop():
            self._conn.abandon()  # used from a new event loop (e.g. a second asyncio.run)
        if self._conn is None or self._conn.lost is not None:
            self._conn = ServerConnection(self.address, self.auth_token, self.timeout_s, self.server_key)
        conn = self._conn
        await conn.ready()
        return conn

    async def _submit(
        self, prompt, params, request_id, stream: bool
    ) -> tuple[ServerConnection, str, ClientStream, tuple]:
        conn = await self._connection()
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        if request_id in self._active:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        wire_id = str(next(self._wire_ids))
        params, fields, frames = self._encode(conn, prompt, params, wire_id, stream)
        request_stream = ClientStream(request_id, params.output_type)
        conn.streams[wire_id] = request_stream
        self._active[request_id] = (conn, wire_id)
        conn.send(frames)
        return conn, wire_id, request_stream, (fields, params)

    def _encode(
        self, conn: ServerConnection, prompt, params, wire_id: str, stream: bool
    ) -> tuple[SamplingParams, dict, list]:
        """Validate here what needs no model (same messages as Omni), and check the message is
        one the server's typed decoder accepts, so a bad request fails alone."""
        params, fields = request_fields(prompt, params)
        message = Generate(request_id=wire_id, params=params, stream=stream, **fields)
        try:
            frames = conn.encoder.encode(message)  # input images: one zero-copy frame each
            self._check.decode(frames[0])
        except (TypeError, ValueError, OverflowError, msgspec.MsgspecError) as exc:
            raise ValueError(f"request cannot be sent to the server: {exc}") from None
        limit = conn.welcome.result().max_message_bytes
        if len(frames[0]) > limit:
            raise ValueError(f"request is {len(frames[0])} bytes; the server accepts at most {limit}")
        return params, fields, frames

    def _end(self, request_id: str, conn: ServerConnection, wire_id: str, finished: bool) -> None:
        if self._active.get(request_id) == (conn, wire_id):
            del self._active[request_id]
        if conn.streams.pop(wire_id, None) is not None and not finished:
            conn.post(Abort(wire_id))

    async def _final(self, prompt, params, request_id: str) -> RequestOutput:
        """One request's final output, Omni-style: a bad request becomes an output with error;
        losing the server raises."""
        try:
            conn, wire_id, stream, settings = await self._submit(prompt, params, request_id, stream=False)
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
        _attach_info(output, conn, settings)
        return output

    async def _generate_all(
        self, prompts: list, params_list: list, request_ids: list[str], on_done=None
    ) -> list[RequestOutput]:
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


def _attach_info(output: RequestOutput, conn: ServerConnection, settings: tuple) -> None:
    """The request's settings in its PIL images, with the model the server named in its welcome."""
    fields, params = settings
    attach_generation_info(output, fields, params, conn.welcome.result().model)


class EngineClient:
    """Like Omni, over the server: `generate` returns final outputs in input order."""

    def __init__(
        self,
        address: str | None = None,
        auth_token: str | None = None,
        *,
        server_key: str | bytes | Path | None = None,
        timeout_s: float = 10.0,
    ):
        self._client = AsyncEngineClient(address, auth_token, server_key=server_key, timeout_s=timeout_s)
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
            return self._call(
                self._client._generate_all(prompts, params_list, list(request_ids), bar.update if bar else None)
            )
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
