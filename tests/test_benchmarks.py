"""Smoke runs of every benchmark on a tiny workload, so they keep working."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow

SYSTEM_KEYS = {
    "throughput_rps",
    "steps_per_s",
    "mean_latency_s",
    "p50_latency_s",
    "p99_latency_s",
    "mean_queue_s",
    "mean_batch_occupancy",
}


def test_throughput_benchmark_via_cli(tmp_path, _preset_cache):
    from engine.cli import main

    out, png = tmp_path / "t.json", tmp_path / "t.png"
    code = main(
        [
            "bench",
            "--model",
            "tiny-qwen-image",
            "--num-requests",
            "4",
            "--rate",
            "50",
            "--steps",
            "2",
            "3",
            "--max-num-seqs",
            "1",
            "2",
            "--executor",
            "inproc",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["systems"]) == {"diffusers-sequential", "diffusers-static", "stepweave-1", "stepweave-2"}
    for system in report["systems"].values():
        assert SYSTEM_KEYS <= set(system) and system["throughput_rps"] > 0
    assert report["batch_compute_limit"] > 0 and set(report["efficiency"]) == set(report["systems"])
    assert png.stat().st_size > 0


def test_overhead_benchmark(tmp_path, _preset_cache):
    from benchmarks import overhead

    # At least 2 steps: Qwen-Image's scheduler (shift_terminal) yields NaN sigmas for 1 step, in diffusers too.
    report = overhead.main(
        [
            "--models",
            "tiny-qwen-image",
            "--short",
            "2",
            "--long",
            "3",
            "--repeats",
            "1",
            "--json",
            str(tmp_path / "o.json"),
        ]
    )
    row = report["results"][0]
    for key in (
        "direct_step_us",
        "inproc_step_us",
        "mp_step_us",
        "mp_worker_idle_per_step_us",
        "mp_sync_worker_idle_per_step_us",
    ):
        assert key in row


@pytest.mark.parametrize("name", ["cfg_parallel", "pipeline_parallel"])
def test_parallel_benchmarks(tmp_path, _preset_cache, name):
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    report = module.main(
        [
            "--model",
            "tiny-qwen-image",
            "--num-requests",
            "2",
            "--steps",
            "2",
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "r.png"),
        ]
    )
    assert len(report["systems"]) == 2 and all(s["throughput_rps"] > 0 for s in report["systems"].values())
    assert (tmp_path / "r.png").stat().st_size > 0


def test_client_overhead_benchmark(tmp_path, qwen_dir):
    from benchmarks import client_overhead

    out, png = tmp_path / "co.json", tmp_path / "co.png"
    report = client_overhead.main(
        [
            "--model",
            str(qwen_dir),
            "--requests",
            "3",
            "--burst",
            "4",
            "--rounds",
            "1",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert json.loads(out.read_text())["results"] == report["results"]
    results = report["results"]
    for path in ("embedded", "async_client", "sync_client"):
        assert results[f"{path}_p50_ms"] > 0
    for key in ("async_client_overhead_ms", "sync_client_overhead_ms", "client_burst_overhead_ms"):
        assert math.isfinite(results[key])
    assert png.stat().st_size > 0


def test_quality_benchmark(tmp_path, _preset_cache):
    from benchmarks import quality

    out, png = tmp_path / "q.json", tmp_path / "q.png"
    argv = ["--seeds", "1", "--steps", "8", "--cfg-scales", "3", "--json", str(out), "--plot", str(png)]
    results = quality.main(argv)["results"]
    assert json.loads(out.read_text())["results"] == results
    # 8 steps without CFG, the default 20 without CFG, and 20 with CFG 3: ten digits each
    assert results["requests"] == 30
    assert [x["steps"] for x in results["vs_steps"]] == [8, 20]
    assert [x["cfg"] for x in results["vs_cfg"]] == [3.0, None]
    assert len(results["per_digit_default"]) == 10 and sum(map(sum, results["confusion_default"])) == 10
    assert results["default"]["accuracy"] >= 0.8  # one seed per digit: a broken model scores ~0.1
    assert png.stat().st_size > 0


def test_gpu_check_script_cpu_smoke(tmp_path, _preset_cache):
    """benchmarks/gpu_check.sh runs its whole sequence on the CPU (tiny preset), so the script a
    GPU lease depends on keeps working between leases."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OUT=str(tmp_path))
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu-smoke"], cwd=root, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "== CUDA tests" in log and "device: cpu (smoke)" in log
    for load in ("open", "saturated"):
        report = json.loads((tmp_path / f"throughput_32_{load}.json").read_text())
        assert report["config"]["height"] == 32 and report["config"]["device"] == "cpu"
        assert {"diffusers-sequential", "diffusers-static", "stepweave-2"} == set(report["systems"])
    assert (tmp_path / "throughput_32_saturated.png").stat().st_size > 0
