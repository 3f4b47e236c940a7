"""The `stepweave` command line: generate, serve, export-preset, keygen, bench.

Every command that starts an engine takes the same engine options, turned into one
EngineConfig by `engine_config`, so a flag means the same thing wherever it appears.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from engine.contract.config import EngineConfig, ParallelConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-qwen-image", help="preset name or diffusers directory")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--cfg-parallel-size", type=int, default=1)
    parser.add_argument("--pp-size", type=int, default=1)
    parser.add_argument("--executor", choices=["inproc", "mp"], default="mp")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda (rank r on GPU r) or cuda:N (default: cuda when available)"
    )
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer (dynamic shapes)")


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
        **extra,
    )


def _generate(args: argparse.Namespace) -> int:
    from engine import Omni, SamplingParams

    params = SamplingParams(
        num_inference_steps=args.steps,
        true_cfg_scale=args.cfg_scale,
        guidance_scale=args.cfg_scale,
        height=args.height,
        width=args.width,
        seed=args.seed,
        scheduler=args.scheduler,
    )
    prompt: dict = {"prompt": args.prompt, "negative_prompt": args.negative_prompt}
    if args.class_label is not None:
        prompt = {"class_label": args.class_label}
    with Omni(engine_config(args)) as omni:
        (output,) = omni.generate([prompt], params, use_tqdm=False)
    if output.error is not None:
        print(f"error: {output.error}", file=sys.stderr)
        return 1
    output.images[0].save(args.output)
    metrics = output.metrics
    print(f"wrote {args.output} ({output.num_steps} steps, seed {output.seed}, {metrics.latency_s:.2f} s)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from engine.async_engine import AsyncEngine
    from engine.service.address import check_bind_address, claim_ipc_path, default_address, load_server_keys
    from engine.service.server import EngineServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    log = logging.getLogger("stepweave.server")
    address = args.address or default_address()
    check_bind_address(address, args.auth_token)  # before loading anything
    if args.curve_secret_key is not None:
        load_server_keys(args.curve_secret_key)
    if address.startswith("ipc://"):
        claim_ipc_path(address)
    log.info("starting engine for %s; will serve on %s", args.model, address)
    engine = AsyncEngine(engine_config(args, max_waiting=args.max_waiting))
    try:
        server = EngineServer(
            engine,
            address,
            auth_token=args.auth_token,
            curve_secret_key=args.curve_secret_key,
            client_timeout_s=args.client_timeout,
            drain_timeout_s=args.drain_timeout,
        )
    except BaseException:
        engine.shutdown()
        raise
    asyncio.run(server.serve())
    return server.exit_code


def _export_preset(args: argparse.Namespace) -> int:
    from pipelines.presets import export_preset

    path = export_preset(args.name, args.directory)
    print(f"wrote preset {args.name} to {path}")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from engine.service.address import load_public_key, write_server_keys

    public, secret = write_server_keys(args.directory)
    print(f"wrote {secret} (the server's: stepweave serve --curve-secret-key {secret})")
    print(f"wrote {public} (the clients': EngineClient(address, token, server_key=...))")
    print(f"server public key: {load_public_key(public).decode()}")
    return 0


def _add_generate_parser(commands) -> None:
    gen = commands.add_parser("generate", help="generate one image")
    gen.add_argument("--prompt", default="a handwritten digit seven")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--class-label", type=int, default=None, help="class label (DiT models)")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help="sets true_cfg_scale and guidance_scale (default: the model's own, 4.0 for Qwen-Image and DiT)",
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--scheduler", default=None, help="diffusers scheduler class name")
    gen.add_argument("--output", default="out.png")
    add_engine_args(gen)
    # The one preset with trained weights: its images show what the prompt names.
    gen.set_defaults(func=_generate, model="digits-qwen-image")


def _add_serve_parser(commands) -> None:
    from engine.service.address import default_address

    serve = commands.add_parser("serve", help="serve the engine to EngineClients over ZeroMQ")
    add_engine_args(serve)
    serve.add_argument("--address", default=None, help=f"ipc://PATH or tcp://HOST:PORT (default {default_address()})")
    serve.add_argument(
        "--max-waiting", type=int, default=None, help="bound on queued requests; more are rejected as overloaded"
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
    serve.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    from engine.bench_cli import add_bench_parser

    parser = argparse.ArgumentParser(prog="stepweave", description="Continuous-batching diffusion serving")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate_parser(commands)
    _add_serve_parser(commands)

    export = commands.add_parser("export-preset", help="write a preset as a diffusers directory")
    export.add_argument("name")
    export.add_argument("directory")
    export.set_defaults(func=_export_preset)

    keygen = commands.add_parser("keygen", help="write a CURVE key pair for `stepweave serve --curve-secret-key`")
    keygen.add_argument("directory")
    keygen.set_defaults(func=_keygen)

    add_bench_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
