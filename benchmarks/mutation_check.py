"""Mutation check: does the test suite fail when a behaviour it claims to check breaks?

Each mutation is one exact text replacement in one file, a bug a real change could introduce
(wrong timestep row, skipped CFG combine, ...). The script copies the project (tracked and
untracked, not ignored, files) to a temporary directory, runs the named tests on the unmutated
copy (they must pass, or a "caught" would mean nothing), then applies one mutation at a time,
runs the tests that should catch it and restores the file. A mutation whose target text is not
found exactly once stops the script before anything runs, so it cannot silently test nothing.
Too slow for CI (minutes per mutation on two cores); run it after changing tests or the code
they guard, and put its table in README.
Usage: python benchmarks/mutation_check.py [--only NAME ...] [--json docs/results/mutation_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str  # what a user would get
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files expected to fail


MUTATIONS = [
    Mutation(
        "wrong timestep row",
        "every row of a co-batched forward runs at the first request's timestep",
        "pipelines/qwen_image.py",
        "timestep = torch.stack([state.timestep for state, _ in rows]).to(hidden_states.dtype)",
        "timestep = torch.stack([rows[0][0].timestep for _ in rows]).to(hidden_states.dtype)",
        ("tests/test_equivalence.py",),
    ),
    Mutation(
        "skipped CFG combine",
        "two-branch requests use the positive prediction alone (no guidance)",
        "pipelines/parallel/cfg.py",
        "return self.combine_cfg_noise(branches[0], branches[1], state.cfg_scale, state.cfg_normalize)",
        "return branches[0]",
        ("tests/test_cfg_parallel.py", "tests/test_pipeline_parallel.py::test_pp2_matches_diffusers_and_pp1"),
    ),
    Mutation(
        "wrong padding mask",
        "padded text tokens of shorter prompts are attended to",
        "pipelines/qwen_image.py",
        'mask[row, : item["length"]] = True',
        "mask[row, :] = True",
        ("tests/test_equivalence.py",),
    ),
    Mutation(
        "dropped abort",
        "an aborted running request's state is never freed on the workers",
        "engine/core/scheduler.py",
        "        if request.sent_to_workers:\n            self._drop.append(request.wire_id)\n",
        "",
        ("tests/test_robustness.py::test_abort_running_and_waiting_leaves_no_state",),
    ),
    Mutation(
        "prompt cache mix-up",
        "the cached prompt embeddings are reused whenever the row count matches",
        "pipelines/qwen_image.py",
        "if all(s is cs and b == cb for (s, b), (cs, cb) in zip(rows, cached)):",
        "if True:",
        ("tests/test_robustness.py::test_abort_running_and_waiting_leaves_no_state",),
    ),
    Mutation(
        "wrong solver defaults",
        "UniPC on a flow-matching model runs first order with a fixed shift",
        "pipelines/schedulers.py",
        '"UniPCMultistepScheduler": {"use_flow_sigmas": True, "prediction_type": "flow_prediction"},',
        '"UniPCMultistepScheduler": {"use_flow_sigmas": True, "prediction_type": "flow_prediction", '
        '"solver_order": 1, "flow_shift": 3.0},',
        ("tests/test_equivalence.py",),
    ),
    Mutation(
        "wrong CFG-parallel gather",
        "every gathered row is read from CFG rank 0's buffer",
        "pipelines/parallel/cfg_parallel.py",
        "parts = tuple(g[owner][index : index + 1] for g in gathered_parts)",
        "parts = tuple(g[0][index : index + 1] for g in gathered_parts)",
        ("tests/test_cfg_parallel.py",),
    ),
    Mutation(
        "PIL truncation",
        "PIL images truncate instead of rounding to 8 bits",
        "engine/contract/outputs.py",
        'pixels = (array * 255).round().astype("uint8")',
        'pixels = (array * 255).astype("uint8")',
        ("tests/test_equivalence.py::test_pil_output_matches_diffusers_pil_output",),
    ),
    Mutation(
        "uint8 input image as a float array",
        "a PIL or uint8 input image reaches the pipeline as an array of 0-255 floats, not as an image",
        "engine/contract/input_images.py",
        "    if value.dtype == np.uint8:\n        from PIL import Image",
        "    if False:\n        from PIL import Image",
        ("tests/test_image_inputs.py::test_co_batched_with_staggered_joins_matches_diffusers",),
    ),
    Mutation(
        "strength steps rounded down",
        "an image-to-image request plans and reports int(steps x strength) steps where diffusers runs more",
        "pipelines/diffusers_adapter.py",
        "return num_inference_steps - int(max(num_inference_steps - init_timestep, 0))",
        "return int(num_inference_steps * strength)",
        ("tests/test_image_inputs.py::test_co_batched_with_staggered_joins_matches_diffusers",),
    ),
    Mutation(
        "listed input images left as references",
        "a list of input images reaches the workers as frame references, not arrays",
        "engine/contract/wire.py",
        "                if _is_ref(item):\n                    value[i] = _array(item, buffers)",
        "                if False:\n                    value[i] = _array(item, buffers)",
        ("tests/test_wire.py::test_input_images_of_new_requests",),
    ),
    Mutation(
        "mask size unchecked",
        "a mask of another size than its image reaches the pipeline",
        "engine/contract/input_images.py",
        "        if mask is not None and mask.shape[:2] != image.shape[:2]:",
        "        if False:",
        ("tests/test_image_inputs.py::test_bad_input_images_fail_alone",),
    ),
    Mutation(
        "throughput limit from one 2-row forward",
        "the batch-compute limit counts one 2-row forward per step where diffusers runs two 1-row forwards",
        "benchmarks/throughput.py",
        "sequential_forward_s = calls_per_step * forward[rows_per_call]",
        "sequential_forward_s = forward[rows_per_request]",
        ("tests/test_benchmarks.py::test_throughput_benchmark_via_cli",),
    ),
    Mutation(
        "Wan 2.2 experts joined",
        "forwards of different transformers (Wan 2.2's two experts) join and all run on the first one",
        "pipelines/forward_batching.py",
        "if a.module != b.module or len(a.args) != len(b.args)",
        "if len(a.args) != len(b.args)",
        (
            "tests/test_wan_video.py::test_wan_co_batched",
            "tests/test_wan_video.py::test_forwards_of_different_modules_never_join",
        ),
    ),
    Mutation(
        "video frames not counted",
        "a video's memory estimate is an image's, so long videos are admitted that cannot fit",
        "engine/core/engine_core.py",
        "frames = info.frames_for(params)",
        "frames = None",
        ("tests/test_video_memory.py::test_admission",),
    ),
    Mutation(
        "video dropped on the wire",
        "the server sends a finished video's output without its frames",
        "engine/service/protocol.py",
        "        frames=output.frames,\n",
        "",
        ("tests/test_video_wire.py::test_frames_come_back",),
    ),
]


def check_targets(mutations: list[Mutation], root: Path) -> None:
    """Every target text occurs exactly once, or nothing runs."""
    for m in mutations:
        count = (root / m.path).read_text().count(m.old)
        if count != 1:
            raise SystemExit(f"mutation {m.name!r}: target text found {count} times in {m.path} (need exactly 1)")


def copy_project(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def run_tests(copy: Path, tests: tuple[str, ...], cache: Path, timeout: float) -> dict:
    """Run `tests` in the copy; which of them failed."""
    env = dict(os.environ, PYTHONPATH=str(copy), STEPWEAVE_CACHE_DIR=str(cache))
    command = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *_node_ids(copy, tests)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output, code = f"{exc.stdout or ''}\ntimed out after {timeout:.0f} s", -1
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)))
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return {
        "returncode": code,
        "failed": failed,
        "summary": summary[-1] if summary else output[-500:],
        "output_tail": output[-3000:] if code != 0 else "",
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _node_ids(copy: Path, tests: tuple[str, ...]) -> list[str]:
    """A node id may name a test by prefix (a parametrized test's every case); pytest's -k would
    widen it, so it is expanded here against the collected ids."""
    ids = []
    for test in tests:
        if "::" not in test:
            ids.append(test)
            continue
        path, prefix = test.split("::", 1)
        text = (copy / path).read_text()
        names = re.findall(rf"^(?:async )?def ({re.escape(prefix)}\w*)\(", text, flags=re.M)
        if not names:
            raise SystemExit(f"no test in {path} starts with {prefix!r}")
        ids += [f"{path}::{name}" for name in names]
    return ids


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="apply behaviour-level mutations; the suite must fail for each")
    parser.add_argument("--only", nargs="+", help="names of mutations to run (default: all)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    parser.add_argument("--json", default="docs/results/mutation_check.json")
    args = parser.parse_args(argv)
    mutations = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"unknown mutation(s) {sorted(unknown)}; known: {[m.name for m in MUTATIONS]}")
    check_targets(mutations, ROOT)

    results = []
    with tempfile.TemporaryDirectory(prefix="stepweave-mutants-") as tmp:
        copy, cache = Path(tmp) / "project", Path(tmp) / "preset-cache"
        copy_project(copy)
        all_tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
        baseline = run_tests(copy, all_tests, cache, args.timeout)
        print(f"unmutated: {baseline['summary']} ({baseline['seconds']} s)", flush=True)
        if baseline["returncode"] != 0:
            print(baseline["output_tail"], file=sys.stderr)
            raise SystemExit(f"the tests fail without any mutation: {baseline['failed']}")
        for m in mutations:
            target = copy / m.path
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new))
            try:
                outcome = run_tests(copy, m.tests, cache, args.timeout)
            finally:
                target.write_text(original)
            caught = outcome["returncode"] != 0
            results.append({**asdict(m), **outcome, "caught": caught})
            print(f"{'CAUGHT' if caught else 'MISSED'} {m.name}: {outcome['summary']} ({outcome['seconds']} s)")
            for test in outcome["failed"]:
                print(f"    {test}", flush=True)

    report = {
        "baseline": baseline,
        "mutations": results,
        "caught": sum(r["caught"] for r in results),
        "total": len(results),
        "command": "python benchmarks/mutation_check.py" + (f" --only {' '.join(args.only)}" if args.only else ""),
    }
    print(f"{report['caught']}/{report['total']} mutations caught")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
