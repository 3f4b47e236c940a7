"""The `stepweave` command line: generate, serve, status, export-preset, keygen, bench.

Every command that starts an engine takes the same engine options, turned into one
EngineConfig by `engine_config`, so a flag means the same thing wherever it appears. A mistake
is one line on stderr that names the flag or field, never a traceback (set STEPWEAVE_DEBUG=1
to see one), and the exit code says what kind of failure it was (EXIT_CODES).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import NoReturn

from engine.contract.config import EngineConfig, ParallelConfig

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = """exit codes:
  0    success
  1    the command ran and failed: a request failed while generating, the engine or server died,
       the server could not be reached
  2    the command was wrong and nothing ran: a bad flag or value, an unknown model, a missing
       device, an unwritable output path
  130  interrupted (Ctrl-C); everything it started is stopped"""
LOG_LEVELS = ("debug", "info", "warning", "error")


class UsageError(ValueError):
    """A mistake in the command line, found before anything ran (exit code 2)."""


class CommandParser(argparse.ArgumentParser):
    """argparse, with a one-line error (no usage block) and flag defaults in the help."""

    def __init__(self, *args, epilog_factory=None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.epilog_factory = epilog_factory  # an epilog computed only when help is shown

    def format_help(self) -> str:
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's layout and shows each flag's default."""


def add_engine_args(parser: argparse.ArgumentParser, default_model: str = "tiny-qwen-image") -> None:
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--model",
        default=default_model,
        help="preset name, diffusers directory or Hugging Face repo id (org/name, from its cache)",
    )
    engine.add_argument("--max-num-seqs", type=int, default=8, help="requests that step together")
    engine.add_argument("--cfg-parallel-size", type=int, default=1, help="ranks that split the CFG branches")
    engine.add_argument("--pp-size", type=int, default=1, help="pipeline stages that split the transformer's blocks")
    engine.add_argument(
        "--executor",
        choices=["inproc", "mp"],
        default="mp",
        help="mp: the model runs in worker processes; inproc: in this process (one rank)",
    )
    engine.add_argument(
        "--device", default=None, help="cpu, cuda (rank r on GPU r) or cuda:N (default: cuda when available)"
    )
    engine.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: float32")
    engine.add_argument("--compile", action="store_true", help="torch.compile the transformer (dynamic shapes)")
    engine.add_argument(
        "--max-input-pixels",
        type=int,
        default=EngineConfig().max_input_pixels,
        help="pixels (height x width) one input image may have; larger ones are refused",
    )
    engine.add_argument(
        "--max-input-images-mb",
        type=int,
        default=EngineConfig().max_input_images_mb,
        help="MiB of input images the unfinished requests may hold together; more are refused as overloaded",
    )
    engine.add_argument(
        "--scheduling-policy",
        choices=["fcfs", "priority", "deadline"],
        default="fcfs",
        help="which requests step next: fcfs; priority (SamplingParams.priority, aged); deadline "
        "(SamplingParams.deadline_s, least slack first, preempting within --max-paused)",
    )
    engine.add_argument(
        "--priority-aging-s", type=float, default=10.0, help="priority: seconds of waiting that add one level"
    )
    engine.add_argument(
        "--deadline-admission",
        choices=["reject", "best_effort"],
        default="reject",
        help="deadline: refuse a request that cannot meet its deadline even alone, or run it best effort",
    )
    engine.add_argument(
        "--cost-profile",
        default=None,
        help="step-time cost profile: a JSON file or 'measure' (default: measure at start under deadline)",
    )


def engine_config(args: argparse.Namespace, **extra) -> EngineConfig:
    parallel = ParallelConfig(cfg_parallel_size=args.cfg_parallel_size, pipeline_parallel_size=args.pp_size)
    return EngineConfig.of(
        args.model,
        max_num_seqs=args.max_num_seqs,
        parallel_config=parallel,
        executor=args.executor,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        max_input_pixels=args.max_input_pixels,
        max_input_images_mb=args.max_input_images_mb,
        scheduling_policy=args.scheduling_policy,
        priority_aging_s=args.priority_aging_s,
        deadline_admission=args.deadline_admission,
        cost_profile=args.cost_profile,
        **extra,
    )


