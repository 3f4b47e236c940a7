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

from engine.config import ParallelConfig
from engine.outputs import RequestOutput
from engine.protocol import NewRequest, StepBatch
from engine.request import Request
from engine.sampling_params import MAX_SEED, SamplingParams
from engine.scheduler import StepScheduler
from pipelines.model_info import ModelInfo
from runner.executor import Executor


@dataclass
class EngineStats:
    """Counters the benchmarks read: how busy the workers were."""

    batches: int = 0
    rows: int = 0  # request-steps executed
    execute_s: float = 0.0  # runner time, as the reporting worker measured it
    worker_idle_s: float = 0.0  # reporting worker's wait between consecutive batches

    def record(self, results) -> None:
        self.batches += 1
        self.rows += len(results.outputs)
        self.execute_s += results.execute_s
        self.worker_idle_s += results.idle_s


def make_executor(kind: str, model: str, parallel_config: ParallelConfig, device: str | None) -> Executor:
    if kind == "inproc":
        if parallel_config.world_size != 1:
            raise ValueError("executor='inproc' runs a single rank; use executor='mp' for parallel workers")
        from runner.executor import InprocExecutor

        return InprocExecutor(model, device=device)
    if kind == "mp":
        from runner.mp_executor import MultiprocExecutor

        return MultiprocExecutor(model, parallel_config, device=device)
    raise ValueError(f"executor must be 'inproc' or 'mp', got {kind!r}")


class EngineCore:
    def __init__(
        self,
        model: str = "tiny-qwen-image",
        *,
        max_num_seqs: int = 8,
        parallel_config: ParallelConfig | None = None,
        executor: str | Executor = "mp",
        device: str | None = None,
        max_waiting: int | None = None,
        async_scheduling: bool | None = None,
    ):
        self.parallel_config = parallel_config or ParallelConfig()
        self.parallel_config.validate()
        self.model_info = ModelInfo.load(model)
        pp_size = self.parallel_config.pipeline_parallel_size
        if pp_size > 1 and self.model_info.family != "qwen-image":
            raise ValueError(f"ParallelConfig.pipeline_parallel_size > 1 supports qwen-image models, not {self.model_info.family}")
        self.parallel_config.validate_layers(self.model_info.num_layers)
        if async_scheduling is None:  # only a separate worker process can run ahead of the engine
            async_scheduling = executor == "mp" and pp_size == 1
        self.async_scheduling = async_scheduling
        self.scheduler = StepScheduler(
            max_num_seqs,
            max_batches_in_flight=pp_size if pp_size > 1 else (2 if async_scheduling else 1),
            max_waiting=max_waiting,
            overlap=async_scheduling and pp_size == 1,
        )
        if isinstance(executor, Executor):
            self.executor = executor
        else:
            self.executor = make_executor(executor, str(self.model_info.path), self.parallel_config, device)
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
        self.model_info.validate(params, fields["prompt"], fields["negative_prompt"], fields["class_label"])
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


def request_fields(prompt: str | dict | None, params: SamplingParams | None) -> tuple[SamplingParams, dict]:
    """The checks a request passes without the model: its params (defaults when None, each field
    in range) and its prompt fields. Clients run them before sending; the engine again."""
    params = params if params is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
    params.validate()
    return params, normalize_prompt(prompt)


def normalize_prompt(prompt: str | dict | None) -> dict:
    """A string, or a dict with prompt / negative_prompt / class_label -> the request's fields."""
    allowed = ("prompt", "negative_prompt", "class_label")
    if isinstance(prompt, str):
        return {"prompt": prompt, "negative_prompt": None, "class_label": None}
    if isinstance(prompt, dict):
        unknown = sorted(set(prompt) - set(allowed))
        if unknown:
            raise ValueError(f"prompt dict has unknown key(s) {unknown}; allowed: {list(allowed)}")
        return {key: prompt.get(key) for key in allowed}
    raise ValueError(f"prompt must be a string or a dict with keys {list(allowed)}, got {type(prompt).__name__}")
