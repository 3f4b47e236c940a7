"""AsyncEngine: concurrent requests from asyncio code, one stream of outputs per request.

The engine core runs in its own thread (like vLLM V1's EngineCore busy loop): it drains an
input queue of adds and aborts between steps, steps, and hands each step's outputs to the event
loop in one `call_soon_threadsafe`. The event loop therefore never blocks on a step, and new
requests and aborts arrive while steps run. Each request's stream buffers at most one progress
update (newer ones replace older ones when the consumer is slow) plus the final output, which is
never dropped. While idle, the core thread checks the workers twice a second, so a worker that
dies between requests is noticed (and, with `max_worker_restarts`, replaced) at once rather than
by the next request.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from typing import AsyncIterator

from engine.contract.config import EngineConfig
from engine.contract.errors import EngineDeadError
from engine.contract.outputs import RequestOutput
from engine.contract.sampling_params import SamplingParams
from engine.core.engine_core import EngineCore
from engine.request_stream import RequestStream

HEALTH_POLL_S = 0.5  # how often an idle engine checks that its workers are alive


class AsyncEngine:
    def __init__(self, model: str | EngineConfig = "tiny-qwen-image", **options):
        """`model` is a preset name, a diffusers directory or an EngineConfig; `options` are
        EngineConfig fields (max_num_seqs, parallel_config, executor, device, ...)."""
        self.core = EngineCore(EngineConfig.of(model, **options))
        self._inputs: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._thread: threading.Thread | None = None
        self._dead: str | None = None
        self._stopped = False
        self._queries: list[asyncio.Future] = []
        self._ensure_running()  # the core thread also watches the workers while idle

    # -- public API --------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | dict,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        client: str = "",
    ) -> AsyncIterator[RequestOutput]:
        """Yield progress outputs (step k of n), then the final output with images.
        Leaving the loop early (break, cancel, consumer gone) aborts the request. `client` names
        who asked (the server passes its session): admission takes turns between clients."""
        self._ensure_running()
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        request = self.core.make_request(prompt, sampling_params, request_id)
        request.client = client
        stream = RequestStream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._inputs.put(("add", request))
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            if not finished:
                self._inputs.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """End a request now: its stream yields a final output with error "request aborted"."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self._inputs.put(("abort", request_id))
        stream.put(RequestOutput(request_id, 0, 0, finished=True, error="request aborted"))

    async def worker_state_ids(self) -> list[str]:
        """Request ids the workers still hold state for, read between steps once no batch is in
        flight (for tests and debugging: after the last request ends this must be empty)."""
        self._ensure_running()
        future = asyncio.get_running_loop().create_future()
        self._inputs.put(("state", future))
        return await future

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def shutdown(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._inputs.put(("stop", None))
            if self._thread is not None:
                self._thread.join(timeout=30)
            self.core.shutdown()
            # Nobody will step these any more: end their streams instead of leaving them hanging.
            ended = "engine shut down"
            self._publish([RequestOutput(rid, 0, 0, finished=True, error=ended) for rid in list(self._streams)])

    async def __aenter__(self) -> "AsyncEngine":
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    # -- the core thread ---------------------------------------------------------------------
    def _ensure_running(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if self._stopped:
            raise RuntimeError("engine is shut down")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_core, name="stepweave-engine-core", daemon=True)
            self._thread.start()

    def _run_core(self) -> None:
        core = self.core
        try:
            while True:
                if not self._drain_inputs(block=not core.has_work() and not self._queries):
                    return
                if not core.has_work() and not self._queries:  # idle: are the workers still there?
                    self._publish(core.check_health())
                    continue
                # Answer state queries once nothing is in flight and every drop has been sent, so
                # an abort that arrived with the query is reflected in the answer. A busy engine
                # always has a batch in flight: stop submitting until the ones out there are back.
                schedule = True
                if self._queries:
                    if core.pending_batches == 0 and not core.scheduler.has_pending_drops():
                        self._answer_queries()
                        continue
                    schedule = core.pending_batches == 0  # only to send the pending drops
                outputs = core.step(schedule)
                if outputs:
                    self._publish(outputs)
        except Exception as exc:  # the workers are gone (EngineDeadError) or the core broke
            error = str(exc) if isinstance(exc, EngineDeadError) else f"engine is dead: {type(exc).__name__}: {exc}"
            self._dead = error
            core.fail_all(error)
            self._publish([RequestOutput(rid, 0, 0, finished=True, error=error) for rid in list(self._streams)])

    def _drain_inputs(self, block: bool) -> bool:
        """Apply queued adds and aborts; False once asked to stop."""
        while True:
            try:
                kind, item = self._inputs.get(block=block, timeout=HEALTH_POLL_S if block else None)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "state":
                self._queries.append(item)
            elif kind == "add":
                try:
                    self.core.add_request(item)
                except Exception as exc:  # e.g. overloaded
                    self._publish([RequestOutput(item.request_id, 0, 0, finished=True, error=str(exc))])
            else:
                self.core.abort(item)

    def _answer_queries(self) -> None:
        ids = self.core.executor.state_ids()
        for future in self._queries:
            future.get_loop().call_soon_threadsafe(_resolve, future, ids)
        self._queries = []

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their consumers' event loops, one wake-up per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that consumer's loop is closed; nobody is listening
                pass


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _put_all(items: list) -> None:
    for stream, output in items:
        stream.put(output)
