"""The step contract every model family implements (see DESIGN.md).

A `StepPipeline` wraps a real diffusers pipeline loaded from a directory and splits its
`__call__` into the four pieces a step scheduler needs: `prepare_encode` once per request,
`denoise_step` once per step batch (rows at different timesteps, with different step counts and
CFG scales), `step_scheduler` per request, and `post_decode` at the end. Noise prediction and
scheduler steps go through `CFGParallelMixin`, so sequential and CFG-parallel runs share a path.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from engine.protocol import NewRequest
from pipelines.model_info import ModelInfo
from pipelines.schedulers import build_scheduler
from runner.cfg import CFGParallelMixin
from runner.pipeline_parallel import PipelineParallelMixin
from runner.request_state import RequestState


class StepPipeline(CFGParallelMixin, PipelineParallelMixin):
    def __init__(self, pipe: Any, info: ModelInfo, device: torch.device):
        self.pipe = pipe
        self.info = info
        self.device = device
        self.dtype = pipe.transformer.dtype
        self.reports_results = True  # the worker grid sets this; other ranks skip the VAE decode

    # -- the step contract -------------------------------------------------------------------
    def prepare_encode(self, request: NewRequest) -> RequestState:
        raise NotImplementedError

    def denoise_step(self, states: Sequence[RequestState]) -> list[Any]:
        """One model evaluation for every request of a group; one noise prediction each."""
        return self.predict_noise_maybe_with_cfg(states)

    def step_scheduler(self, state: RequestState, noise_pred: Any) -> None:
        if self.pp_size > 1:
            self.pp_step_scheduler(state, noise_pred, self._step_scheduler)
        else:
            self._step_scheduler(state, noise_pred)

    def _step_scheduler(self, state: RequestState, noise_pred: Any) -> None:
        state.latents = self.scheduler_step_maybe_with_cfg(
            noise_pred,
            state.timestep,
            state.latents,
            per_request_scheduler=state.scheduler,
            generator=state.generator,
        )
        state.step_index += 1

    def post_decode(self, state: RequestState) -> np.ndarray:
        """float32 (1, H, W, 3) in [0, 1], as the diffusers pipeline's output_type="np"."""
        raise NotImplementedError

    def post_decode_batch(self, states: Sequence[RequestState]) -> list[np.ndarray]:
        """Decode several finished requests of one batch key; pipelines override this with one
        batched VAE call."""
        return [self.post_decode(state) for state in states]

    def finish_batch(self, states: Sequence[RequestState]) -> list[np.ndarray | None]:
        """Final images, decoded only on the rank that reports results (None elsewhere)."""
        if not self.reports_results:
            return [None] * len(states)
        finite = torch.stack([torch.isfinite(state.latents).all() for state in states]).tolist()
        if not all(finite):
            if len(states) == 1:
                raise FloatingPointError("latents are not finite after the last step")
            raise FloatingPointError("a request's latents are not finite; decoding one at a time")
        return self.post_decode_batch(states)

    # -- shared helpers ----------------------------------------------------------------------
    def new_scheduler(self, request: NewRequest) -> Any:
        params = request.params
        return build_scheduler(self.info.scheduler_config, params.scheduler, params.scheduler_config, self.info.flow)

    def new_generator(self, request: NewRequest) -> torch.Generator:
        # diffusers' examples seed a CPU generator; randn_tensor draws on CPU and moves the
        # result, so CPU and CUDA runs start from the same noise.
        return torch.Generator(device="cpu").manual_seed(request.seed)

    def prediction_shapes(self, state: RequestState) -> Any:
        """Shape of one row's transformer output (a list of shapes for multi-output models), so
        CFG ranks that computed no row can still receive the others' predictions."""
        return tuple(state.latents.shape)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.pipe.transformer.parameters())
