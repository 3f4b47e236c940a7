"""The seam between the engine and the workers.

The engine core hands a step batch to `submit` and later takes results from `collect`, in
submission order; it never sees a tensor of a running request. `InprocExecutor` runs the model
runner in the engine's own process (for tests, debugging and the smallest deployments); the
process-based executor speaks the same interface over ZeroMQ.
"""

from __future__ import annotations

import abc
from collections import deque

from engine.contract.config import EngineConfig
from engine.contract.messages import StepBatch, StepResults


class Executor(abc.ABC):
    # rank -> what the worker reported when ready (pid, parameters, free_memory_bytes)
    worker_info: dict[int, dict]

    @abc.abstractmethod
    def submit(self, batch: StepBatch) -> None:
        """Send a step batch to the workers without waiting for it."""

    @abc.abstractmethod
    def collect(self, timeout: float | None = None) -> StepResults:
        """The oldest outstanding batch's results (raises TimeoutError or EngineDeadError)."""

    @abc.abstractmethod
    def state_ids(self) -> list[str]:
        """Request ids the workers still hold state for (for tests and debugging)."""

    def check_health(self) -> None:
        """Raise EngineDeadError if a worker has died (cheap; called while the engine idles)."""

    def shutdown(self) -> None:
        pass


class InprocExecutor(Executor):
    def __init__(self, config: EngineConfig, family: str):
        from runner.devices import free_memory_bytes, rank_device
        from runner.model_runner import build_model_runner

        self.runner = build_model_runner(config, family)
        self._results: deque[StepResults] = deque()
        self.worker_info = {0: {"free_memory_bytes": free_memory_bytes(rank_device(config.device, 0))}}

    def submit(self, batch: StepBatch) -> None:
        self._results.append(self.runner.execute(batch))

    def collect(self, timeout: float | None = None) -> StepResults:
        return self._results.popleft()

    def state_ids(self) -> list[str]:
        return list(self.runner.states)

    def shutdown(self) -> None:
        self.runner.close()
