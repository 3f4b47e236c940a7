"""Runs step batches against a step pipeline and owns every running request's state.

Requests that cannot share a forward (different batch keys, e.g. image sizes) run as separate
groups of the same step, so no request waits for an unrelated one. A failure stays with the
request that caused it: a group whose forward raises is retried row by row, and a request whose
prediction is not finite fails alone while the rest of its batch goes on. The per-step path reads
nothing back from the device: finiteness flags are copied asynchronously and checked one step
later (`FiniteFlags`), so the host can queue the next step while the device works.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import torch

from engine.contract.config import EngineConfig
from engine.contract.messages import StepBatch, StepOutput, StepResults
from pipelines.request_state import RequestState
from runner.finite_flags import FiniteFlags


def build_model_runner(config: EngineConfig, family: str, rank: int = 0, dist_address: str | None = None):
    """Load the model for worker `rank` on its device and dtype, join the worker grid, compile
    if asked, and wrap it in a runner."""
    from pipelines.loading import load_step_pipeline
    from runner.devices import rank_device

    device = rank_device(config.device, rank)
    pipeline = load_step_pipeline(config.model, device=device, dtype=config.dtype, family=family)
    if config.parallel_config.world_size > 1:
        from pipelines.parallel.groups import setup_parallel

        setup_parallel(pipeline, rank, config.parallel_config, dist_address)
    if config.compile:
        pipeline.compile_transformer()
    return ModelRunner(pipeline)


class ModelRunner:
    def __init__(self, pipeline: Any):
        self.pipeline = pipeline
        self.states: dict[str, RequestState] = {}
        # request id -> (its last step's flags, its row in them, the step they belong to)
        self._unchecked: dict[str, tuple[FiniteFlags, int, int]] = {}

    def execute(self, batch: StepBatch) -> StepResults:
        start = time.perf_counter()
        with torch.inference_mode():
            outputs = self._execute(batch)
        return StepResults(step_id=batch.step_id, outputs=outputs, execute_s=time.perf_counter() - start)

    def close(self) -> None:
        """Free every request's state: an in-process engine's shutdown ends the adapter's request
        threads here (a worker process ends them by exiting)."""
        for state in list(self.states.values()):
            self.pipeline.release(state)
        self.states.clear()
        self._unchecked.clear()

    def _execute(self, batch: StepBatch) -> list[StepOutput]:
        for request_id in batch.drop:
            state = self.states.pop(request_id, None)
            self._unchecked.pop(request_id, None)
            if state is not None:
                self.pipeline.release(state)
        outputs: list[StepOutput] = []
        active: list[RequestState] = []
        for new in batch.new:
            try:
                state = self.pipeline.prepare_encode(new)
            except Exception as exc:
                outputs.append(_failure(new.request_id, 0, new.params.num_inference_steps, exc))
                continue
            self.states[new.request_id] = state
            active.append(state)
        for request_id in batch.cached:
            state = self.states.get(request_id)
            if state is None:
                outputs.append(
                    StepOutput(
                        request_id=request_id,
                        step=0,
                        num_steps=0,
                        finished=True,
                        error="worker holds no state for this request",
                    )
                )
            else:
                active.append(state)
        groups: dict[tuple, list[RequestState]] = {}
        for state in active:
            groups.setdefault(state.batch_key, []).append(state)
        for group in groups.values():
            outputs.extend(self._step_group(group))
        return outputs

    def _step_group(self, group: list[RequestState]) -> list[StepOutput]:
        if self.pipeline.steps_whole_calls:  # the diffusers adapter runs each request's own loop
            outcomes = self.pipeline.advance(group)
            return [self._report(state, kind, payload) for state, (kind, payload) in zip(group, outcomes, strict=True)]
        try:
            predictions = self.pipeline.denoise_step(group)
        except Exception as exc:
            if len(group) == 1:
                return [self._fail(group[0], exc)]
            return [out for state in group for out in self._step_group([state])]
        flags = None
        if predictions is None:  # an earlier pipeline stage: the last stage predicts
            predictions = [None] * len(group)
        else:
            flags = FiniteFlags(predictions)
        outputs: list[StepOutput | None] = []
        for row, (state, prediction) in enumerate(zip(group, predictions, strict=True)):
            output = self._advance(state, prediction)
            if flags is not None and output is not None and not output.finished:
                self._unchecked[state.request_id] = (flags, row, state.step_index)
            outputs.append(output)
        done = [state for state, out in zip(group, outputs) if out is None]
        if done:
            finals = iter(self._finish(done))
            outputs = [out if out is not None else next(finals) for out in outputs]
        return outputs

    def _advance(self, state: RequestState, prediction: Any) -> StepOutput | None:
        """Step one request, then check its previous step's prediction; None means it just took
        its last step and needs decoding (whose own check covers the last prediction)."""
        try:
            # Stepped even when not finite: pipeline stages must see the same sequence of steps.
            self.pipeline.step_scheduler(state, prediction)
            unchecked = self._unchecked.pop(state.request_id, None)
            if unchecked is not None and not unchecked[0].finite(unchecked[1]):
                raise FloatingPointError(f"noise prediction is not finite at step {unchecked[2]}")
        except Exception as exc:
            return self._fail(state, exc)
        if state.done:
            return None
        return StepOutput(request_id=state.request_id, step=state.step_index, num_steps=state.num_steps)

    def _finish(self, states: list[RequestState]) -> list[StepOutput]:
        """Decode every request that finished in this group together (one VAE call), falling
        back to one at a time so a failing decode fails only its own request."""
        try:
            images = self.pipeline.finish_batch(states)
        except Exception as exc:
            if len(states) == 1:
                return [self._fail(states[0], exc)]
            return [out for state in states for out in self._finish([state])]
        outputs = []
        for state, image in zip(states, images):
            del self.states[state.request_id]
            outputs.append(
                StepOutput(
                    request_id=state.request_id,
                    step=state.step_index,
                    num_steps=state.num_steps,
                    finished=True,
                    image=image,
                )
            )
        return outputs

    def _report(self, state: Any, kind: str, payload: Any) -> StepOutput:
        """An adapter request's step: progress, its final image, or its error."""
        if kind == "failed":
            return self._fail(state, payload)
        if kind == "finished":
            del self.states[state.request_id]
            return StepOutput(
                request_id=state.request_id,
                step=state.step_index,
                num_steps=state.num_steps,
                finished=True,
                image=payload,
            )
        return StepOutput(request_id=state.request_id, step=state.step_index, num_steps=state.num_steps)

    def _fail(self, state: RequestState, exc: BaseException) -> StepOutput:
        self.states.pop(state.request_id, None)
        self._unchecked.pop(state.request_id, None)
        self.pipeline.release(state)
        return _failure(state.request_id, state.step_index, state.num_steps, exc)


def _failure(request_id: str, step: int, num_steps: int, exc: BaseException) -> StepOutput:
    if _out_of_memory(exc):
        message = (
            f"out of memory at step {step} of {num_steps}: the device could not hold this step's batch "
            f"({type(exc).__name__}); ask for a smaller image, or lower the engine's memory_budget_mb or max_num_seqs"
        )
    elif isinstance(exc, (ValueError, FloatingPointError)):
        message = f"{type(exc).__name__}: {exc}"
    else:
        frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        where = f" (at {frame[0].filename}:{frame[0].lineno})" if frame else ""
        message = f"{type(exc).__name__}: {exc}{where}"
    return StepOutput(request_id=request_id, step=step, num_steps=num_steps, finished=True, error=message)


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
