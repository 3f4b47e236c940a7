"""The FastAPI app: OpenAI's Images API over a backend (the server's own engine, or the gateway's
engine servers), plus /health and /metrics.

A backend provides `models()`, `serving`, `track(task)`, `max_input_pixels` (per uploaded
image) and `generate(model, prompt, params)`,
an async iterator of RequestOutputs that raises ValueError (bad request), OverloadedError or
EngineDeadError (the engine is gone). Everything here is the HTTP side of it: auth, body
limits, request parsing, responses and the event stream.
"""

from __future__ import annotations

import asyncio
import hmac
import time

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.http import sse_events
from engine.http.api_errors import APIError, unavailable
from engine.http.edit_request import parse_edit_request
from engine.http.generation import ERROR, FINAL, GONE, PROGRESS, Generation
from engine.http.image_encoding import encode_image
from engine.http.image_request import ImageRequest, check_model, parse_generation_request
from engine.http.metrics import CONTENT_TYPE, ServiceMetrics
from engine.http.request_body import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_UPLOAD_BYTES, read_form, read_json

CLIENT_GONE = 499  # nginx's "client closed request": counted, never seen by the client
ROUTES = ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations", "/v1/models", "/health", "/metrics")
# OpenAI reports token usage; a diffusion engine has none to count, so the fields are zero.
USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}
USAGE = {**USAGE, "output_tokens": 0, "total_tokens": 0}


def build_app(
    backend,
    metrics: ServiceMetrics | None = None,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
) -> FastAPI:
    metrics = metrics if metrics is not None else ServiceMetrics()
    app = FastAPI(title="stepweave", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    def answer(route: str, response: Response) -> Response:
        metrics.http_responses.labels(route, str(response.status_code)).inc()
        return response

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                401, "Missing bearer authentication in header (Authorization: Bearer KEY)", code="invalid_api_key"
            )
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        route = request.url.path if request.url.path in ROUTES else "other"
        return answer(route, exc.response())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        """Unknown routes and methods, in OpenAI's error shape too."""
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return answer(
            "other", APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None).response()
        )

    async def respond(request: Request, image_request: ImageRequest, route: str) -> Response:
        """Generate (an image request from either route) and answer: JSON, or the event stream."""
        if not backend.serving:
            raise unavailable("the engine is not taking requests (shutting down or dead)")
        model = check_model(image_request, backend.models())
        generation = Generation(backend, model, image_request, request)
        try:
            kind, payload = await generation.next()
            while kind == PROGRESS and not image_request.stream:
                kind, payload = await generation.next()
        except BaseException:
            generation.close()
            raise
        if kind == GONE:
            generation.close()
            return answer(route, Response(status_code=CLIENT_GONE))
        if kind == ERROR:
            generation.close()
            raise payload
        if not image_request.stream:
            generation.close()
            return answer(route, JSONResponse(await _images_body(payload, image_request)))
        return answer(
            route, StreamingResponse(_stream(generation, kind, payload, image_request), media_type="text/event-stream")
        )

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        check_auth(request)
        image_request = parse_generation_request(await read_json(request, max_body_bytes))
        return await respond(request, image_request, "/v1/images/generations")

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        check_auth(request)
        form = await read_form(request, max_upload_bytes)
        try:
            image_request = await parse_edit_request(form, backend.max_input_pixels)
        finally:
            await form.close()
        return await respond(request, image_request, "/v1/images/edits")

    @app.post("/v1/images/variations")
    async def variations(request: Request) -> Response:
        check_auth(request)
        raise APIError(
            400,
            "image variations are not served (no stepweave pipeline makes variations of an image); "
            "use /v1/images/edits with a prompt",
            param="image",
            code="unsupported",
        )

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        check_auth(request)
        data = [
            {"id": name, "object": "model", "created": started, "owned_by": "stepweave"} for name in backend.models()
        ]
        return answer("/v1/models", JSONResponse({"object": "list", "data": data}))

    @app.get("/health")
    async def health() -> Response:
        up = backend.serving
        return answer(
            "/health", JSONResponse({"status": "ok" if up else "unavailable"}, status_code=200 if up else 503)
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return answer("/metrics", Response(metrics.render(), media_type=CONTENT_TYPE))

    return app


async def _encoded(output, request: ImageRequest) -> list[str]:
    """Encode off the event loop: a large PNG takes long enough to stall other requests."""
    loop = asyncio.get_running_loop()
    encode = [
        loop.run_in_executor(None, encode_image, image, request.output_format, request.output_compression)
        for image in output.images
    ]
    return list(await asyncio.gather(*encode))


def _size(output) -> str:
    width, height = output.images[0].size
    return f"{width}x{height}"


async def _images_body(output, request: ImageRequest) -> dict:
    encoded = await _encoded(output, request)
    seeds = [None if output.seed is None else output.seed + i for i in range(len(encoded))]
    return {
        "created": int(time.time()),
        "data": [{"b64_json": b64, "seed": seed} for b64, seed in zip(encoded, seeds)],
        "output_format": request.output_format,
        "size": _size(output),
        "usage": USAGE,
    }


async def _stream(generation: Generation, kind: str, payload, request: ImageRequest):
    """The event stream: progress per step, then a completed event per image (or an error).
    The engine keeps only a request's latest progress for a consumer that fell behind; the
    steps it skipped are done too, so each still gets its event, late."""
    done = 0  # the steps announced so far
    try:
        while True:
            if kind in (PROGRESS, FINAL):
                reached = payload.num_steps if kind == FINAL else payload.step
                for step in range(done + 1, reached + 1):
                    yield sse_events.progress_event(step, payload.num_steps, request.events)
                done = max(done, reached)
            if kind == FINAL:
                for index, b64 in enumerate(await _encoded(payload, request)):
                    seed = None if payload.seed is None else payload.seed + index
                    size, output_format = _size(payload), request.output_format
                    yield sse_events.completed_event(b64, index, seed, size, output_format, USAGE, request.events)
                return
            if kind == ERROR:
                yield sse_events.error_event(payload.body())
            if kind in (ERROR, GONE):
                return
            kind, payload = await generation.next()
    finally:
        generation.close()
