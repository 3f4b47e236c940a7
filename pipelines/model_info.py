"""What the engine may know about a model without loading it: family, default size, scheduler.

Read from the diffusers directory's JSON files only (no weights), so the engine process can
validate a request at submission, name the bad field, and never send it to a worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.schedulers import check_schedule, check_scheduler

if TYPE_CHECKING:  # the engine imports this module; no import back at run time
    from engine.sampling_params import SamplingParams

# diffusers pipeline class (model_index.json "_class_name") -> our family name
FAMILIES = {"QwenImagePipeline": "qwen-image", "DiTPipeline": "dit"}
MAX_PROMPT_CHARS = 20_000  # the tokenizer truncates far below this; the cap bounds the work


def resolve_model(model: str | Path) -> Path:
    """A preset name or a diffusers-format directory -> that directory."""
    path = Path(model)
    if (path / "model_index.json").is_file():
        return path
    from pipelines.presets import PRESETS, preset_dir

    if isinstance(model, str) and model in PRESETS:
        return preset_dir(model)
    raise ValueError(
        f"model must be a preset name ({', '.join(PRESETS)}) or a diffusers directory with a "
        f"model_index.json; got {str(model)!r}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"model directory is broken: cannot read {path}: {exc}") from exc


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    family: str
    default_height: int
    default_width: int
    scheduler_config: dict[str, Any]
    num_classes: int = 0  # DiT: valid class labels are [0, num_classes)
    num_layers: int = 0  # transformer blocks, for pipeline-parallel partitions

    @property
    def max_image_tokens(self) -> int:
        """The largest image the model's timestep shift is defined for (bounds worker memory)."""
        return int(self.scheduler_config.get("max_image_seq_len", 4096))

    @property
    def flow(self) -> bool:
        return self.family == "qwen-image"

    @classmethod
    def load(cls, model: str | Path) -> "ModelInfo":
        path = resolve_model(model)
        index = _read_json(path / "model_index.json")
        pipeline_class = index.get("_class_name")
        if pipeline_class not in FAMILIES:
            raise ValueError(
                f"model {str(path)!r} is a {pipeline_class!r}; stepweave serves {', '.join(FAMILIES)}"
            )
        family = FAMILIES[pipeline_class]
        extra = _read_json(path / "stepweave.json") if (path / "stepweave.json").is_file() else {}
        scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
        transformer = _read_json(path / "transformer" / "config.json")
        if family == "dit":
            side = int(transformer["sample_size"]) * 8
            classes = int(transformer.get("num_embeds_ada_norm") or 0)
            return cls(path, family, side, side, scheduler_config, classes, int(transformer.get("num_layers", 0)))
        # diffusers' QwenImagePipeline default: 128 latent pixels * the VAE's 8x
        return cls(
            path,
            family,
            int(extra.get("default_height", 1024)),
            int(extra.get("default_width", 1024)),
            scheduler_config,
            num_layers=int(transformer.get("num_layers", 0)),
        )

    def validate(
        self,
        params: "SamplingParams",
        prompt: str | None,
        negative_prompt: str | None,
        class_label: int | None,
    ) -> None:
        """Raise ValueError (naming the field and what it accepts) for a request this model
        cannot serve; also tries the requested scheduler. `params` has passed its own validate()."""
        if self.family == "qwen-image":
            if not isinstance(prompt, str) or not prompt or len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(
                    f"prompt must be a non-empty string of at most {MAX_PROMPT_CHARS} characters, got {_short(prompt)}"
                )
            if negative_prompt is not None and (not isinstance(negative_prompt, str) or len(negative_prompt) > MAX_PROMPT_CHARS):
                raise ValueError(
                    f"negative_prompt must be null or a string of at most {MAX_PROMPT_CHARS} characters, got {_short(negative_prompt)}"
                )
            for side in ("height", "width"):
                value = getattr(params, side)
                if value is not None and value % 16:
                    raise ValueError(f"SamplingParams.{side} must be a multiple of 16 in [16, 4096], got {value}")
            height = params.height or self.default_height
            width = params.width or self.default_width
            tokens, limit = (height // 16) * (width // 16), self.max_image_tokens
            if tokens > limit:
                raise ValueError(
                    f"SamplingParams.height x width = {height}x{width} gives {tokens} image tokens; this model allows "
                    f"at most {limit} (height/16 * width/16)"
                )
        else:
            if isinstance(class_label, bool) or not isinstance(class_label, int) or not 0 <= class_label < self.num_classes:
                raise ValueError(f"class_label must be an integer in [0, {self.num_classes - 1}], got {class_label!r}")
            for side, default in (("height", self.default_height), ("width", self.default_width)):
                value = getattr(params, side)
                if value is not None and value != default:
                    raise ValueError(f"SamplingParams.{side} must be {default} (fixed by this DiT model), got {value}")
        check_scheduler(self.scheduler_config, params.scheduler, params.scheduler_config, self.flow)
        if self.flow:
            tokens = ((params.height or self.default_height) // 16) * ((params.width or self.default_width) // 16)
        else:
            tokens = 0
        check_schedule(
            self.scheduler_config, params.scheduler, params.scheduler_config, self.flow, params.num_inference_steps, tokens
        )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
