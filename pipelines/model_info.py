"""What the engine may know about a model without loading it: its family, configs and defaults.

Read from the diffusers directory's JSON files only (no weights), so the engine process can
validate a request at submission, name the bad field, and never send it to a worker. The family
comes from the registry; the checks that differ between families are the family's own.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.registry import family_for

if TYPE_CHECKING:  # the engine imports this module; no import back at run time
    from engine.contract.sampling_params import SamplingParams


def resolve_model(model: str | Path) -> Path:
    """A preset name, a diffusers-format directory or a Hugging Face repo id -> a directory."""
    path = Path(model)
    if (path / "model_index.json").is_file():
        return path
    from pipelines.presets import PRESETS, preset_dir

    if isinstance(model, str) and model in PRESETS:
        return preset_dir(model)
    if isinstance(model, str) and REPO_ID.fullmatch(model) and not path.exists():
        return hub_snapshot(model)
    raise ValueError(
        f"model must be a preset name ({', '.join(PRESETS)}), a diffusers directory with a "
        f"model_index.json or a Hugging Face repo id (org/name); got {str(model)!r}"
    )


# "org/name", as the Hub spells repo ids; a relative path that exists is a directory instead.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def hub_snapshot(repo_id: str) -> Path:
    """The repo's files from the Hugging Face cache, downloaded first where a network is
    reachable (HF_HUB_OFFLINE=1: the cache only). Only what a diffusers pipeline loads."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # diffusers depends on it; a trimmed install may not
        raise ValueError(f"model {repo_id!r} looks like a Hugging Face repo id, but huggingface_hub is missing")
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"model {repo_id!r}: not a preset or directory, and not in the Hugging Face cache: {reason}")
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"model {repo_id!r}: the Hugging Face repo has no model_index.json (not a diffusers pipeline)")
    return folder


# What diffusers reads from a pipeline repo: configs, tokenizers, safetensors weights.
HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors", "*.jinja"]  # fnmatch: * spans folders


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"model directory is broken: cannot read {path}: {exc}") from exc


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    pipeline_class: str  # model_index.json's "_class_name"
    family: type  # the StepPipeline subclass that serves this model (from the registry)
    default_height: int | None  # None: the pipeline's own default
    default_width: int | None
    scheduler_config: dict[str, Any]
    transformer_config: dict[str, Any]
    default_num_frames: int | None = None  # a video preset's frame count; None: the pipeline's own

    @property
    def pipeline_type(self) -> type:
        """The diffusers pipeline class (importing diffusers, loading no weights)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    @property
    def num_layers(self) -> int:
        """Transformer blocks, for pipeline-parallel partitions."""
        return int(self.transformer_config.get("num_layers", 0))

    @property
    def flow(self) -> bool:
        """A flow-matching model (its scheduler integrates a velocity field)."""
        return self.family.flow_matching or str(self.scheduler_config.get("_class_name", "")).startswith("FlowMatch")

    @classmethod
    def load(cls, model: str | Path, family: type | None = None, adapter: bool = False) -> ModelInfo:
        """`family` overrides the registry (workers get the one the engine chose); `adapter`
        serves the model through the generic diffusers adapter even if it has a family."""
        path = resolve_model(model)
        index = _read_json(path / "model_index.json")
        pipeline_class = index.get("_class_name")
        if family is None:
            family = family_for(pipeline_class, index, adapter)
        # Presets record their default size here; other directories get the family's default.
        preset = _read_json(path / "stepweave.json") if (path / "stepweave.json").is_file() else {}
        config = path / "transformer" / "config.json"
        transformer = _read_json(config) if config.is_file() or "transformer" in index else {}
        height, width = family.default_size(transformer, preset)
        scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
        frames = preset.get("default_num_frames")
        return cls(path, pipeline_class, family, height, width, scheduler, transformer, frames)

    def validate(self, params: SamplingParams, fields: dict[str, Any]) -> None:
        """Raise ValueError (naming the field and what it accepts) for a request this model
        cannot serve; also tries the requested scheduler. `params` has passed its own validate()."""
        family = self.family
        for key, value in fields.items():
            if value is not None and key not in family.inputs:
                raise ValueError(f"{key} is not an input of {family.name} models; they take {', '.join(family.inputs)}")
        if params.strength is not None and "image" not in family.inputs:
            raise ValueError(f"SamplingParams.strength is for image-to-image pipelines; {family.name} models take none")
        if params.num_frames is not None and not self.makes_video:
            raise ValueError(f"SamplingParams.num_frames is for video pipelines; {self.pipeline_class} makes images")
        if params.pipeline_args and not family.accepts_pipeline_args:
            raise ValueError(
                f"SamplingParams.pipeline_args is for pipelines served through the diffusers adapter; "
                f"{family.name} models take none"
            )
        family.check_request(self, params, fields)
        family.check_scheduler_choice(self, params)
        self.num_steps(params)  # a step count the pipeline would refuse (image-to-image) fails here
        if params.true_cfg_scale is not None and params.true_cfg_scale > 1 and fields.get("negative_prompt") is None:
            if self.takes_true_cfg:
                warn_once(
                    "true_cfg_scale > 1 has no effect without a negative prompt: "
                    f"{self.pipeline_class} runs true CFG only with one (as diffusers does)"
                )

    def num_steps(self, params: SamplingParams) -> int:
        """Denoising steps the request really runs (fewer than asked for image-to-image)."""
        return self.family.num_steps(self, params)

    @property
    def makes_video(self) -> bool:
        """The pipeline generates videos (its __call__ takes num_frames)."""
        return self.call_default("num_frames") is not None

    def frames_for(self, params: SamplingParams) -> int | None:
        """The frames a request makes: its num_frames, else the preset's or the pipeline's default
        (None for an image pipeline)."""
        if not self.makes_video:
            return None
        return params.num_frames or self.default_num_frames or int(self.call_default("num_frames"))

    def call_default(self, name: str) -> Any:
        """The default of the pipeline's __call__ argument `name` (None when it has none)."""
        import inspect

        import diffusers

        pipe_cls = getattr(diffusers, self.pipeline_class, None)  # a user family may name its own class
        if not isinstance(pipe_cls, type):
            return None
        parameter = inspect.signature(pipe_cls.__call__).parameters.get(name)
        return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default

    @property
    def takes_true_cfg(self) -> bool:
        """The pipeline has true CFG (a negative-prompt branch scaled by true_cfg_scale)."""
        import inspect

        return "true_cfg_scale" in inspect.signature(self.pipeline_type.__call__).parameters


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """A warning about a request that still runs, once per process (not once per request)."""
    if message not in _warned:
        _warned.add(message)
        logging.getLogger("stepweave").warning(message)
