"""Finished images as the bytes an OpenAI client decodes: PNG (with the settings as text chunks,
as `image.save` writes them everywhere else in stepweave), JPEG or WebP, base64-encoded."""

from __future__ import annotations

import base64
import io

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(image, output_format: str, compression: int | None = None) -> str:
    """Base64 of one PIL image in `output_format`; `compression` (0-100, OpenAI's
    output_compression) sets the JPEG/WebP quality to 100 - compression (PNG is lossless)."""
    options = {}
    if compression is not None and output_format != "png":
        options["quality"] = max(1, 100 - compression)
    buffer = io.BytesIO()
    image.save(buffer, format=_PIL_FORMATS[output_format], **options)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
