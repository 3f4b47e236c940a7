"""Uploaded image files (an edit's `image` and `mask`) decoded safely into PIL images.

An upload is untrusted: only PNG, JPEG and WebP are opened, its pixel count (read from the
header by `Image.open`) is checked against the engine's limit before any pixel is decoded, so a
small file that claims a huge picture costs nothing, and a truncated or corrupt file is refused
instead of decoded half-grey. Every refusal is a 400 naming the form field.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from engine.http.api_errors import bad_request

UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")


def decode_upload(field: str, data: bytes, max_pixels: int, mask: bool = False) -> Image.Image:
    """The file's first frame as RGB (or L for a mask); APIError (400, param `field`) otherwise."""
    if not data:
        raise bad_request(f"{field} is an empty file; upload a PNG, JPEG or WebP image", field, "invalid_image")
    try:
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except Image.DecompressionBombError as exc:
        raise bad_request(f"{field} has too many pixels: {exc}", field, "image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise bad_request(
            f"{field} is not an image this server reads (PNG, JPEG or WebP)", field, "invalid_image"
        ) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise bad_request(
                f"{field} is {width}x{height} = {width * height} pixels; this server accepts at most "
                f"{max_pixels} pixels per input image",
                field,
                "image_too_large",
            )
        try:
            image.load()
            return image.convert("L" if mask else "RGB")
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise bad_request(f"{field} is truncated or corrupt ({exc})", field, "invalid_image") from None
