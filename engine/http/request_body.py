"""Reading a request body safely: the content type is the one the route takes (JSON, or a
multipart form with files for edits), the body is at most `limit` bytes (refused from
Content-Length before reading, or as soon as it grows past it), and it parses; each failure is
its own status with an OpenAI error object."""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import FormData
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import Request

from engine.http.api_errors import APIError, bad_request

DEFAULT_MAX_BODY_BYTES = 1 << 20  # prompts are at most 32,000 characters; a body is far below this
# An edit's uploaded files: a few compressed input images, each decoding to at most
# max_input_pixels; OpenAI allows up to 50 MB per file, a far larger picture than the engine takes.
DEFAULT_MAX_UPLOAD_BYTES = 32 << 20
MAX_FORM_FILES = 8  # image[] (at most MAX_INPUT_IMAGES) and mask
MAX_FORM_FIELDS = 64


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _wrong_content_type(request: Request, expected: str) -> APIError:
    content_type = request.headers.get("content-type", "")
    return APIError(
        415, f"Content-Type must be {expected}, got {content_type or 'none'!r}", code="unsupported_content_type"
    )


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> Any:
    if _content_type(request) != "application/json":
        raise _wrong_content_type(request, "application/json")
    body = await _read_limited(request, limit)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None


async def read_form(request: Request, limit: int) -> FormData:
    """A multipart form (files as UploadFile, the rest as text; a url-encoded form has no files
    but is read too, so that its missing file is named); the caller closes it. The body is read
    whole first, so its size limit holds before any part is parsed."""
    content_type = _content_type(request)
    if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise _wrong_content_type(request, "multipart/form-data")
    body = await _read_limited(request, limit)

    async def parts():
        yield body

    if content_type == "application/x-www-form-urlencoded":
        return await FormParser(request.headers, parts()).parse()
    parser = MultiPartParser(request.headers, parts(), max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise bad_request(f"the multipart form is malformed: {exc.message}", None, "invalid_multipart") from None