# -- serve and status --------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    from engine.async_engine import AsyncEngine
    from engine.service.address import check_bind_address, claim_ipc_path, default_address, load_server_keys
    from engine.service.server import EngineServer

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    log = logging.getLogger("stepweave.server")
    address = args.address or default_address()
    check_bind_address(address, args.auth_token)  # before loading anything
    http_socket = _bind_http(args) if args.http is not None else None
    if args.curve_secret_key is not None:
        load_server_keys(args.curve_secret_key)
    if address.startswith("ipc://"):
        claim_ipc_path(address)
    log.info("starting engine for %s; will serve on %s", args.model, address)
    engine = AsyncEngine(
        engine_config(
            args,
            max_waiting=args.max_waiting,
            max_worker_restarts=args.max_worker_restarts,
            max_paused=args.max_paused if args.pp_size == 1 else 0,
        )
    )
    try:
        server = EngineServer(
            engine,
            address,
            auth_token=args.auth_token,
            curve_secret_key=args.curve_secret_key,
            client_timeout_s=args.client_timeout,
            drain_timeout_s=args.drain_timeout,
            max_requests_per_client=args.max_requests_per_client,
        )
    except BaseException:
        engine.shutdown()
        raise
    if http_socket is None:
        asyncio.run(server.serve())
    else:
        from engine.http.serve_app import serve_with_http

        asyncio.run(
            serve_with_http(
                server,
                http_socket,
                api_key=args.api_key,
                max_body_bytes=args.max_body_bytes,
                max_upload_bytes=args.max_upload_bytes,
            )
        )
    return server.exit_code


def _bind_http(args: argparse.Namespace):
    """The HTTP API's listening socket, bound before the model loads (a taken port is exit 2)."""
    from engine.http.uvicorn_runner import bind_http, check_http_exposure, parse_http_address

    host, port = parse_http_address(args.http)
    check_http_exposure(host, args.api_key)
    return bind_http(host, port)


def add_http_args(parser: argparse.ArgumentParser) -> None:
    """The HTTP API's flags, shared by serve and gateway."""
    http = parser.add_argument_group("HTTP API (OpenAI Images)")
    http.add_argument(
        "--api-key",
        default=os.environ.get("STEPWEAVE_API_KEY"),
        help="Bearer key that /v1/ requests must carry (from $STEPWEAVE_API_KEY if set; required off loopback)",
    )
    http.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted (413 beyond)")
    http.add_argument(
        "--max-upload-bytes",
        type=int,
        default=32 << 20,
        help="largest /v1/images/edits body (its uploaded images) accepted (413 beyond)",
    )


def _status(args: argparse.Namespace) -> int:
    from engine.service.client import EngineClient

    with EngineClient(args.address, args.auth_token, server_key=args.server_key, timeout_s=args.timeout) as client:
        state = client.debug_state()  # ServerUnavailableError (exit 1) when nobody answers
        serving = client.health()
    taking = "serving" if serving else "not taking new requests (draining)"
    print(f"{client.address}: {taking}, {state.sessions} client session(s)")
    print(f"requests on the server (queued or running): {len(state.server_request_ids)}")
    for request_id in state.server_request_ids:
        print(f"  {request_id}")
    print(f"requests holding worker state (running): {len(state.worker_request_ids)}")
    for request_id in state.worker_request_ids:
        print(f"  {request_id}")
    return EXIT_OK


def _add_serve_parsers(commands) -> None:
    from engine.service.address import default_address

    serve = commands.add_parser(
        "serve",
        help="serve the engine to EngineClients over ZeroMQ",
        description="Run one engine as a service for EngineClient / AsyncEngineClient.",
        formatter_class=_HelpFormatter,
        epilog=EXIT_CODES,
    )
    add_engine_args(serve)
    serve.add_argument("--address", default=None, help=f"ipc://PATH or tcp://HOST:PORT (default {default_address()})")
    serve.add_argument(
        "--http", default=None, metavar="HOST:PORT", help="also serve OpenAI's Images API, /health and /metrics here"
    )
    serve.add_argument(
        "--max-waiting", type=int, default=None, help="bound on queued requests; more are rejected as overloaded"
    )
    serve.add_argument(
        "--max-requests-per-client",
        type=int,
        default=256,
        help="requests one client may have in flight; more are rejected as overloaded (default 256)",
    )
    serve.add_argument(
        "--max-paused",
        type=int,
        default=4,
        help="requests that may run beyond --max-num-seqs for clients with nothing running; running requests "
        "then take turns at step boundaries, so one client's flood cannot make another wait (default 4)",
    )
    serve.add_argument(
        "--max-worker-restarts",
        type=int,
        default=3,
        help="restart the workers after a crash, up to this many crashes in a row; 0: a crash stops the server "
        "(default 3)",
    )
    serve.add_argument(
        "--auth-token",
        default=os.environ.get("STEPWEAVE_AUTH_TOKEN"),
        help="token clients must present (required for non-loopback tcp; default $STEPWEAVE_AUTH_TOKEN)",
    )
    serve.add_argument(
        "--curve-secret-key",
        default=None,
        help="encrypt with CURVE using this secret certificate (from `stepweave keygen`)",
    )
    serve.add_argument(
        "--client-timeout",
        type=float,
        default=15.0,
        help="seconds without a heartbeat before a client's requests are aborted",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds SIGTERM waits for running requests before aborting them",
    )
    serve.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="info: start, ready and stop, and one line per finished request; warning: problems only",
    )
    add_http_args(serve)
    serve.set_defaults(func=_serve)

    status = commands.add_parser(
        "status",
        help="show a server's queue, running requests and sessions",
        formatter_class=_HelpFormatter,
        epilog=EXIT_CODES,
    )
    status.add_argument("--address", default=None, help=f"the server's address (default {default_address()})")
    status.add_argument("--auth-token", default=os.environ.get("STEPWEAVE_AUTH_TOKEN"), help="the server's token")
    status.add_argument("--server-key", default=None, help="the server's CURVE public key file, if it uses one")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server")
    status.set_defaults(func=_status)


