"""Errors as OpenAI's API returns them: a status code and `{"error": {message, type, param, code}}`,
so OpenAI client libraries raise their usual exception classes with our message."""

from __future__ import annotations

import re

from starlette.responses import JSONResponse

# The request field a validation message names: "SamplingParams.height must ..." -> "height".
_FIELD = re.compile(r"SamplingParams\.(\w+)")
# A prompt dict key a message names: "prompt['mask_image'] is ..." or "image is not an input of ...".
_PROMPT_KEY = re.compile(r"^(?:prompt\['(\w+)'\]|(\w+) is not an input)")
# Engine field names that the HTTP request spells differently.
_HTTP_NAMES = {"height": "size", "width": "size", "num_images_per_prompt": "n", "mask_image": "mask"}


class APIError(Exception):
    """An error the HTTP API answers with; `param` names the offending request field."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation(exc: ValueError) -> APIError:
    """A ValueError from stepweave's request checks as a 400 naming the HTTP field."""
    message = str(exc)
    match = _FIELD.search(message)
    key = _PROMPT_KEY.match(message)
    param = None
    if match is not None:
        param = _HTTP_NAMES.get(match.group(1), match.group(1))
    elif key is not None:
        name = key.group(1) or key.group(2)
        param = _HTTP_NAMES.get(name, name)
    elif message.startswith("negative_prompt") or message.startswith("prompt"):
        param = message.split()[0]
    return bad_request(message, param)


def overloaded(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="engine_overloaded")


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="engine_unavailable")


def generation_failed(message: str) -> APIError:
    return APIError(500, message, type="server_error", code="generation_failed")
