"""`stepweave gateway`: the HTTP front door over several `stepweave serve` engine servers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys


def _gateway(args: argparse.Namespace) -> int:
    from engine.http.uvicorn_runner import bind_http, check_http_exposure, parse_http_address

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    keys = args.server_key or []
    if len(keys) not in (0, 1, len(args.engine)):
        raise ValueError(
            f"--server-key: give one for all engines or one per --engine ({len(args.engine)}), got {len(keys)}"
        )
    if len(keys) == 1:
        keys = keys * len(args.engine)
    if args.engine_timeout <= 0:
        raise ValueError(f"--engine-timeout must be a positive number of seconds, got {args.engine_timeout}")
    if args.health_interval <= 0:
        raise ValueError(f"--health-interval must be a positive number of seconds, got {args.health_interval}")
    host, port = parse_http_address(args.http)
    check_http_exposure(host, args.api_key)
    sock = bind_http(host, port)
    asyncio.run(_run(args, keys, sock))
    return 0


async def _run(args: argparse.Namespace, keys: list, sock) -> None:
    from engine.http.app import build_app
    from engine.http.gateway import GatewayBackend
    from engine.http.metrics import ServiceMetrics
    from engine.http.uvicorn_runner import http_url, make_server

    log = logging.getLogger("stepweave.gateway")
    metrics = ServiceMetrics()
    backend = GatewayBackend(
        args.engine,
        auth_token=args.auth_token,
        server_keys=keys,
        timeout_s=args.engine_timeout,
        health_interval_s=args.health_interval,
        metrics=metrics,
    )
    try:
        await backend.start()
        app = build_app(
            backend,
            metrics,
            api_key=args.api_key,
            max_body_bytes=args.max_body_bytes,
            max_upload_bytes=args.max_upload_bytes,
        )
        up = sum(route.healthy for route in backend.routes)
        log.info("stepweave gateway ready: %s over %d engine server(s), %d up", http_url(sock), len(backend.routes), up)
        await make_server(app).serve(sockets=[sock])
    finally:
        await backend.close()


def add_gateway_parser(commands) -> None:
    from engine.cli import EXIT_CODES, LOG_LEVELS, _HelpFormatter, add_http_args

    gateway = commands.add_parser(
        "gateway",
        help="one HTTP front door (OpenAI Images API) over several engine servers",
        description="Route HTTP requests to `stepweave serve` engine servers: fewest outstanding requests first, "
        "dead engines skipped, their in-flight requests answered with 503.",
        formatter_class=_HelpFormatter,
        epilog=EXIT_CODES,
    )
    gateway.add_argument("--http", required=True, metavar="HOST:PORT", help="where to serve HTTP")
    gateway.add_argument(
        "--engine",
        action="append",
        required=True,
        metavar="ADDR",
        help="an engine server's ipc:// or tcp:// address (repeat)",
    )
    gateway.add_argument(
        "--auth-token", default=os.environ.get("STEPWEAVE_AUTH_TOKEN"), help="the engine servers' token"
    )
    gateway.add_argument(
        "--server-key",
        action="append",
        default=None,
        help="CURVE public key file: once for all engines or once per --engine",
    )
    gateway.add_argument(
        "--engine-timeout",
        type=float,
        default=5.0,
        help="seconds an engine may stay silent (a health check, or its heartbeat replies) before it counts as down; "
        "an engine process that exits is noticed at once",
    )
    gateway.add_argument("--health-interval", type=float, default=0.5, help="seconds between health checks")
    gateway.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="info: engines going up and down")
    add_http_args(gateway)
    gateway.set_defaults(func=_gateway)
