"""Running the HTTP app under uvicorn: the listening socket bound up front (so a taken port is a
usage error before any model loads, and port 0 reports the port it got), and, inside `stepweave
serve`, uvicorn in the same event loop as the ZeroMQ server, without signal handlers of its own:
the engine server's SIGTERM drain decides when both stop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket

import uvicorn

log = logging.getLogger("stepweave.http")

GRACEFUL_SHUTDOWN_S = 5.0  # open connections after the engine is gone: responses are all sent by then


def parse_http_address(text: str) -> tuple[str, int]:
    """ "HOST:PORT" (IPv6 as "[::1]:PORT") -> (host, port); ValueError naming --http otherwise."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http must be HOST:PORT with a port in [0, 65535] (e.g. 127.0.0.1:8000), got {text!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_http_exposure(host: str, api_key: str | None) -> None:
    """Anything reachable from other machines needs an API key, as the ZeroMQ side needs a token."""
    if not is_loopback(host) and api_key is None:
        raise ValueError(
            f"--http {host}: binding a non-loopback address requires --api-key (or $STEPWEAVE_API_KEY), "
            "so that clients must present it as a Bearer token"
        )


def bind_http(host: str, port: int) -> socket.socket:
    """A listening TCP socket; ValueError naming --http when the address cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this. Without it a kept-alive connection's responses wait
        # on Nagle's algorithm and the client's delayed ACK: ~40 ms per request on loopback (uvicorn
        # sets it on sockets it binds itself, not on one handed to it).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
    except OSError as exc:
        raise ValueError(f"--http {host}:{port}: cannot bind: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def http_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(app, log_level: str = "warning", *, own_signals: bool = True) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        log_config=None,  # leave stepweave's logging as it is
        log_level=log_level,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    return uvicorn.Server(config) if own_signals else _EmbeddedServer(config)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn that leaves SIGTERM/SIGINT to the engine server it runs beside."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def serve_beside(engine_server, app, sock: socket.socket) -> None:
    """Serve `app` on `sock` while `engine_server` runs; stop once it has drained and stopped."""
    http = make_server(app, own_signals=False)
    task = asyncio.create_task(http.serve(sockets=[sock]))
    while not http.started:
        if task.done():
            task.result()  # uvicorn failed to start: raise its error
            raise RuntimeError("the HTTP server stopped during startup")
        await asyncio.sleep(0.01)
    log.info("HTTP API (OpenAI Images) on %s", http_url(sock))
    try:
        await engine_server.serve()
    finally:
        http.should_exit = True
        await task
