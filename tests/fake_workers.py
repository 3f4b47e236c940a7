"""Workers that only count steps: what the scheduling tests drive a StepScheduler with."""

from __future__ import annotations

from benchmarks.simulator import StepCountingWorkers


class FakeWorkers(StepCountingWorkers):
    """The simulator's step-counting workers, recording which steps each request ran."""

    def __init__(self) -> None:
        super().__init__(record_steps=True)


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
