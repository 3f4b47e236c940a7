"""The model registry: which step pipeline serves which diffusers pipeline class.

A model directory names its diffusers pipeline class in `model_index.json` ("_class_name"); the
registry maps that name to the `StepPipeline` subclass of the family that serves it. The class
carries everything else the engine needs to know (its request checks, default size, what it
supports), so adding a family is its own module plus one line here, or one `register_family`
call from user code. A class with no family of its own goes to the generic diffusers adapter
when that can serve it. Entries are import paths, imported on first use: reading the registry
loads no model code.
"""

from __future__ import annotations

import importlib
from typing import Any

# Serves every other pipeline class it can (see pipelines/diffusers_adapter.py).
ADAPTER = "pipelines.diffusers_adapter:DiffusersAdapterPipeline"

_FAMILIES: dict[str, str | type] = {
    "QwenImagePipeline": "pipelines.qwen_image:QwenImageStepPipeline",
    "DiTPipeline": "pipelines.dit:DiTStepPipeline",
}


def register_family(pipeline_class: str, step_pipeline: type | str) -> None:
    """Serve models whose model_index.json names `pipeline_class` with `step_pipeline` (a
    StepPipeline subclass, or its "module:QualName" path). Worker processes import the class by
    that path, so it must live in an importable module."""
    if not isinstance(pipeline_class, str) or not pipeline_class:
        raise ValueError(f"pipeline_class must be a diffusers pipeline class name, got {pipeline_class!r}")
    if not isinstance(step_pipeline, (str, type)):
        raise ValueError(f"step_pipeline must be a StepPipeline subclass or 'module:Class', got {step_pipeline!r}")
    _FAMILIES[pipeline_class] = step_pipeline


def served_classes() -> list[str]:
    return list(_FAMILIES)  # registration order: the built-in families first


def served_families() -> list[type]:
    return [family_for(name) for name in served_classes()]


def family_for(pipeline_class: Any, components: dict[str, Any] | None = None, adapter: bool = False) -> type:
    """The StepPipeline subclass that serves a diffusers pipeline class: its registered family,
    else (or always, with `adapter=True`) the generic diffusers adapter where it can serve the
    class; `components` is model_index.json, which names the pipeline's components."""
    entry = _FAMILIES.get(pipeline_class) if isinstance(pipeline_class, str) and not adapter else None
    if entry is not None:
        return import_family(entry) if isinstance(entry, str) else entry
    adapter_family = import_family(ADAPTER)
    reason = adapter_family.serves(pipeline_class, components or {}) if isinstance(pipeline_class, str) else None
    if reason is None and isinstance(pipeline_class, str):
        return adapter_family
    raise ValueError(
        f"stepweave serves {', '.join(served_classes())} and, through its diffusers adapter, pipelines with a "
        f"{' or '.join(('transformer', 'transformer_2'))} and callback_on_step_end; this model is a "
        f"{pipeline_class!r}" + (f" ({reason})" if reason else "")
    )


def import_family(path: str) -> type:
    """'module:QualName' -> the class (how workers get the family the engine chose)."""
    module_name, _, qualname = path.partition(":")
    value: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


def family_path(family: type) -> str:
    return f"{family.__module__}:{family.__qualname__}"
