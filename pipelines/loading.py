"""Load a model directory through diffusers' own loader and wrap it in its family's step pipeline."""

from __future__ import annotations

import torch

from pipelines.model_info import ModelInfo
from pipelines.registry import import_family
from pipelines.step_pipeline import StepPipeline


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_step_pipeline(
    model: str,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    family: str | None = None,
) -> StepPipeline:
    """`model` is a preset name or a diffusers directory; the family comes from model_index.json
    through the registry unless `family` ("module:Class") names it. `dtype` is a torch dtype
    name ("bfloat16", ...); None loads as diffusers does by default (float32)."""
    import diffusers
    import transformers

    # Loading bars from every worker would drown the engine's own log.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    info = ModelInfo.load(model, import_family(family) if family is not None else None)
    device = torch.device(device) if device is not None else default_device()
    try:
        pipe = info.family.load_diffusers(info.path, getattr(torch, dtype) if dtype is not None else torch.float32)
    except Exception as exc:
        raise ValueError(f"cannot load model directory {str(info.path)!r}: {exc}") from exc
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return info.family(pipe, info, device)
