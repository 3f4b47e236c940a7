"""Image request bodies (generations as JSON; edits arrive as forms, made a body by edit_request.py):
OpenAI's fields, stepweave's extensions, and nothing else.

Every field is type- and range-checked here or by `SamplingParams.validate`, and an error names
the field as the request spells it. OpenAI fields with no meaning for a diffusion engine are
accepted (with their documented types) and ignored, so unmodified OpenAI clients work; unknown
fields are refused, so a misspelt extension never silently becomes a default.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from engine.contract.sampling_params import SamplingParams
from engine.http.api_errors import APIError, bad_request, from_validation
from engine.http.sse_events import GENERATION

MAX_PROMPT_CHARS = 32_000  # OpenAI's limit for its image models
MAX_N = 10
OUTPUT_FORMATS = ("png", "jpeg", "webp")
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")

# Accepted with these types and ignored: quality, style, background and moderation choose
# between OpenAI's own models' behaviours; partial_images asks for intermediate pictures, which
# stepweave's stream replaces with a progress event per step; user / safety_identifier identify
# end users for OpenAI's abuse monitoring; the rest are for other output kinds (GIF, SVG).
IGNORED_FIELDS: dict[str, type | tuple] = {
    "background": str,
    "moderation": str,
    "quality": str,
    "style": str,
    "user": str,
    "safety_identifier": str,
    "partial_images": int,
    "complexity": str,
    "frame_count": int,
    "frame_duration_ms": int,
    "svg": dict,
}
# stepweave's own fields, by their SamplingParams names (checked there).
EXTENSION_FIELDS = (
    "num_inference_steps",
    "guidance_scale",
    "true_cfg_scale",
    "seed",
    "scheduler",
    "pipeline_args",
    "priority",
    "deadline_s",
)
OPENAI_FIELDS = ("model", "prompt", "n", "size", "response_format", "output_format", "output_compression", "stream")


@dataclass
class ImageRequest:
    model: str | None
    prompt: dict[str, Any]  # {"prompt": ..., "negative_prompt": ...}, as the engine takes it
    params: SamplingParams
    output_format: str
    output_compression: int | None
    stream: bool
    events: str = GENERATION  # the stream's event name prefix (edits: image_edit)


def parse_generation_request(body: Any) -> ImageRequest:
    """The engine request for one JSON body; APIError (400, naming the field) when it is wrong."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_json")
    return parse_image_request(body, EXTENSION_FIELDS, IGNORED_FIELDS)


def parse_image_request(
    body: dict,
    extensions: tuple[str, ...],
    ignored: dict[str, type | tuple],
    images: dict[str, Any] | None = None,
) -> ImageRequest:
    """A body with OpenAI's fields, these stepweave `extensions` and these `ignored` fields;
    `images` (prompt dict keys `image`, `mask_image`) join the prompt as they are."""
    known = set(OPENAI_FIELDS) | set(extensions) | set(ignored) | {"negative_prompt"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(f"Unknown parameter: {unknown[0]!r}", unknown[0], "unknown_parameter")
    for name, kind in ignored.items():
        _typed(body, name, kind)
    prompt = _typed(body, "prompt", str, required=True)
    negative = _typed(body, "negative_prompt", str)
    if not 1 <= len(prompt) <= MAX_PROMPT_CHARS:
        raise bad_request(f"prompt must hold 1 to {MAX_PROMPT_CHARS} characters, got {len(prompt)}", "prompt")
    if negative is not None and len(negative) > MAX_PROMPT_CHARS:
        raise bad_request(f"negative_prompt may hold at most {MAX_PROMPT_CHARS} characters", "negative_prompt")
    n = _typed(body, "n", int)
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n must be an integer in [1, {MAX_N}], got {n}", "n")
    height, width = _size(_typed(body, "size", str))
    response_format = _typed(body, "response_format", str)
    if response_format not in (None, "b64_json"):
        message = "response_format must be 'b64_json'; "
        message += "stepweave returns images inline and serves no files" if response_format == "url" else ""
        raise bad_request(message.rstrip("; ") + f" (got {response_format!r})", "response_format")
    output_format = _typed(body, "output_format", str) or "png"
    if output_format not in OUTPUT_FORMATS:
        raise bad_request(
            f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}", "output_format"
        )
    compression = _typed(body, "output_compression", int)
    if compression is not None and not 0 <= compression <= 100:
        raise bad_request(f"output_compression must be an integer in [0, 100], got {compression}", "output_compression")
    stream = bool(_typed(body, "stream", bool))
    given = {name: _typed(body, name, EXTENSION_TYPES[name]) for name in extensions}
    fields = {name: value for name, value in given.items() if value is not None}
    params = SamplingParams(height=height, width=width, num_images_per_prompt=n, **fields)
    try:
        params.validate()
    except ValueError as exc:
        raise from_validation(exc) from None
    return ImageRequest(
        model=_typed(body, "model", str),
        prompt={"prompt": prompt, "negative_prompt": negative, **(images or {})},
        params=params,
        output_format=output_format,
        output_compression=compression,
        stream=stream,
    )


EXTENSION_TYPES: dict[str, type | tuple] = {
    "num_inference_steps": int,
    "guidance_scale": (int, float),
    "true_cfg_scale": (int, float),
    "seed": int,
    "scheduler": str,
    "pipeline_args": dict,
    "strength": (int, float),
    "priority": int,
    "deadline_s": (int, float),
}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object", (int, float): "a number"}


def _typed(body: dict, name: str, kind: type | tuple, required: bool = False) -> Any:
    """body[name] if it has the type (null counts as absent); APIError naming it otherwise."""
    value = body.get(name)
    if value is None:
        if required:
            raise bad_request(f"Missing required parameter: {name!r}", name, "missing_required_parameter")
        return None
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        expected = _TYPE_NAMES.get(kind, str(kind))
        raise bad_request(f"{name} must be {expected}, got {type(value).__name__}", name, "invalid_type")
    return value


def _size(size: str | None) -> tuple[int | None, int | None]:
    """ "WxH" -> (height, width); "auto" or absent -> the model's default size."""
    if size is None or size == "auto":
        return None, None
    match = _SIZE.match(size)
    if match is None:
        raise bad_request(f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {size!r}", "size")
    return int(match.group(2)), int(match.group(1))


def check_model(request: ImageRequest, served: list[str]) -> str:
    """The model to use: the one named, which must be served, or the first one served."""
    if not served:
        raise APIError(503, "no engine is serving any model yet", type="server_error", code="engine_unavailable")
    if request.model is None:
        return served[0]
    if request.model not in served:
        raise APIError(
            404,
            f"The model {request.model!r} does not exist here; this server serves {', '.join(served)}",
            param="model",
            code="model_not_found",
        )
    return request.model
