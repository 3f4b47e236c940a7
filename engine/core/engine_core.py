"""EngineCore: the scheduler and the executor, stepped synchronously.

`step()` is the whole loop body: submit every batch the scheduler allows (one, or two with async
scheduling, or P under pipeline parallelism), collect the oldest one's results and apply them.
The core does no IO of its own beyond the executor, so the offline front door drives it
directly and the async engine drives the same object from its core thread.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass

import msgspec

from engine.contract.config import EngineConfig
from engine.contract.messages import NewRequest, StepBatch
from engine.contract.outputs import RequestOutput
from engine.contract.request_fields import request_fields
from engine.contract.sampling_params import MAX_SEED, SamplingParams
from engine.core.request import Request
from engine.core.scheduler import StepScheduler
from pipelines.model_info import ModelInfo
from pipelines.registry import family_path, served_families
from runner.devices import check_devices
from runner.executor import Executor


@dataclass
class EngineStats:
    """Counters the benchmarks read: how busy the workers were."""

    batches: int = 0
    rows: int = 0  # request-steps executed
    execute_s: float = 0.0  # runner time, as the reporting worker measured it
    # The reporting worker's wait between consecutive batches while requests were running on it,
    # and how many such gaps there were (waiting for new requests is not counted).
    worker_idle_s: float = 0.0
    worker_idle_gaps: int = 0

    def record(self, results) -> None:
        self.batches += 1
        self.rows += len(results.outputs)
        self.execute_s += results.execute_s
        if results.idle_s is not None:
            self.worker_idle_s += results.idle_s
            self.worker_idle_gaps += 1


def make_executor(config: EngineConfig, family: str) -> Executor:
    """The executor the config asks for; `family` ("module:Class") is what the workers load."""
    if config.executor == "inproc":
        from runner.executor import InprocExecutor

        return InprocExecutor(config, family)
    from runner.mp_executor import MultiprocExecutor

    return MultiprocExecutor(config, family)


class EngineCore:
    def __init__(self, config: EngineConfig):
        config.validate()
        self.model_info = ModelInfo.load(config.model, adapter=config.diffusers_adapter)
        # Workers load the directory the engine resolved, with the family the engine chose.
        self.config = msgspec.structs.replace(config, model=str(self.model_info.path))
        parallel, family = config.parallel_config, self.model_info.family
        _check_supported(family, parallel)
        parallel.validate_layers(self.model_info.num_layers)
        pp_size = parallel.pipeline_parallel_size
        async_scheduling = config.async_scheduling
        if async_scheduling is None:  # only a separate worker process can run ahead of the engine
            async_scheduling = config.executor == "mp" and pp_size == 1
        self.async_scheduling = async_scheduling
        self.scheduler = StepScheduler(
            config.max_num_seqs,
            max_batches_in_flight=pp_size if pp_size > 1 else (2 if async_scheduling else 1),
            max_waiting=config.max_waiting,
            overlap=async_scheduling and pp_size == 1,
        )
        check_devices(self.config)
        self.executor = make_executor(self.config, family_path(family))
        self._ids = itertools.count()
        self._pending = 0  # batches submitted and not yet collected
        self.stats = EngineStats()

    # -- requests ----------------------------------------------------------------------------
    def make_request(
        self,
        prompt: str | dict | None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Validate a prompt and its parameters into a Request (ValueError names the field)."""
        params, fields = request_fields(prompt, params)
        self.model_info.validate(params, fields)
        seed = params.seed if params.seed is not None else random.randint(0, MAX_SEED)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        request = Request(request_id=request_id, params=params, seed=seed, **fields)
        _check_sendable(request)
        return request

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort(self, request_id: str) -> RequestOutput | None:
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_work(self) -> bool:
        """Something to schedule, drop or collect: the loop should keep stepping."""
        return self.scheduler.has_work() or self._pending > 0

    @property
    def pending_batches(self) -> int:
        """Batches submitted to the workers and not yet collected."""
        return self._pending

    # -- stepping ----------------------------------------------------------------------------
    def schedule(self) -> StepBatch | None:
        return self.scheduler.schedule(time.monotonic())

    def step(self) -> list[RequestOutput]:
        """Submit every batch the scheduler allows, then collect the oldest one's results."""
        while (batch := self.schedule()) is not None:
            self.executor.submit(batch)
            self._pending += 1
        if self._pending == 0:
            return []
        results = self.executor.collect()
        self._pending -= 1
        self.stats.record(results)
        return self.scheduler.update(results, time.monotonic())

    def fail_all(self, error: str) -> list[RequestOutput]:
        self._pending = 0
        return self.scheduler.fail_all(error, time.monotonic())

    def shutdown(self) -> None:
        self.executor.shutdown()


def _check_sendable(request: Request) -> None:
    """Workers decode every request with its type. One that would not survive that trip (a lone
    surrogate in a string, an object in scheduler_config) fails here, alone, instead of breaking
    the step batch that carries it and with it the engine."""
    try:
        msgspec.msgpack.decode(msgspec.msgpack.encode(request.to_new_request()), type=NewRequest)
    except (TypeError, ValueError, OverflowError, msgspec.MsgspecError) as exc:
        raise ValueError(f"request cannot be sent to the workers: {exc}") from None


def _check_supported(family: type, parallel) -> None:
    """A layout the model's family cannot run is refused before any worker starts."""
    if parallel.pipeline_parallel_size > 1 and not family.supports_pipeline_parallel:
        able = sorted(f.name for f in served_families() if f.supports_pipeline_parallel)
        raise ValueError(
            f"ParallelConfig.pipeline_parallel_size > 1 supports {', '.join(able)} models, not {family.name}"
        )
    if parallel.cfg_parallel_size > 1 and not family.supports_cfg_parallel:
        able = sorted(f.name for f in served_families() if f.supports_cfg_parallel)
        raise ValueError(f"ParallelConfig.cfg_parallel_size > 1 supports {', '.join(able)} models, not {family.name}")
