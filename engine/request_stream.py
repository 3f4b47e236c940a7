"""RequestStream: the bounded buffer between the thread (or socket) that produces a request's
outputs and the coroutine that consumes them.

It keeps only the latest progress update (a slow consumer sees fewer, never stale ones) and the
final output, which is never dropped; both the embedded `AsyncEngine` and the remote clients use
it, so they stream the same way.
"""

from __future__ import annotations

import asyncio

from engine.contract.outputs import RequestOutput


class RequestStream:
    """Bounded per-request buffer: the latest progress update and the final output."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop  # the consumer's event loop; only it touches this stream
        self._progress: RequestOutput | None = None
        self._final: RequestOutput | None = None
        self._rejection: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        if output.finished:
            self._final = self._final or output
        else:
            self._progress = output
        self._ready.set()

    def reject(self, exc: BaseException) -> None:
        """The request never ran (e.g. a server refused it): the consumer's next get raises."""
        self._rejection = exc
        self._ready.set()

    async def get(self) -> RequestOutput:
        while True:
            if self._rejection is not None:
                raise self._rejection
            if self._progress is not None:
                output, self._progress = self._progress, None
                return output
            if self._final is not None:
                return self._final
            self._ready.clear()
            await self._ready.wait()
