"""Per-request generation parameters.

`SamplingParams` is a msgspec Struct so the same object travels unchanged from a client, through
the engine, to the workers. msgspec does not type-check at construction, so `validate()` checks
every field and names the field and its allowed range: a bad request must fail alone, with an
error the user can act on, and never reach a worker.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

MAX_STEPS = 1000
MAX_IMAGES_PER_PROMPT = 16
MAX_CFG_SCALE = 100.0
MAX_SIDE = 4096
MAX_FRAMES = 1025  # 4 * 256 + 1: Wan's video VAE takes 4k + 1 frames (81 by default)
MAX_SEED = 2**63 - 1
OUTPUT_TYPES = ("pil", "np")
MAX_PIPELINE_ARGS = 32
MAX_ARG_CHARS = 20_000
MAX_ARG_ITEMS = 64
MAX_PRIORITY = 1_000_000
MAX_DEADLINE_S = 7 * 24 * 3600.0

# A value a pipeline argument may take on the wire: plain data, never objects or tensors.
Scalar = str | int | float | bool | None
PipelineArg = Scalar | list[Scalar]


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """How one request is denoised. `None` means "the model's default". Decoded strictly from
    the wire: a misspelt field is an error, never silently the default."""

    num_inference_steps: int = 20
    # The two guidance scales, by their diffusers names; None: the pipeline's own default.
    # true_cfg_scale: true CFG with a negative prompt, active when > 1 (Qwen-Image: 4.0; FLUX).
    true_cfg_scale: float | None = None
    # guidance_scale: CFG (DiT: 4.0; SD3, Z-Image), or distilled guidance (FLUX, guidance-embedding
    # Qwen-Image: 4.0).
    guidance_scale: float | None = None
    # Rescale the CFG combination to the positive branch's norm. None: the model's own default
    # (on for Qwen-Image, as diffusers' QwenImagePipeline always does; off for DiT).
    cfg_normalize: bool | None = None
    height: int | None = None
    width: int | None = None
    # Frames of a video (text-to-video pipelines such as Wan); None: the model's default. The
    # model checks what its video VAE accepts (Wan: num_frames - 1 divisible by 4).
    num_frames: int | None = None
    # None: a random seed is drawn at submission and reported in the output.
    seed: int | None = None
    # A diffusers scheduler class name (e.g. "UniPCMultistepScheduler"); None keeps the model's.
    scheduler: str | None = None
    # Overrides applied on top of the model's scheduler config.
    scheduler_config: dict[str, Any] | None = None
    output_type: str = "pil"
    # Images for this prompt, diffusers' name. Image i is seeded with seed + i, so each one can
    # be reproduced alone (num_images_per_prompt=1, seed=seed + i); they may share step batches.
    num_images_per_prompt: int = 1
    # Image-to-image and inpainting (diffusers' name): how much of the input image is noised
    # away, in (0, 1]; the request runs int(num_inference_steps * strength) steps or so, exactly
    # as the pipeline counts them. None: the pipeline's default (0.6 for FLUX's img2img).
    strength: float | None = None
    # Further __call__ arguments of a pipeline served through the diffusers adapter, by their
    # diffusers names (e.g. {"max_sequence_length": 256}); checked against the pipeline class.
    pipeline_args: dict[str, PipelineArg] | None = None
    # Service level, read by the engine's scheduling policy (EngineConfig.scheduling_policy):
    # higher priority runs first under "priority"; deadline_s is the time from arrival by which the
    # request should finish, which "deadline" schedules against (None: best effort). "fcfs"
    # ignores both. Neither changes the image.
    priority: int = 0
    deadline_s: float | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and what it accepts."""
        _int_in("num_inference_steps", self.num_inference_steps, 1, MAX_STEPS)
        for scale in ("true_cfg_scale", "guidance_scale"):
            if getattr(self, scale) is not None:
                _float_in(scale, getattr(self, scale), 0.0, MAX_CFG_SCALE)
        if self.cfg_normalize is not None and not isinstance(self.cfg_normalize, bool):
            raise ValueError(f"SamplingParams.cfg_normalize must be true, false or null, got {self.cfg_normalize!r}")
        for side in ("height", "width"):
            value = getattr(self, side)
            if value is not None:
                _int_in(side, value, 16, MAX_SIDE)
        if self.num_frames is not None:
            _int_in("num_frames", self.num_frames, 1, MAX_FRAMES)
        _int_in("num_images_per_prompt", self.num_images_per_prompt, 1, MAX_IMAGES_PER_PROMPT)
        if self.seed is not None:
            try:
                _int_in("seed", self.seed, 0, MAX_SEED - (self.num_images_per_prompt - 1))
            except ValueError as exc:
                if self.num_images_per_prompt == 1:
                    raise
                raise ValueError(f"{exc} (image i of num_images_per_prompt uses seed + i)") from None
        if self.scheduler is not None and (not isinstance(self.scheduler, str) or not self.scheduler.isidentifier()):
            raise ValueError(
                f"SamplingParams.scheduler must be a diffusers scheduler class name, got {self.scheduler!r}"
            )
        if self.scheduler_config is not None:
            if not isinstance(self.scheduler_config, dict) or not all(
                isinstance(k, str) for k in self.scheduler_config
            ):
                raise ValueError(
                    "SamplingParams.scheduler_config must be a mapping of scheduler option names to values, "
                    f"got {self.scheduler_config!r}"
                )
        if self.strength is not None:
            ok = isinstance(self.strength, (int, float)) and not isinstance(self.strength, bool)
            if not ok or not math.isfinite(self.strength) or not 0.0 < self.strength <= 1.0:
                raise ValueError(f"SamplingParams.strength must be a number in (0, 1], got {self.strength!r}")
        if self.pipeline_args is not None:
            _check_pipeline_args(self.pipeline_args)
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"SamplingParams.output_type must be one of {OUTPUT_TYPES}, got {self.output_type!r}")
        _int_in("priority", self.priority, -MAX_PRIORITY, MAX_PRIORITY)
        if self.deadline_s is not None:
            value = self.deadline_s
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not 0 < value <= MAX_DEADLINE_S:
                raise ValueError(
                    f"SamplingParams.deadline_s must be seconds in (0, {MAX_DEADLINE_S:g}] or null, got {value!r}"
                )


