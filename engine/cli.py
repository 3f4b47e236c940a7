"""The `stepweave` command line."""

from __future__ import annotations

import argparse
import sys


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-qwen-image", help="preset name or diffusers directory")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--cfg-parallel-size", type=int, default=1)
    parser.add_argument("--pp-size", type=int, default=1)
    parser.add_argument("--executor", choices=["inproc", "mp"], default="mp")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _generate(args: argparse.Namespace) -> int:
    from engine import Omni, ParallelConfig, SamplingParams

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
    parallel = ParallelConfig(cfg_parallel_size=args.cfg_parallel_size, pipeline_parallel_size=args.pp_size)
    with Omni(args.model, max_num_seqs=args.max_num_seqs, parallel_config=parallel, executor=args.executor, device=args.device) as omni:
        (output,) = omni.generate([prompt], params, use_tqdm=False)
    if output.error is not None:
        print(f"error: {output.error}", file=sys.stderr)
        return 1
    output.images[0].save(args.output)
    metrics = output.metrics
    print(f"wrote {args.output} ({output.num_steps} steps, seed {output.seed}, {metrics.latency_s:.2f} s)")
    return 0


def _export_preset(args: argparse.Namespace) -> int:
    from pipelines.presets import export_preset

    path = export_preset(args.name, args.directory)
    print(f"wrote preset {args.name} to {path}")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from engine.service_address import load_public_key, write_server_keys

    public, secret = write_server_keys(args.directory)
    print(f"wrote {secret} (the server's: stepweave serve --curve-secret-key {secret})")
    print(f"wrote {public} (the clients': EngineClient(address, token, server_key=...))")
    print(f"server public key: {load_public_key(public).decode()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepweave", description="Continuous-batching diffusion serving")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate one image")
    gen.add_argument("--prompt", default="a lighthouse on a cliff at sunset")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--class-label", type=int, default=None, help="class label (DiT models)")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--cfg-scale", type=float, default=4.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--scheduler", default=None, help="diffusers scheduler class name")
    gen.add_argument("--output", default="out.png")
    _add_engine_args(gen)
    gen.set_defaults(func=_generate)

    export = commands.add_parser("export-preset", help="write a preset as a diffusers directory")
    export.add_argument("name")
    export.add_argument("directory")
    export.set_defaults(func=_export_preset)

    keygen = commands.add_parser("keygen", help="write a CURVE key pair for `stepweave serve --curve-secret-key`")
    keygen.add_argument("directory")
    keygen.set_defaults(func=_keygen)

    from engine.bench_cli import add_bench_parser

    add_bench_parser(commands)
    from engine.server import add_serve_parser

    add_serve_parser(commands)
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
