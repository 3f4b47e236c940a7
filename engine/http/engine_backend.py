"""What the HTTP app generates with inside `stepweave serve`: the server's own AsyncEngine.

The HTTP API and the ZeroMQ server share one engine, so their requests share step batches and
one waiting queue; the server's drain waits for HTTP requests too, and its `serving` (not
draining, engine alive) is what /health reports.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from engine.async_engine import AsyncEngine
from engine.contract.errors import EngineDeadError
from engine.contract.outputs import RequestOutput
from engine.contract.request_fields import normalize_prompt
from engine.contract.sampling_params import SamplingParams
from engine.generation_info import attach_generation_info
from engine.service.server import EngineServer

HTTP_CLIENT = "http"  # the fair queue's name for every HTTP request


class EngineBackend:
    def __init__(self, engine: AsyncEngine, server: EngineServer | None = None):
        self.engine = engine
        self.server = server

    def models(self) -> list[str]:
        return [self.engine.core.model_name]

    @property
    def max_input_pixels(self) -> int:
        """Uploads larger than the engine takes are refused before they are decoded."""
        return self.engine.core.config.max_input_pixels

    @property
    def serving(self) -> bool:
        if self.server is not None:
            return self.server.serving
        return not self.engine.is_dead

    def track(self, task: asyncio.Task) -> None:
        """Let the server's drain wait for (and at its timeout, abort) this HTTP request."""
        if self.server is not None:
            self.server.other_requests.add(task)
            task.add_done_callback(self.server.other_requests.discard)

    async def generate(self, model: str, prompt: dict, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The engine's outputs; EngineDeadError when the request ended because the engine
        died or shut down (a 503, not a failed request)."""
        async for output in self.engine.generate(prompt, params, client=HTTP_CLIENT):
            if output.finished and output.error is not None and not self.serving:
                raise EngineDeadError(f"the engine stopped before the request finished: {output.error}")
            if output.finished:  # name the model as clients know it, never by its server path
                attach_generation_info(output, normalize_prompt(prompt), params, model)
            yield output