def _int_in(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"SamplingParams.{name} must be an integer in [{low}, {high}], got {value!r}")


def _float_in(name: str, value: Any, low: float, high: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise ValueError(f"SamplingParams.{name} must be a number in [{low}, {high}], got {value!r}")


def _check_pipeline_args(args: Any) -> None:
    if not isinstance(args, dict) or len(args) > MAX_PIPELINE_ARGS:
        raise ValueError(
            f"SamplingParams.pipeline_args must be a mapping of at most {MAX_PIPELINE_ARGS} argument names to values, "
            f"got {short_repr(args)}"
        )
    for name, value in args.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"SamplingParams.pipeline_args: {name!r} is not an argument name")
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) > MAX_ARG_ITEMS:
            raise ValueError(f"SamplingParams.pipeline_args[{name!r}] may hold at most {MAX_ARG_ITEMS} items")
        for item in items:
            if item is not None and not isinstance(item, (str, int, float, bool)):
                raise ValueError(
                    f"SamplingParams.pipeline_args[{name!r}] must be a string, number, boolean, null or a list of "
                    f"those, got {type(item).__name__}"
                )
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"SamplingParams.pipeline_args[{name!r}] must be finite, got {item!r}")
            if isinstance(item, str) and len(item) > MAX_ARG_CHARS:
                raise ValueError(
                    f"SamplingParams.pipeline_args[{name!r}] strings hold at most {MAX_ARG_CHARS} characters"
                )


def short_repr(value: Any) -> str:
    """repr() cut to 60 characters, for error messages that quote user input."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
