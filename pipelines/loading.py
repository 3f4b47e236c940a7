"""Load a model directory through diffusers' own loader and wrap it in its step pipeline."""

from __future__ import annotations

import torch

from pipelines.base import StepPipeline
from pipelines.model_info import ModelInfo


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_step_pipeline(model: str, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> StepPipeline:
    """`model` is a preset name or a diffusers directory; the family comes from model_index.json."""
    import diffusers
    import transformers

    # Loading bars from every worker would drown the engine's own log.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    info = ModelInfo.load(model)
    device = torch.device(device) if device is not None else default_device()
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(info.path), dtype=dtype)
    except Exception as exc:
        raise ValueError(f"cannot load model directory {str(info.path)!r}: {exc}") from exc
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if info.family == "qwen-image":
        from pipelines.qwen_image import QwenImageStepPipeline

        return QwenImageStepPipeline(pipe, info, device)
    from pipelines.dit import DiTStepPipeline

    return DiTStepPipeline(pipe, info, device)
