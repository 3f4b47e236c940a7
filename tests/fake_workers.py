"""Workers that only count steps: what the scheduling tests drive a StepScheduler with."""

from __future__ import annotations

import numpy as np

from engine.contract.messages import StepBatch, StepOutput, StepResults


class FakeWorkers:
    """Keeps each request's step count, as the real workers keep its latents; a dropped request's
    state is freed; a finished one frees its own."""

    def __init__(self) -> None:
        self.state: dict[str, list[int]] = {}  # wire id -> [steps done, steps in all]
        self.steps_run: dict[str, list[int]] = {}  # wire id -> the step numbers it ran, in order

    def run(self, batch: StepBatch, seconds: float = 0.0) -> StepResults:
        for wire_id in batch.drop:
            self.state.pop(wire_id, None)
        for new in batch.new:
            self.state[new.request_id] = [0, new.params.num_inference_steps]
        outputs = []
        for wire_id in [n.request_id for n in batch.new] + batch.cached:
            done = self.state[wire_id]
            done[0] += 1
            self.steps_run.setdefault(wire_id, []).append(done[0])
            finished = done[0] == done[1]
            image = np.zeros((1, 2, 2, 3), np.float32) if finished else None
            outputs.append(
                StepOutput(request_id=wire_id, step=done[0], num_steps=done[1], finished=finished, image=image)
            )
            if finished:
                del self.state[wire_id]
        return StepResults(step_id=batch.step_id, outputs=outputs, execute_s=seconds)


def drive(scheduler, arrivals, step_s: float = 1.0, limit: int = 10_000):
    """Run `arrivals` [(time, Request)] to completion on a simulated clock where every step batch
    takes `step_s`; returns ({request id: finish time}, [batch request ids], workers)."""
    workers, pending = FakeWorkers(), sorted(arrivals, key=lambda item: item[0])
    clock, finished, batches = 0.0, {}, []
    for _ in range(limit):
        while pending and pending[0][0] <= clock:
            scheduler.add_request(pending.pop(0)[1])
        batch = scheduler.schedule(clock)
        if batch is None:
            if not pending:
                return finished, batches, workers
            clock = pending[0][0]
            continue
        batches.append([n.request_id for n in batch.new] + batch.cached)
        clock += step_s
        for out in scheduler.update(workers.run(batch, step_s), clock):
            if out.finished:
                finished[out.request_id] = clock
    raise AssertionError("did not finish")
