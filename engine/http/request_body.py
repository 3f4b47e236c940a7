"""Reading a JSON request body safely: the content type is JSON, the body is at most
`limit` bytes (refused from Content-Length before reading, or as soon as it grows past it), and
it parses; each failure is its own status with an OpenAI error object."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from engine.http.api_errors import APIError, bad_request

DEFAULT_MAX_BODY_BYTES = 1 << 20  # prompts are at most 32,000 characters; a body is far below this


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")


async def read_json(request: Request, limit: int) -> Any:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(
            415,
            f"Content-Type must be application/json, got {content_type or 'none'!r}",
            code="unsupported_content_type",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
