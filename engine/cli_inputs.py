"""What `stepweave generate` reads from its flags beyond text: input image files and pipeline
arguments, each failing with a line that names the flag."""

from __future__ import annotations

import json
from typing import Any


def read_images(flag: str, paths: list[str] | None) -> Any:
    """The PIL image(s) the files name: None for none, one image for one path, a list for more
    (as a pipeline's `image` argument takes them)."""
    if not paths:
        return None
    images = [_read_image(flag, path) for path in paths]
    return images[0] if len(images) == 1 else images


def _read_image(flag: str, path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise ValueError(f"{flag} {path!r}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{flag} {path!r}: not an image file PIL can read ({exc})") from None


def parse_pipeline_args(items: list[str] | None) -> dict[str, Any] | None:
    """NAME=VALUE pairs -> SamplingParams.pipeline_args; VALUE is JSON (a number, true, a list)
    where it parses as JSON, else the text itself."""
    if not items:
        return None
    args: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--pipeline-arg {item!r}: expected NAME=VALUE, e.g. max_sequence_length=256")
        try:
            args[name] = json.loads(text)
        except ValueError:
            args[name] = text
    return args