# -- export-preset, keygen ---------------------------------------------------------------------
def _export_preset(args: argparse.Namespace) -> int:
    from pipelines.presets import PRESETS, export_preset

    if args.name not in PRESETS:
        raise UsageError(f"export-preset: unknown preset {args.name!r}; presets: {', '.join(PRESETS)}")
    try:
        path = export_preset(args.name, args.directory)
    except OSError as exc:
        raise UsageError(f"export-preset: cannot write {args.directory}: {exc.strerror or exc}") from None
    print(f"wrote preset {args.name} to {path}")
    return EXIT_OK


def _preset_list() -> str:
    from pipelines.presets import PRESETS

    width = max(len(name) for name in PRESETS)
    lines = [f"  {name:<{width}}  {spec.description}" for name, spec in PRESETS.items()]
    return "presets:\n" + "\n".join(lines) + "\n\n" + EXIT_CODES


def _keygen(args: argparse.Namespace) -> int:
    from engine.service.address import load_public_key, write_server_keys

    try:
        public, secret = write_server_keys(args.directory)
    except OSError as exc:
        raise UsageError(f"keygen: cannot write {args.directory}: {exc.strerror or exc}") from None
    print(f"wrote {secret} (the server's: stepweave serve --curve-secret-key {secret})")
    print(f"wrote {public} (the clients': EngineClient(address, token, server_key=...))")
    print(f"server public key: {load_public_key(public).decode()}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from engine.bench_cli import add_bench_parser
    from engine.gateway_cli import add_gateway_parser
    from engine.generate_cli import add_generate_parser

    parser = CommandParser(prog="stepweave", description="Continuous-batching diffusion serving", epilog=EXIT_CODES)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_parser(commands)
    _add_serve_parsers(commands)

    export = commands.add_parser(
        "export-preset",
        help="write a preset as a diffusers directory",
        description="Build a preset (seeded weights, no download) and write it as a diffusers directory.",
        epilog_factory=_preset_list,
    )
    export.add_argument("name", help="the preset (listed below)")
    export.add_argument("directory", help="where to write it (created)")
    export.set_defaults(func=_export_preset)

    keygen = commands.add_parser(
        "keygen", help="write a CURVE key pair for `stepweave serve --curve-secret-key`", epilog=EXIT_CODES
    )
    keygen.add_argument("directory", help="where to write server.key and server.key_secret")
    keygen.set_defaults(func=_keygen)

    add_bench_parser(commands)
    add_gateway_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        # The front doors stop their workers on the way out (the with-blocks above).
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if os.environ.get("STEPWEAVE_DEBUG"):
            raise
        code = EXIT_USAGE if isinstance(exc, (ValueError, TypeError)) else EXIT_FAILED
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return code


def _one_line(exc: BaseException) -> str:
    """The message of an exception, on one line; the type's name only where the message alone
    would not say what happened (not for ValueError, whose messages name the field)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (ValueError, TypeError)):
        return message
    from engine.contract.errors import EngineDeadError

    return message if isinstance(exc, EngineDeadError) else f"{type(exc).__name__}: {message}"


if __name__ == "__main__":
    sys.exit(main())
