"""EngineCore: the scheduler and the executor, stepped synchronously.

`step()` is the whole loop body: submit every batch the scheduler allows (one, or two with async
scheduling, or P under pipeline parallelism), collect the oldest one's results and apply them.
The core does no IO of its own beyond the executor, so the offline front door drives it
directly and the async engine drives the same object from its core thread. A worker crash is
either the end (EngineDeadError) or, with `max_worker_restarts`, a fresh worker grid: the
requests the old grid was running fail, the waiting ones run on the new one.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import msgspec

from engine.contract.config import EngineConfig
from engine.contract.errors import EngineDeadError
from engine.contract.input_images import check_input_images
from engine.contract.messages import NewRequest, StepBatch
from engine.contract.outputs import RequestOutput
from engine.contract.request_fields import request_fields
from engine.contract.sampling_params import MAX_SEED, SamplingParams
from engine.contract.wire import Decoder, Encoder
from engine.core.cost_model import CostModel, RequestShape
from engine.core.policy import FcfsPolicy, make_policy
from engine.core.request import Request
from engine.core.restart_policy import RestartPolicy
from engine.core.scheduler import StepScheduler
from pipelines.memory_estimate import latent_frames, read_vae_config, request_bytes, vae_stages
from pipelines.model_info import ModelInfo
from pipelines.registry import family_path, served_families
from runner.devices import check_devices
from runner.executor import Executor

log = logging.getLogger("stepweave.engine")


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
    restarts: int = 0  # worker grids started after a crash
    restart_s: float = 0.0  # wall time of the last restart (crash noticed to new grid ready)
    startup_s: float = 0.0  # wall time to start the first worker grid (a restart's baseline)
    # Called from the core thread with each collected batch's rows and runner seconds (metrics).
    batch_observers: list[Callable[[int, float], None]] = field(default_factory=list, repr=False)

    def record(self, results) -> None:
        self.batches += 1
        self.rows += len(results.outputs)
        self.execute_s += results.execute_s
        for observer in self.batch_observers:
            observer(len(results.outputs), results.execute_s)
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
        # A preset's name, or a model directory's last component (what a client may be told).
        self.model_name = Path(config.model).name
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
        max_paused = config.max_paused if pp_size == 1 else 0
        profile = config.cost_profile
        self.cost_model = CostModel.load(profile) if profile not in (None, "measure") else CostModel()
        policy = make_policy(
            config.scheduling_policy,
            self.cost_model,
            take_turns=max_paused > 0,
            priority_aging_s=config.priority_aging_s,
            deadline_admission=config.deadline_admission,
        )
        self.scheduler = StepScheduler(
            config.max_num_seqs,
            max_batches_in_flight=pp_size if pp_size > 1 else (2 if async_scheduling else 1),
            max_waiting=config.max_waiting,
            max_input_bytes=None if config.max_input_images_mb is None else config.max_input_images_mb << 20,
            overlap=async_scheduling and pp_size == 1,
            max_paused=max_paused,
            policy=policy,
        )
        check_devices(self.config)
        self._family_path = family_path(family)
        self.stats = EngineStats()
        started = time.monotonic()
        self.executor = make_executor(self.config, self._family_path)
        self.stats.startup_s = time.monotonic() - started
        self._restarts = RestartPolicy(config.max_worker_restarts)
        self._vae_config = read_vae_config(self.model_info.path)
        self.scheduler.memory_budget = self._memory_budget()
        self._restarts.started(time.monotonic())
        self._ids = itertools.count()
        self._pending = 0  # batches submitted and not yet collected
        self._submitted: dict[int, float] = {}  # step_id -> when it went to the workers
        self._last_collect: float | None = None
        if profile == "measure" or (profile is None and config.scheduling_policy == "deadline"):
            self.measure_cost()

    # -- requests ----------------------------------------------------------------------------
    def make_request(
        self,
        prompt: str | dict | None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Validate a prompt and its parameters into a Request (ValueError names the field)."""
        params, fields = request_fields(prompt, params)
        check_input_images(fields, self.config.max_input_pixels)
        self.model_info.validate(params, fields)
        seed = params.seed if params.seed is not None else random.randint(0, MAX_SEED)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        request = Request(request_id=request_id, params=params, seed=seed, **fields)
        # The steps it will really run (image-to-image runs fewer, by strength): what progress
        # reports and what async scheduling plans with.
        request.num_steps = self.model_info.num_steps(params)
        _check_sendable(request)
        request.memory_bytes = self._request_memory(params, fields)
        request.shape = self._request_shape(params, fields)
        self.scheduler.policy.admit(request)  # a deadline it cannot meet is refused here, at submission
        return request

    def _request_shape(self, params: SamplingParams, fields: dict) -> RequestShape:
        """What the request puts into a step batch, from the model's configs: rows (CFG
        branches x images), latent patches per row, and prompt tokens (estimated at four
        characters a token; the cost model's online fit absorbs the error)."""
        info = self.model_info
        height, width, _ = info.family.working_size(info, params, fields)
        frames = info.frames_for(params)
        depth = 1 if frames is None else latent_frames(frames, self._vae_config)  # a video's latent frames
        scale = 2 ** (len(vae_stages(self._vae_config)) - 1)
        patch = info.transformer_config.get("patch_size", 2) or 1
        patch = int(patch[-1]) if isinstance(patch, list) else int(patch)  # Wan patches (time, h, w)
        image_tokens = max(1, depth * (height // scale) * (width // scale) // (patch * patch))
        prompt = fields.get("prompt") or ""
        if fields.get("class_label") is not None:
            cfg = (4.0 if params.guidance_scale is None else params.guidance_scale) > 1
        else:
            cfg = fields.get("negative_prompt") is not None and (params.true_cfg_scale or 4.0) > 1
        rows = (2 if cfg else 1) * params.num_images_per_prompt
        text_tokens = len(prompt) // 4 + 1
        return RequestShape(rows, image_tokens, text_tokens, forward_key=(depth, height, width))

    def measure_cost(self, steps: int = 3) -> None:
        """Fit the cost model from a few short batches on the workers: one request alone, two
        together, one at half size, and one of each size together (a warm-up run first, not
        counted). Cheap on the presets (tens of forwards); a JSON profile
        (EngineConfig.cost_profile) skips it."""
        inputs = self.model_info.family.inputs
        if "prompt" in inputs:
            prompt: dict = {"prompt": "a lighthouse on a cliff at dusk", "negative_prompt": "blurry"}
        elif "class_label" in inputs:
            prompt = {"class_label": 1}
        else:
            return
        info = self.model_info
        half = [
            None if side is None else max(16, side // 2 // 16 * 16)
            for side in (info.default_height, info.default_width)
        ]
        full = [None, None]
        # a warm-up (its own model, not counted), one alone, two together, one at half size, and
        # one of each size together (two forwards in one batch: the per-forward cost)
        plans = [([full], CostModel()), ([full], self.cost_model), ([full, full], self.cost_model)]
        plans += [([half], self.cost_model), ([full, half], self.cost_model)]
        for k, (sizes, model) in enumerate(plans):
            scheduler = StepScheduler(max_num_seqs=len(sizes), policy=FcfsPolicy(model))
            try:
                for i, (height, width) in enumerate(sizes):
                    params = SamplingParams(
                        num_inference_steps=steps, seed=i, height=height, width=width, output_type="np"
                    )
                    scheduler.add_request(self.make_request(prompt, params, f"cost-profile-{k}-{i}"))
            except ValueError:
                continue  # a size this model does not take: profile with the others
            while (batch := scheduler.schedule(started := time.monotonic())) is not None:
                self.executor.submit(batch)
                results = self.executor.collect()
                now = time.monotonic()
                scheduler.update(results, now, seconds=now - started)

    def _request_memory(self, params: SamplingParams, fields: dict) -> int:
        """The request's estimated activation memory; ValueError if it could never fit."""
        info = self.model_info
        height, width, inputs = info.family.working_size(info, params, fields)
        element_bytes = 2 if self.config.dtype in ("bfloat16", "float16") else 4
        frames = info.frames_for(params)
        need = request_bytes(
            height, width, info.transformer_config, self._vae_config, element_bytes, input_pixels=inputs, frames=frames
        )
        budget = self.scheduler.memory_budget
        if budget is not None and need > budget:
            size = (
                f"height x width = {height}x{width}"
                if frames is None
                else f"num_frames x height x width = {frames}x{height}x{width}"
            )
            with_inputs = f" with {sum(inputs)} pixels of input images" if inputs else ""
            raise ValueError(
                f"SamplingParams.{size}{with_inputs} needs about {need / 2**20:.0f} MiB of activation memory, more "
                f"than this engine's budget of {budget / 2**20:.0f} MiB (memory_budget_mb); "
                + ("ask for a smaller image" if frames is None else "ask for fewer frames or a smaller size")
            )
        return need

    def _memory_budget(self) -> int | None:
        """Bytes the running requests may need together: the configured budget, or 80% of the
        least any worker could still allocate after loading the model."""
        if self.config.memory_budget_mb is not None:
            return self.config.memory_budget_mb * 2**20
        free = [info.get("free_memory_bytes") for info in self.executor.worker_info.values()]
        if not free or any(f is None for f in free):
            return None
        return int(0.8 * min(free))

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

    def step(self, schedule: bool = True) -> list[RequestOutput]:
        """Submit every batch the scheduler allows, then collect the oldest one's results
        (`schedule=False`: only collect, to let the batches in flight drain). After a worker
        crash: the failed running requests' outputs (with restarts on), or EngineDeadError."""
        try:
            return self._step(schedule)
        except EngineDeadError as exc:
            return self._recover(exc)

    def check_health(self) -> list[RequestOutput]:
        """Between steps (an idle engine too): notice a worker that died, and recover as step()
        does; the async engine calls this while it waits for requests."""
        try:
            self.executor.check_health()
        except EngineDeadError as exc:
            return self._recover(exc)
        return []

    def _step(self, schedule: bool) -> list[RequestOutput]:
        while schedule and (batch := self.schedule()) is not None:
            self.executor.submit(batch)
            self._submitted[batch.step_id] = time.monotonic()
            self._pending += 1
        if self._pending == 0:
            return []
        results = self.executor.collect()
        self._pending -= 1
        self.stats.record(results)
        now = time.monotonic()
        return self.scheduler.update(results, now, seconds=self._batch_wall_time(results.step_id, now))

    def _batch_wall_time(self, step_id: int, now: float) -> float | None:
        """What the batch cost the engine in wall time, for the cost model: since the previous
        batch's results if this one was already submitted then (the workers went straight on
        to it), else since its submission. Engine-side work (scheduling, outputs to callers)
        is included, as deadlines are kept in wall time."""
        submitted = self._submitted.pop(step_id, None)
        previous, self._last_collect = self._last_collect, now
        if submitted is None:
            return None
        return now - (max(submitted, previous) if previous is not None else submitted)

    def _recover(self, crash: EngineDeadError) -> list[RequestOutput]:
        """Replace the crashed worker grid, or re-raise once restarts are off or used up."""
        noticed = time.monotonic()
        self._pending = 0
        self._submitted.clear()
        error = crash.reason
        delay = self._restarts.next_delay(noticed)
        if delay is None:
            if self._restarts.max_restarts == 0:
                raise crash
            raise EngineDeadError(
                f"engine is dead: the workers crashed {self._restarts.streak + 1} times in a row "
                f"(max_worker_restarts={self._restarts.max_restarts}); last: {error}"
            ) from None
        outputs = self.scheduler.fail_running(
            f"the workers crashed while this request ran ({error}); the engine restarted them", noticed
        )
        log.warning(
            "workers crashed (%s): %d running request(s) failed; restarting in %.1f s (restart %d of %d in a row)",
            error,
            len(outputs),
            delay,
            self._restarts.streak,
            self._restarts.max_restarts,
        )
        self.executor.shutdown()
        time.sleep(delay)
        try:
            self.executor = make_executor(self.config, self._family_path)
        except EngineDeadError as exc:
            return outputs + self._recover(exc)
        except Exception as exc:  # the new grid failed to start: a crash of its own
            reason = f"workers failed to restart: {exc}"
            return outputs + self._recover(EngineDeadError(reason, reason))
        now = time.monotonic()
        self._restarts.started(now)
        self.stats.restarts += 1
        self.stats.restart_s = now - noticed
        log.warning("workers restarted in %.1f s", self.stats.restart_s)
        return outputs

    def fail_all(self, error: str) -> list[RequestOutput]:
        self._pending = 0
        self._submitted.clear()
        return self.scheduler.fail_all(error, time.monotonic())

    def shutdown(self) -> None:
        self.executor.shutdown()


def _check_sendable(request: Request) -> None:
    """Workers decode every request with its type. One that would not survive that trip (a lone
    surrogate in a string, an object in scheduler_config) fails here, alone, instead of breaking
    the step batch that carries it and with it the engine."""
    try:
        Decoder(NewRequest).decode(Encoder().encode(request.to_new_request()))  # arrays: zero-copy frames
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
