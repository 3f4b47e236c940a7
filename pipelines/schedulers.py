"""Per-request diffusers schedulers: choose, configure, check.

A request may name any diffusers scheduler class and override its config; the scheduler is
built as `cls.from_config(model's scheduler config, **overrides)`. For flow-matching models the
flow options a solver needs are filled in, so the class name alone works. Every choice is tried
once (a short `set_timesteps`) before the request is accepted, so an incompatible choice is an
error at submission instead of a crash mid-batch. Built templates are cached; each request gets
its own deep copy.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import warnings
from typing import Any

import diffusers
import numpy as np

from pipelines.scheduler_options import check_scheduler_overrides

# Options that make a general-purpose solver integrate a flow-matching model's velocity field.
FLOW_SOLVER_OPTIONS: dict[str, dict[str, Any]] = {
    "UniPCMultistepScheduler": {"use_flow_sigmas": True, "prediction_type": "flow_prediction"},
}


def scheduler_class(name: str) -> type:
    cls = getattr(diffusers, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(f"SamplingParams.scheduler: unknown diffusers scheduler class {name!r}")
    return cls


def allowed_scheduler_names(base_class_name: str, flow: bool) -> list[str]:
    """The model's own scheduler, the classes diffusers declares compatible with it, and for
    flow-matching models the solvers we know how to switch to flow mode."""
    base = scheduler_class(base_class_name)
    names = {base_class_name, *getattr(base, "_compatibles", [])}
    if flow:
        names |= set(FLOW_SOLVER_OPTIONS)
    return sorted(n for n in names if isinstance(getattr(diffusers, n, None), type))


def check_scheduler(
    base_config: dict[str, Any], name: str | None, overrides: dict[str, Any] | None, flow: bool
) -> None:
    """Raise ValueError unless the choice works with this model (cached, no copy)."""
    check_scheduler_overrides(overrides)
    _checked_template(*_key(base_config, name, overrides, flow))


def check_schedule(
    base_config: dict[str, Any],
    name: str | None,
    overrides: dict[str, Any] | None,
    flow: bool,
    steps: int,
    image_seq_len: int,
) -> None:
    """Raise ValueError when this many steps give a broken schedule (e.g. a one-step flow
    schedule with a terminal shift divides by zero, in diffusers too)."""
    _checked_schedule(*_key(base_config, name, overrides, flow), steps, image_seq_len)


@functools.lru_cache(maxsize=1024)
def _checked_schedule(
    base_json: str, name: str | None, overrides_json: str, flow: bool, steps: int, image_seq_len: int
) -> None:
    import torch

    scheduler = copy.deepcopy(_checked_template(base_json, name, overrides_json, flow))
    with warnings.catch_warnings():  # a broken schedule is reported below, as one ValueError
        warnings.simplefilter("ignore", RuntimeWarning)
        if flow:
            set_flow_timesteps(scheduler, steps, image_seq_len=image_seq_len)
        else:
            scheduler.set_timesteps(steps)
    sigmas = getattr(scheduler, "sigmas", None)
    if not torch.isfinite(torch.as_tensor(scheduler.timesteps, dtype=torch.float64)).all() or (
        sigmas is not None and not torch.isfinite(torch.as_tensor(sigmas, dtype=torch.float64)).all()
    ):
        raise ValueError(
            f"SamplingParams.num_inference_steps={steps} gives a non-finite schedule with "
            f"{name or 'the model scheduler'}; use more steps"
        )


def _key(base_config, name, overrides, flow) -> tuple:
    dump = lambda value: json.dumps(value, sort_keys=True, default=str)  # noqa: E731
    return dump(base_config), name, dump(overrides or {}), flow


def build_scheduler(
    base_config: dict[str, Any],
    name: str | None,
    overrides: dict[str, Any] | None,
    flow: bool,
) -> Any:
    """A fresh scheduler for one request (a deep copy of a checked, cached template)."""
    return copy.deepcopy(_checked_template(*_key(base_config, name, overrides, flow)))


@functools.lru_cache(maxsize=64)
def _checked_template(base_json: str, name: str | None, overrides_json: str, flow: bool) -> Any:
    base_config = json.loads(base_json)
    overrides = json.loads(overrides_json)
    base_name = base_config["_class_name"]
    name = name or base_name
    scheduler_class(name)  # unknown names get their own error
    if name not in allowed_scheduler_names(base_name, flow):
        raise ValueError(
            f"SamplingParams.scheduler: {name!r} cannot drive this model (its scheduler is {base_name}); "
            f"allowed: {', '.join(allowed_scheduler_names(base_name, flow))}"
        )
    cls = scheduler_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(
            f"SamplingParams.scheduler_config: {name} has no option(s) {unknown}; allowed: {sorted(accepted)}"
        )
    options = dict(FLOW_SOLVER_OPTIONS.get(name, {})) if flow and name != base_name else {}
    options.update(overrides)
    try:
        scheduler = cls.from_config(base_config, **options)
        trial = copy.deepcopy(scheduler)
        if flow:
            set_flow_timesteps(trial, 2, image_seq_len=256)
        else:
            trial.set_timesteps(2)
    except Exception as exc:  # the class or its options do not fit this model
        raise ValueError(
            f"SamplingParams.scheduler: {name} with {options or 'default options'} does not work with this model: {exc}"
        ) from exc
    return scheduler


def calculate_shift(image_seq_len: int, config: Any) -> float:
    """The resolution-dependent timestep shift `mu` of Qwen-Image-style flow models (the same
    linear rule diffusers' QwenImagePipeline uses)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift as diffusers_shift

    return diffusers_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def set_flow_timesteps(scheduler: Any, num_steps: int, image_seq_len: int, device: Any = None) -> None:
    """Set a flow-matching schedule exactly as diffusers' QwenImagePipeline does."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import retrieve_timesteps

    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = calculate_shift(image_seq_len, scheduler.config)
    retrieve_timesteps(scheduler, num_steps, device, sigmas=sigmas, mu=mu)


def step_request_scheduler(scheduler: Any, noise_pred: Any, timestep: Any, latents: Any, generator: Any = None) -> Any:
    """One step of a request's own scheduler, with the request's generator where the scheduler
    draws noise. Every CFG rank does this locally with identically seeded generators, so the
    ranks stay equal without a broadcast."""
    kwargs = {"generator": generator} if _accepts_generator(type(scheduler)) else {}
    return scheduler.step(noise_pred, timestep, latents, return_dict=False, **kwargs)[0]


@functools.lru_cache(maxsize=None)
def _accepts_generator(scheduler_cls: type) -> bool:
    return "generator" in inspect.signature(scheduler_cls.step).parameters
