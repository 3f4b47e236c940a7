"""The step contract every model family implements (see DESIGN.md).

A `StepPipeline` wraps a real diffusers pipeline loaded from a directory and splits its
`__call__` into the four pieces a step scheduler needs: `prepare_encode` once per request,
`denoise_step` once per step batch (rows at different timesteps, with different step counts and
CFG scales), `step_scheduler` per request, and `post_decode` for the requests that finished.
Noise prediction goes through `CFGParallelMixin`, so sequential and CFG-parallel runs share a
path. The class also describes its family to the engine without loading weights (what it is
called, which inputs it takes, what it supports, how to check a request), which is all the
model registry needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from engine.contract.messages import NewRequest
from engine.contract.sampling_params import short_repr
from pipelines.parallel.cfg import CFGParallelMixin
from pipelines.parallel.pipeline_parallel import PipelineParallelMixin
from pipelines.request_state import RequestState
from pipelines.schedulers import build_scheduler, check_schedule, check_scheduler, step_request_scheduler

if TYPE_CHECKING:
    from engine.contract.sampling_params import SamplingParams
    from pipelines.model_info import ModelInfo

MAX_PROMPT_CHARS = 20_000  # the tokenizer truncates far below this; the cap bounds the work


class StepPipeline(CFGParallelMixin, PipelineParallelMixin):
    # -- what the family is (read by the engine; no weights needed) ---------------------------
    name: str = ""  # e.g. "qwen-image"
    inputs: tuple[str, ...] = ("prompt", "negative_prompt")  # prompt-dict keys it takes
    flow_matching: bool = False  # flow-matching schedules (flow options filled in for solvers)
    supports_cfg_parallel: bool = True
    accepts_pipeline_args: bool = False  # SamplingParams.pipeline_args (the adapter's)
    steps_whole_calls: bool = False  # True: the runner steps it with advance() (the adapter)

    @classmethod
    def default_size(cls, transformer_config: dict[str, Any], preset: dict[str, Any]) -> tuple[int, int]:
        """(height, width) when a request gives none."""
        return int(preset.get("default_height", 1024)), int(preset.get("default_width", 1024))

    @classmethod
    def check_request(cls, info: ModelInfo, params: SamplingParams, fields: dict[str, Any]) -> None:
        """Raise ValueError, naming the field and what it accepts, for a request this model
        cannot serve (the checks common to all families ran already)."""

    @classmethod
    def working_size(cls, info: ModelInfo, params: SamplingParams, fields: dict[str, Any]) -> tuple[int, int, tuple]:
        """(height, width) the request generates at, and the pixels of each input image as the
        pipeline encodes it: what its memory estimate counts."""
        height = params.height or info.default_height or info.call_default("height") or 1024
        width = params.width or info.default_width or info.call_default("width") or 1024
        return height, width, ()

    @classmethod
    def num_steps(cls, info: ModelInfo, params: SamplingParams) -> int:
        """Denoising steps the request runs (progress reports them; async scheduling plans by them)."""
        return params.num_inference_steps

    @classmethod
    def image_seq_len(cls, info: ModelInfo, params: SamplingParams) -> int:
        """Image tokens, where the schedule depends on them (flow-matching timestep shift)."""
        return 0

    @classmethod
    def check_scheduler_choice(cls, info: ModelInfo, params: SamplingParams) -> None:
        """The requested scheduler works with this model, and gives a finite schedule."""
        check_scheduler(info.scheduler_config, params.scheduler, params.scheduler_config, info.flow)
        check_schedule(
            info.scheduler_config,
            params.scheduler,
            params.scheduler_config,
            info.flow,
            params.num_inference_steps,
            cls.image_seq_len(info, params),
        )

    @classmethod
    def load_diffusers(cls, path: Path, dtype: torch.dtype) -> Any:
        """The diffusers pipeline for a model directory, through diffusers' own loader."""
        import diffusers

        return diffusers.DiffusionPipeline.from_pretrained(str(path), dtype=dtype)

    def __init__(self, pipe: Any, info: ModelInfo, device: torch.device):
        self.pipe = pipe
        self.info = info
        self.device = device
        self.dtype = pipe.transformer.dtype
        self.reports_results = True  # the worker grid sets this; other ranks skip the VAE decode

    # -- the step contract -------------------------------------------------------------------
    def prepare_encode(self, request: NewRequest) -> RequestState:
        """Encode the prompt(s), draw the initial latents and set the request's own schedule."""
        raise NotImplementedError

    def denoise_step(self, states: Sequence[RequestState]) -> list[Any] | None:
        """One model evaluation for every request of a group; one noise prediction each."""
        return self.predict_noise(states)

    def step_scheduler(self, state: RequestState, noise_pred: Any) -> None:
        if self.pp_size > 1:
            self.pp_step_scheduler(state, noise_pred, self._step_scheduler)
        else:
            self._step_scheduler(state, noise_pred)

    def _step_scheduler(self, state: RequestState, noise_pred: Any) -> None:
        state.latents = step_request_scheduler(
            state.scheduler, noise_pred, state.timestep, state.latents, generator=state.generator
        )
        state.step_index += 1

    def post_decode(self, states: Sequence[RequestState]) -> list[np.ndarray]:
        """Final images of requests with one batch key, in one VAE call: float32 (1, H, W, 3)
        in [0, 1] each, as the diffusers pipeline's output_type="np"."""
        raise NotImplementedError

    def finish_batch(self, states: Sequence[RequestState]) -> list[np.ndarray | None]:
        """Final images, decoded only on the rank that reports results (None elsewhere)."""
        if not self.reports_results:
            return [None] * len(states)
        finite = torch.stack([torch.isfinite(state.latents).all() for state in states]).tolist()
        if not all(finite):
            if len(states) == 1:
                raise FloatingPointError("latents are not finite after the last step")
            raise FloatingPointError("a request's latents are not finite; decoding one at a time")
        return self.post_decode(states)

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

    def compile_transformer(self) -> None:
        """torch.compile the denoiser in place, with dynamic shapes so that requests joining and
        leaving (a new batch size) reuse the graph; under pipeline parallelism, this stage's
        blocks (the stage runs them one by one)."""
        if self.pp_size > 1:
            for block in self.transformer_blocks():
                block.compile(dynamic=True)
            return
        for name in ("transformer", "transformer_2"):
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.compile(dynamic=True)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.pipe.transformer.parameters())


def check_text(name: str, value: Any, required: bool) -> None:
    """A prompt-like field: a string of bounded length (non-empty when required), or null."""
    if value is None and not required:
        return
    if not isinstance(value, str) or (required and not value) or len(value) > MAX_PROMPT_CHARS:
        kind = "a non-empty string" if required else "null or a string"
        raise ValueError(f"{name} must be {kind} of at most {MAX_PROMPT_CHARS} characters, got {short_repr(value)}")
