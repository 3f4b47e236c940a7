"""`stepweave serve --http`: the HTTP app over the engine server's own AsyncEngine, with metrics
for every request the engine finishes (HTTP and ZeroMQ alike)."""

from __future__ import annotations

import socket

from engine.http.app import build_app
from engine.http.engine_backend import EngineBackend
from engine.http.metrics import ServiceMetrics, attach_engine
from engine.http.uvicorn_runner import serve_beside
from engine.service.server import EngineServer


async def serve_with_http(
    server: EngineServer, sock: socket.socket, *, api_key: str | None, max_body_bytes: int, max_upload_bytes: int
) -> None:
    backend = EngineBackend(server.engine, server)
    metrics = ServiceMetrics()
    attach_engine(metrics, server.engine, lambda: backend.serving)
    app = build_app(backend, metrics, api_key=api_key, max_body_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes)
    await serve_beside(server, app, sock)
