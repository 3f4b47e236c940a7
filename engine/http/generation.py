"""One HTTP request's generation, run as a task of its own that feeds a queue of events.

The handler waits on the queue while a second task waits for the client to go away: a
disconnect cancels the generation at once (leaving the engine's stream aborts the request and
frees its worker state), whether or not the response had started. Outcomes become events the
handler turns into a response: progress, the final output, or an APIError.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import Request

from engine.contract.errors import EngineDeadError, OverloadedError
from engine.contract.outputs import RequestOutput
from engine.http.api_errors import from_validation, generation_failed, overloaded, unavailable
from engine.http.image_request import ImageRequest
from engine.request_outcome import outcome_of

log = logging.getLogger("stepweave.http")

PROGRESS, FINAL, ERROR, GONE = "progress", "final", "error", "gone"


class Generation:
    """Start generating now; read `events` for (kind, payload) pairs."""

    def __init__(self, backend, model: str, request: ImageRequest, http_request: Request):
        self.events: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run(backend, model, request))
        backend.track(self.task)
        self._watcher = asyncio.create_task(self._watch(http_request))

    async def next(self) -> tuple[str, object]:
        return await self.events.get()

    def close(self) -> None:
        """The response is done (or abandoned): stop watching, and abort what still runs."""
        self._watcher.cancel()
        self.task.cancel()

    async def _run(self, backend, model: str, request: ImageRequest) -> None:
        try:
            async for output in backend.generate(model, request.prompt, request.params):
                if output.finished:
                    self.events.put_nowait(_final(output))
                    return
                self.events.put_nowait((PROGRESS, output))
        except ValueError as exc:
            self.events.put_nowait((ERROR, from_validation(exc)))
        except OverloadedError as exc:
            self.events.put_nowait((ERROR, overloaded(str(exc))))
        except EngineDeadError as exc:
            self.events.put_nowait((ERROR, unavailable(str(exc))))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must still answer the client, not hang it
            log.exception("HTTP generation failed")
            self.events.put_nowait((ERROR, generation_failed(f"internal error: {type(exc).__name__}: {exc}")))

    async def _watch(self, http_request: Request) -> None:
        """The body is read, so the next ASGI message is the client going away."""
        while (await http_request.receive())["type"] != "http.disconnect":
            pass
        self.task.cancel()
        self.events.put_nowait((GONE, None))


def _final(output: RequestOutput) -> tuple[str, object]:
    outcome = outcome_of(output)
    if outcome == "ok":
        return FINAL, output
    if outcome == "overloaded":
        return ERROR, overloaded(output.error)
    if outcome == "aborted":
        return ERROR, unavailable(f"the server aborted the request ({output.error}); it is shutting down")
    return ERROR, generation_failed(output.error)
