"""Server-sent events for `stream: true`, in the shape of OpenAI's image streaming.

OpenAI streams `image_generation.partial_image` and `image_generation.completed` events; a
diffusion step has no cheap picture to show, so stepweave sends `image_generation.progress`
(step k of n) after every step instead of partial images, then one `image_generation.completed`
per image, shaped as OpenAI's (with `image_index` and `seed` added). Edits name their events
`image_edit.*`, as OpenAI's edit streams do. A failure after the stream
began is an `error` event carrying the OpenAI error object, which OpenAI's clients raise.
"""

from __future__ import annotations

import json
import time


def event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


GENERATION, EDIT = "image_generation", "image_edit"  # event name prefixes, per route


def progress_event(step: int, num_steps: int, prefix: str = GENERATION) -> bytes:
    kind = f"{prefix}.progress"
    return event(kind, {"type": kind, "step": step, "num_steps": num_steps, "created_at": int(time.time())})


def completed_event(
    b64: str, index: int, seed: int | None, size: str, output_format: str, usage: dict, prefix: str = GENERATION
) -> bytes:
    kind = f"{prefix}.completed"
    data = {
        "type": kind,
        "b64_json": b64,
        "created_at": int(time.time()),
        "size": size,
        "quality": "auto",
        "background": "opaque",
        "output_format": output_format,
        "usage": usage,
        "image_index": index,
        "seed": seed,
    }
    return event(kind, data)


def error_event(error_body: dict) -> bytes:
    return event("error", {"type": "error", **error_body})
