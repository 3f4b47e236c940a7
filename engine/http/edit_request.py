"""`POST /v1/images/edits` forms: OpenAI's multipart shape made the same ImageRequest a
generation body makes, with the uploaded images in the prompt dict.

Form fields are text, so each is converted to the type the JSON body would carry (an error names
the field) and then checked by the same code as generations. `pipeline_args` comes as one JSON
object, or as `pipeline_args[NAME]` fields, which is how the `openai` client sends a dict in
`extra_body` (each value read as JSON where it parses, else as text). Images come as `image`
(one file) or `image[]` (several, as the `openai` client sends a list), the mask as `mask`.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from starlette.datastructures import FormData, UploadFile

from engine.contract.input_images import MAX_INPUT_IMAGES
from engine.http.api_errors import bad_request
from engine.http.image_request import (
    EXTENSION_FIELDS,
    EXTENSION_TYPES,
    IGNORED_FIELDS,
    ImageRequest,
    parse_image_request,
)
from engine.http.sse_events import EDIT
from engine.http.uploaded_images import decode_upload

EDIT_EXTENSIONS = (*EXTENSION_FIELDS, "strength")
# OpenAI's edit fields with no meaning here (see IGNORED_FIELDS), input_fidelity among them:
# it tunes how OpenAI's own models keep input features.
EDIT_IGNORED: dict[str, type | tuple] = {
    name: IGNORED_FIELDS[name]
    for name in ("background", "moderation", "quality", "user", "safety_identifier", "partial_images")
}
EDIT_IGNORED["input_fidelity"] = str
IMAGE_FIELDS = ("image", "image[]")
MASK_FIELD = "mask"
_FORM_TYPES: dict[str, type | tuple] = {
    "n": int,
    "output_compression": int,
    "stream": bool,
    **EXTENSION_TYPES,
    **EDIT_IGNORED,
}
_PIPELINE_ARG = re.compile(r"^pipeline_args\[([^\[\]]+)\](\[\])?$")
_INTEGER = re.compile(r"^[+-]?\d{1,20}$")


async def parse_edit_request(form: FormData, max_pixels: int) -> ImageRequest:
    """The engine request for one edit form; APIError (400 naming the field) when it is wrong.
    The text fields are checked before any image is decoded."""
    body: dict[str, Any] = {}
    pipeline_args: dict[str, Any] = {}
    for name in dict.fromkeys(form.keys()):
        if name in (*IMAGE_FIELDS, MASK_FIELD):
            continue
        values = form.getlist(name)
        if any(not isinstance(value, str) for value in values):
            raise bad_request(f"{name} must be a text field, not a file", name, "invalid_type")
        match = _PIPELINE_ARG.match(name)
        if match is not None:
            parsed = [_json_or_text(value) for value in values]
            pipeline_args[match.group(1)] = parsed if match.group(2) else _once(name, parsed)
            continue
        body[name] = _from_text(name, _once(name, values))
    if pipeline_args:
        if "pipeline_args" in body:
            raise bad_request(
                "give pipeline_args as one JSON object or as pipeline_args[NAME] fields, not both", "pipeline_args"
            )
        body["pipeline_args"] = pipeline_args
    request = parse_image_request(body, EDIT_EXTENSIONS, EDIT_IGNORED)
    images = await _decoded(form, IMAGE_FIELDS, "image", max_pixels)
    if not images:
        raise bad_request("Missing required parameter: 'image' (a file upload)", "image", "missing_required_parameter")
    masks = await _decoded(form, (MASK_FIELD,), MASK_FIELD, max_pixels)
    if len(masks) > 1:
        raise bad_request(f"mask takes one file, got {len(masks)}", MASK_FIELD)
    request.prompt["image"] = images[0] if len(images) == 1 else images
    request.prompt["mask_image"] = masks[0] if masks else None
    request.events = EDIT
    return request


async def _decoded(form: FormData, names: tuple[str, ...], field: str, max_pixels: int) -> list:
    uploads = [value for name in names for value in form.getlist(name)]
    if any(not isinstance(upload, UploadFile) for upload in uploads):
        raise bad_request(f"{field} must be a file upload (PNG, JPEG or WebP), not a text field", field, "invalid_type")
    if len(uploads) > MAX_INPUT_IMAGES:
        raise bad_request(f"{field} takes 1 to {MAX_INPUT_IMAGES} files, got {len(uploads)}", field)
    loop = asyncio.get_running_loop()
    images = []
    for upload in uploads:  # decoding a large picture would stall other requests: off the loop
        data = await upload.read()
        images.append(await loop.run_in_executor(None, decode_upload, field, data, max_pixels, field == MASK_FIELD))
    return images


def _once(name: str, values: list) -> Any:
    if len(values) != 1:
        raise bad_request(f"{name} is given {len(values)} times; give it once", name)
    return values[0]


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _from_text(name: str, text: str) -> Any:
    """A form field's text as the type its JSON counterpart has (unknown names stay text, to be
    refused by name)."""
    kind = _FORM_TYPES.get(name, str)
    value: Any = text
    if kind is int:
        value = int(text) if _INTEGER.match(text.strip()) else None
    elif kind == (int, float):
        try:
            value = float(text)
        except ValueError:
            value = None
        value = value if value is not None and math.isfinite(value) else None
    elif kind is bool:
        value = {"true": True, "1": True, "false": False, "0": False}.get(text.strip().lower())
    elif kind is dict:
        value = _json_or_text(text)
        value = value if isinstance(value, dict) else None
    if value is None:
        expected = {int: "an integer", bool: "true or false", dict: "a JSON object"}.get(kind, "a number")
        raise bad_request(f"{name} must be {expected}, got {text!r}", name, "invalid_type")
    return value
