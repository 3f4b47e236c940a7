"""The step scheduler: which requests take a denoising step next.

Pure and steppable (no IO, no tensors, no clock of its own), so it is unit-tested with fake
results. Every call to `schedule()` admits waiting requests up to `max_num_seqs` (in the order
of the scheduling policy, policy.py: by default first come, first served within a client,
taking turns between clients, see fair_queue.py) and returns one step batch holding the running
requests the policy chooses among those not already in a batch in flight. Every batch's
measured time refits the policy's cost model (cost_model.py). With
`max_batches_in_flight > 1` (pipeline parallelism) consecutive batches hold disjoint requests,
so each stage can work on a different batch. With `overlap=True` (async
scheduling) a request may also sit in two consecutive batches: the engine already knows it has
steps left, so step k+1 goes out before step k's results are back and the worker never idles
during a round trip; results that contradict the plan (an error, an abort) are reconciled when
they arrive.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from typing import Any

from engine.contract.errors import OverloadedError
from engine.contract.messages import StepBatch, StepResults
from engine.contract.outputs import RequestMetrics, RequestOutput, is_video, to_frames, to_images
from engine.core.cost_model import batch_features
from engine.core.policy import FcfsPolicy, SchedulingPolicy
from engine.core.request import Request, RequestStatus


class StepScheduler:
    def __init__(
        self,
        max_num_seqs: int = 8,
        max_batches_in_flight: int = 1,
        max_waiting: int | None = None,
        overlap: bool = False,
        memory_budget: int | None = None,
        max_paused: int = 0,
        policy: SchedulingPolicy | None = None,
        max_input_bytes: int | None = None,
    ):
        self.max_num_seqs = max_num_seqs
        self.max_batches_in_flight = max_batches_in_flight
        self.max_waiting = max_waiting
        self.max_input_bytes = max_input_bytes  # input images the unfinished requests may hold
        self.input_bytes = 0
        self.overlap = overlap
        self.memory_budget = memory_budget  # bytes the running requests may need together
        # Requests that may be running beyond max_num_seqs, for clients that had none running;
        # each batch still holds at most max_num_seqs, and the running requests take turns.
        self.max_paused = max_paused
        self.running_memory = 0
        self._running_by_client: Counter[str] = Counter()  # admission favours clients running fewer
        self._per_request_limit = 2 if overlap else 1
        self.policy = policy if policy is not None else FcfsPolicy(take_turns=max_paused > 0)
        self.waiting = self.policy.new_queue()
        self._features: dict[int, list] = {}  # step_id -> the batch's cost features
        self.running: dict[str, Request] = {}  # by request id
        self._by_wire: dict[str, Request] = {}  # the running requests by the id the workers know
        self.in_flight: dict[int, list[str]] = {}  # step_id -> wire ids
        self._drop: list[str] = []  # wire ids
        self._next_step_id = 0
        self._reuse = itertools.count()

    @property
    def cost_model(self):
        """The policy's step-time model, refitted from every measured batch."""
        return self.policy.cost_model

    # -- requests in -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise OverloadedError(
                f"engine overloaded: {len(self.waiting)} requests already waiting (max_waiting={self.max_waiting})"
            )
        if request.request_id in self.running or self.waiting.find(request.request_id) is not None:
            raise ValueError(f"request_id {request.request_id!r} is already in flight")
        held, size = self.input_bytes, request.input_bytes
        if size and self.max_input_bytes is not None and held + size > self.max_input_bytes:
            raise OverloadedError(
                f"engine overloaded: unfinished requests hold {held >> 20} MiB of input images and this one "
                f"{size >> 20} MiB (max_input_images_mb={self.max_input_bytes >> 20})"
            )
        self.policy.admit(request)
        request.wire_id = self._fresh_wire_id(request.request_id)
        self.waiting.append(request)
        self.input_bytes += size

    def _fresh_wire_id(self, request_id: str) -> str:
        """The request id, unless an earlier request with that id (aborted, failed, or finished
        with results still on their way) may still have state or results in flight: then a
        suffixed one, so nothing of the old request can reach the new one."""
        busy = {*self._drop, *self._by_wire, *(i for ids in self.in_flight.values() for i in ids)}
        wire_id = request_id
        while wire_id in busy:
            wire_id = f"{request_id}#{next(self._reuse)}"
        return wire_id

    def abort(self, request_id: str, now: float | None = None) -> RequestOutput | None:
        """End a waiting or running request; its worker state is dropped with the next batch."""
        request = self.waiting.find(request_id)
        if request is not None:
            self.waiting.remove(request)
            return self._finish(request, RequestStatus.ABORTED, "request aborted", now)
        request = self.running.get(request_id)
        if request is None:
            return None
        self._forget(request)
        if request.sent_to_workers:
            self._drop.append(request.wire_id)
        return self._finish(request, RequestStatus.ABORTED, "request aborted", now)

    def fail_all(self, error: str, now: float | None = None) -> list[RequestOutput]:
        """End every request with `error` (the workers are gone)."""
        outputs = [self._finish(r, RequestStatus.FAILED, error, now) for r in [*self.running.values(), *self.waiting]]
        self.running.clear()
        self.running_memory = 0
        self._running_by_client.clear()
        self._by_wire.clear()
        self.waiting.clear()
        self.in_flight.clear()
        self._features.clear()
        self._drop.clear()
        return outputs

    def fail_running(self, error: str, now: float | None = None) -> list[RequestOutput]:
        """End the running requests with `error` and forget everything in flight, keeping the
        waiting ones: the worker grid was replaced, so their state and batches are gone, while
        requests that never reached a worker can still run on the new grid."""
        outputs = [self._finish(r, RequestStatus.FAILED, error, now) for r in self.running.values()]
        self.running.clear()
        self.running_memory = 0
        self._running_by_client.clear()
        self._by_wire.clear()
        self.in_flight.clear()
        self._features.clear()
        self._drop.clear()
        return outputs

    # -- one step ----------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def has_pending_drops(self) -> bool:
        """Worker state still to free with the next batch."""
        return bool(self._drop)

    def has_work(self) -> bool:
        """Requests to step, or worker state still to drop."""
        return bool(self.waiting or self.running or self._drop)

    def schedule(self, now: float | None = None) -> StepBatch | None:
        """The next step batch, or None when there is nothing to run (or too much in flight)."""
        if len(self.in_flight) >= self.max_batches_in_flight:
            return None
        now = time.monotonic() if now is None else now
        by_client = self._running_by_client
        limit = self.max_num_seqs + self.max_paused
        self.policy.prepare(self.waiting, now)
        while self.waiting and len(self.running) < limit:
            head = self.waiting.peek(by_client)
            if not self._fits(head):
                break  # no room
            if len(self.running) >= self.max_num_seqs:
                if not self.policy.may_pause_others(head, list(self.running.values()), by_client):
                    break  # past the row cap, and the policy would not have it take a running request's turn
            request = self.waiting.popleft(by_client)
            self.running_memory += request.memory_bytes
            by_client[request.client] += 1
            request.status = RequestStatus.RUNNING
            self.running[request.request_id] = request
            self._by_wire[request.wire_id] = request
        new, cached = [], []
        # Disjoint batches in flight (pipeline parallelism): give each batch an equal share of
        # the running requests, so every stage has work.
        share = len(self.running)
        if self.max_batches_in_flight > 1 and not self.overlap:
            share = -(-len(self.running) // self.max_batches_in_flight)
        rows = min(share, self.max_num_seqs)
        eligible = [
            r
            for r in self.running.values()
            if r.in_flight < self._per_request_limit and not (r.in_flight and r.steps_scheduled >= r.num_steps)
        ]
        chosen = self.policy.choose(eligible, rows, now + self._busy_s())
        starting, finishing = 0, []
        for request in chosen:
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            if request.sent_to_workers:
                cached.append(request.wire_id)
            else:
                new.append(request.to_new_request())
                request.sent_to_workers = True
                starting += 1
            request.in_flight += 1
            request.steps_scheduled += 1
            request.last_batch = self._next_step_id
            if request.steps_scheduled == request.num_steps:
                finishing.append(request.shape)
        if not new and not cached and not self._drop:
            return None
        batch = StepBatch(step_id=self._next_step_id, new=new, cached=cached, drop=self._drop)
        self._drop = []
        self._next_step_id += 1
        ids = [r.request_id for r in new] + cached
        if ids:
            self.in_flight[batch.step_id] = ids
            self._features[batch.step_id] = batch_features([r.shape for r in chosen], starting, finishing)
        return batch

    def _busy_s(self) -> float:
        """How long until the workers can start the batch being scheduled now: the predicted
        time of the batches still in flight (with async scheduling, the one the workers have
        just started), so a policy judges deadlines from when its batch will really run."""
        if not self.in_flight or not self.policy.uses_start_time:
            return 0.0
        predict = self.cost_model.predict
        return sum(predict(self._features[step]) for step in self.in_flight if step in self._features)

    def _fits(self, request: Request) -> bool:
        """Admitting `request` keeps the running set within the memory budget. (The next
        request waits for room rather than being skipped, so a large one is not starved.)"""
        if self.memory_budget is None or not self.running:
            return True
        return self.running_memory + request.memory_bytes <= self.memory_budget

    def update(
        self, results: StepResults, now: float | None = None, seconds: float | None = None
    ) -> list[RequestOutput]:
        """Apply one batch's results; returns an output per request that is still ours.
        `seconds`: what the batch took in wall time, for the cost model (default: the workers'
        own time for it)."""
        now = time.monotonic() if now is None else now
        ids = self.in_flight.pop(results.step_id, [])
        features = self._features.pop(results.step_id, None)
        seconds = results.execute_s if seconds is None else seconds
        if features is not None and seconds > 0:
            self.cost_model.observe(features, seconds)
        outputs = []
        seen = set()
        for out in results.outputs:
            seen.add(out.request_id)
            request = self._by_wire.get(out.request_id)
            if request is None:  # aborted while its step was in flight
                continue
            request.in_flight -= 1
            request.step, request.num_steps = out.step, out.num_steps
            if out.error is not None:
                self._forget(request)
                self._drop.append(out.request_id)  # other ranks may still hold its state
                outputs.append(self._finish(request, RequestStatus.FAILED, out.error, now))
            elif out.finished:
                self._forget(request)
                outputs.append(self._finish_with(request, out.image, now))
            else:
                outputs.append(RequestOutput(request.request_id, out.step, out.num_steps, seed=request.seed))
        for wire_id in ids:
            request = self._by_wire.get(wire_id)
            if wire_id not in seen and request is not None:
                self._forget(request)
                self._drop.append(wire_id)
                outputs.append(self._finish(request, RequestStatus.FAILED, "worker returned no result", now))
        return outputs

    def _forget(self, request: Request) -> None:
        del self.running[request.request_id]
        del self._by_wire[request.wire_id]
        self.running_memory -= request.memory_bytes
        self._running_by_client[request.client] -= 1
        if not self._running_by_client[request.client]:
            del self._running_by_client[request.client]

    # -- helpers -----------------------------------------------------------------------------
    def _finish_with(self, request: Request, array: Any, now: float) -> RequestOutput:
        """A finished request's output: its images, or its video's frames."""
        output_type = request.params.output_type
        if is_video(array):
            output = self._finish(request, RequestStatus.FINISHED, None, now)
            output.frames = to_frames(array, output_type)
            return output
        return self._finish(request, RequestStatus.FINISHED, None, now, to_images(array, output_type))

    def _finish(self, request, status, error, now, images=None) -> RequestOutput:
        now = time.monotonic() if now is None else now
        request.status = status
        request.finished_time = now
        self.input_bytes -= request.input_bytes
        queue = None if request.first_scheduled_time is None else request.first_scheduled_time - request.arrival_time
        metrics = RequestMetrics(request.arrival_time, queue, now - request.arrival_time, request.step)
        return RequestOutput(
            request.request_id,
            request.step,
            request.num_steps,
            finished=True,
            images=images,
            error=error,
            seed=request.seed,
            metrics=metrics,
        )
