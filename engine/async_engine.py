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
import itertools
import queue
import threading
import uuid
from typing import AsyncIterator, Callable

from engine.contract.config import EngineConfig
from engine.contract.errors import EngineDeadError
from engine.contract.outputs import RequestOutput
from engine.contract.request_fields import request_fields
from engine.contract.sampling_params import SamplingParams
from engine.core.engine_core import EngineCore
from engine.generation_info import attach_generation_info
from engine.image_fan_out import join_outputs, progress_of, split_images, sub_request_id
from engine.request_outcome import outcome_of
from engine.request_stream import RequestStream

HEALTH_POLL_S = 0.5  # how often an idle engine checks that its workers are alive


class AsyncEngine:
    def __init__(self, model: str | EngineConfig = "tiny-qwen-image", **options):
        """`model` is a preset name, a diffusers directory or an EngineConfig; `options` are
        EngineConfig fields (max_num_seqs, parallel_config, executor, device, ...)."""
        config = EngineConfig.of(model, **options)
        self.model = config.model  # as the caller named it (the core holds the resolved directory)
        self.core = EngineCore(config)
        # A live request's user id -> the engine ids of its images (one unless
        # num_images_per_prompt > 1); each engine id -> its stream, and the id its outputs carry.
        self._live: dict[str, list[str]] = {}
        self._user_ids: dict[str, str] = {}
        self._incarnations = itertools.count()
        self._inputs: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._thread: threading.Thread | None = None
        self._dead: str | None = None
        self._stopped = False
        self._queries: list[asyncio.Future] = []
        # Called on the caller's event loop once per request with its outcome ("ok", "failed",
        # "aborted", "overloaded", "rejected") and its final output (None when it had none):
        # how the metrics see every front door's requests.
        self.request_observers: list[Callable[[str, RequestOutput | None], None]] = []
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
        Leaving the loop early (break, cancel, consumer gone) aborts the request. With
        num_images_per_prompt=N the N images run as N requests and come back in one output.
        `client` names who asked (the server passes its session): admission favours clients
        with fewer requests running."""
        self._ensure_running()
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        if request_id in self._live:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        params, fields = request_fields(prompt, sampling_params)
        per_image = split_images(params)
        user_ids = [request_id]
        if len(per_image) > 1:
            user_ids = [sub_request_id(request_id, i) for i in range(len(per_image))]
        # The engine knows each request by an id of this incarnation only: outputs of an earlier
        # request under the same user id (aborted, its last step still running) cannot reach
        # this one's stream.
        engine_ids = [f"{uid}@{next(self._incarnations)}" for uid in user_ids]
        try:
            requests = [self.core.make_request(fields, p, eid) for p, eid in zip(per_image, engine_ids)]
        except ValueError:
            self._observe("rejected", None)
            raise
        streams = []
        self._live[request_id] = engine_ids
        for request, uid in zip(requests, user_ids):
            request.client = client
            stream = RequestStream(asyncio.get_running_loop())
            self._streams[request.request_id] = stream
            self._user_ids[request.request_id] = uid
            self._inputs.put(("add", request))
            streams.append(stream)
        finished = [False] * len(engine_ids)
        final = None
        try:
            async for output in _merged(request_id, streams, finished, params, requests[0].num_steps):
                if output.finished:
                    attach_generation_info(output, fields, params, self.model)
                    # The id is free once its final output is out, even if the caller never
                    # asks for more (the generator would only end at its next __anext__).
                    self._forget(request_id, engine_ids, streams, finished)
                    final = output
                    self._observe(outcome_of(output), output)
                yield output
        finally:
            self._forget(request_id, engine_ids, streams, finished)
            if final is None:  # the caller left before the end: the request was aborted
                self._observe("aborted", None)

    def _observe(self, outcome: str, output: RequestOutput | None) -> None:
        for observer in self.request_observers:
            observer(outcome, output)

    def _forget(
        self, request_id: str, engine_ids: list[str], streams: list[RequestStream], finished: list[bool]
    ) -> None:
        """Stop tracking a request's streams and abort its images that have not finished."""
        if self._live.get(request_id) is engine_ids:
            del self._live[request_id]
        for k, (eid, stream) in enumerate(zip(engine_ids, streams)):
            if self._streams.get(eid) is stream:
                del self._streams[eid]
            self._user_ids.pop(eid, None)
            if not finished[k]:
                finished[k] = True
                self._inputs.put(("abort", eid))

    async def abort(self, request_id: str) -> None:
        """End a request now: its stream yields a final output with error "request aborted"."""
        for eid in self._live.pop(request_id, []):
            stream = self._streams.pop(eid, None)
            if stream is None:
                continue
            self._inputs.put(("abort", eid))
            stream.put(RequestOutput(self._user_ids.get(eid, request_id), 0, 0, finished=True, error="request aborted"))

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
        ids = sorted(self._user_facing(wire_id) for wire_id in self.core.executor.state_ids())
        for future in self._queries:
            future.get_loop().call_soon_threadsafe(_resolve, future, ids)
        self._queries = []

    def _user_facing(self, wire_id: str) -> str:
        """The user's id for a worker-side id: "<user id>@<incarnation>", with "#<n>" appended
        when the scheduler had to make it unique on the wire."""
        engine_id = wire_id
        head, sep, tail = wire_id.rpartition("#")
        if sep and tail.isdigit() and "@" in head:
            engine_id = head
        user_id = self._user_ids.get(engine_id)
        if user_id is None:  # its request has ended (state the workers should have freed)
            head, sep, tail = engine_id.rpartition("@")
            user_id = head if sep and tail.isdigit() else engine_id
        return user_id

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their consumers' event loops, one wake-up per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            user_id = self._user_ids.get(output.request_id, output.request_id)
            stream = self._streams.get(output.request_id)
            output.request_id = user_id
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that consumer's loop is closed; nobody is listening
                pass


async def _merged(
    request_id: str, streams: list[RequestStream], finished: list[bool], params: SamplingParams, num_steps: int
) -> AsyncIterator[RequestOutput]:
    """One request's outputs from its images' streams: each image's progress as the step all of
    them reached, then one final output (the first failure ends it at once)."""
    if len(streams) == 1:
        while not finished[0]:
            output = await streams[0].get()
            finished[0] = output.finished
            yield output
        return
    latest: list[RequestOutput | None] = [None] * len(streams)
    waiting = {asyncio.ensure_future(stream.get()): k for k, stream in enumerate(streams)}
    try:
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                k = waiting.pop(task)
                output = latest[k] = task.result()
                if output.finished:
                    finished[k] = True
                    if output.error is not None:
                        yield join_outputs(request_id, [output], params.output_type)
                        return
                else:
                    waiting[asyncio.ensure_future(streams[k].get())] = k
            if all(finished):
                yield join_outputs(request_id, latest, params.output_type)  # type: ignore[arg-type]
            else:
                yield progress_of(request_id, latest, num_steps)
    finally:
        for task in waiting:
            task.cancel()


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _put_all(items: list) -> None:
    for stream, output in items:
        stream.put(output)
