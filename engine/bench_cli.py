"""`stepweave bench`: run the throughput benchmark from a source checkout.

Benchmarks live beside the packages (they are scripts, not library code), so the command finds
`benchmarks/throughput.py` next to the installed `engine` package and runs it.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def _script() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"


def _run(args: argparse.Namespace) -> int:
    script = _script()
    if not script.is_file():
        print(
            f"error: {script} not found; `stepweave bench` needs a source checkout (pip install -e .)", file=sys.stderr
        )
        return 2
    # Run the script's main() with the command's name in its usage line (as __main__ its
    # argparse would call itself throughput.py).
    namespace = runpy.run_path(str(script), run_name="stepweave_bench")
    from engine.cli import CommandParser

    namespace["main"](args.bench_args, prog="stepweave bench", parser_class=CommandParser)
    return 0


def add_bench_parser(commands) -> None:
    # Every argument belongs to the benchmark, options included: with a prefix character no
    # argv string can hold, this parser treats "--model ..." as plain values (a REMAINDER
    # positional alone would leave a leading option unrecognized), and --help reaches the script.
    bench = commands.add_parser(
        "bench",
        help="throughput against diffusers baselines (benchmarks/throughput.py)",
        add_help=False,
        prefix_chars="\0",
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for benchmarks/throughput.py")
    bench.set_defaults(func=_run)
