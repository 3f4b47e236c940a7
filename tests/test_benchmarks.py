"""Smoke runs of every benchmark on a tiny workload, so they keep working."""

from __future__ import annotations

import json
import math
import sys

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


def test_throughput_benchmark_via_cli(tmp_path, _preset_cache, capsys):
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
    systems = report["systems"]
    assert set(systems) == {"diffusers-sequential", "diffusers-static", "stepweave-1", "stepweave-2"}
    for system in systems.values():
        assert SYSTEM_KEYS <= set(system) and system["throughput_rps"] > 0
        latencies = system["latencies_s"]
        assert len(latencies) == 4 and latencies == sorted(latencies)
        assert system["p50_latency_s"] == latencies[2] and system["mean_latency_s"] == pytest.approx(sum(latencies) / 4)
    # The limit, recomputed from its measurements: Qwen-Image's pipeline runs true CFG as two
    # one-row transformer calls per step; stepweave's best forward holds both rows of N requests.
    detail = report["limit_detail"]
    assert detail["diffusers_calls_per_step"] == 2 and detail["diffusers_rows_per_call"] == 1
    forward = {int(rows): seconds for rows, seconds in detail["forward_s_by_rows"].items()}
    assert set(forward) == {1, 2, 4}
    limit = 2 * forward[1] / min(forward[2] / 1, forward[4] / 2)
    assert report["batch_compute_limit"] == pytest.approx(limit, rel=1e-9)
    base = systems["diffusers-sequential"]["throughput_rps"]
    for name, system in systems.items():
        assert report["speedup"][name] == pytest.approx(system["throughput_rps"] / base, rel=1e-9)
        assert report["efficiency"][name] == pytest.approx(system["throughput_rps"] / base / limit, rel=1e-9)
    assert png.stat().st_size > 0
    progress = capsys.readouterr().err
    for line in ("serving with diffusers-sequential", "serving with stepweave-2", f"wrote {out}", f"wrote {png}"):
        assert f"[bench] {line}" in progress


def test_throughput_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    from benchmarks.throughput import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    report = {"systems": {}, "config": {"model": "m", "rate": 1.0, "sequential_service_s": 1.0, "num_requests": 4}}
    assert plot(report, str(tmp_path / "p.png")) is False
    assert "plot skipped: matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


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
    for name in ("inproc", "mp", "mp_sync"):
        assert row[f"{name}_ratio"] == pytest.approx(row[f"{name}_step_us"] / row["direct_step_us"], rel=1e-9)
        assert row[f"{name}_overhead_us"] == pytest.approx(row[f"{name}_step_us"] - row["direct_step_us"], rel=1e-9)
    for name in ("mp", "mp_sync"):
        # one measured round, a 2-step then a 3-step request alone: the gaps between consecutive
        # steps of a running request only (1 + 2), none between the requests
        assert row[f"{name}_worker_idle_gaps"] == 3
        assert 0 <= row[f"{name}_worker_idle_per_step_us"] < 1e6


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
            "--rounds",
            "1",
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "r.png"),
        ]
    )
    systems = report["systems"]
    assert len(systems) == 2 and all(s["throughput_rps"] > 0 for s in systems.values())
    one, two = systems.values()
    for system in systems.values():
        samples = system["single_request_samples_s"]
        assert len(samples) == 3 and system["single_request_latency_s"] == sorted(samples)[1]
        assert system["throughput_rps"] == pytest.approx(2 / system["wall_s"][0], rel=1e-9)
    ratio = two["throughput_rps"] / one["throughput_rps"]
    assert report["throughput_ratio"] == pytest.approx(ratio, rel=1e-9)
    if name == "cfg_parallel":
        # One process's forward of all 2 x 2 CFG rows over a forward of 2 rows while a second
        # process runs another at the same time.
        forward, concurrent = report["forward_s_by_rows"], report["concurrent_forward_s_by_rows"]
        limit = forward["4"] / concurrent["2"]
        assert report["limit_batch"] == pytest.approx(limit, rel=1e-9)
        assert report["efficiency_batch"] == pytest.approx(ratio / limit, rel=1e-9)
        single_limit = forward["2"] / concurrent["1"]
        speedup = one["single_request_latency_s"] / two["single_request_latency_s"]
        assert report["limit_single_request"] == pytest.approx(single_limit, rel=1e-9)
        assert report["efficiency_single_request"] == pytest.approx(speedup / single_limit, rel=1e-9)
    else:
        # PP=2 finishes at most 2 requests per 2 steps of the slower stage's blocks over 4 rows;
        # the limit is that over PP=1's measured throughput.
        (stage0, stage1) = report["stage_block_s"]
        assert stage0 > 0 and stage1 > 0
        bound = 2 / (2 * max(stage0, stage1))
        assert report["pp2_bound_rps"] == pytest.approx(bound, rel=1e-9)
        assert report["limit"] == pytest.approx(bound / one["throughput_rps"], rel=1e-9)
        assert report["efficiency"] == pytest.approx(two["throughput_rps"] / bound, rel=1e-9)
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


def test_video_throughput_benchmark(tmp_path, _preset_cache):
    from benchmarks import video_throughput

    out, png = tmp_path / "v.json", tmp_path / "v.png"
    argv = ["--requests", "3", "--steps", "2", "3", "--num-frames", "5", "--height", "32", "--width", "32"]
    report = video_throughput.main(
        [*argv, "--max-num-seqs", "3", "--rounds", "1", "--json", str(out), "--plot", str(png)]
    )
    assert json.loads(out.read_text()) == report
    stepweave = report["systems"]["stepweave-3"]
    assert stepweave["forwards_run"] < stepweave["forward_calls"]  # the three videos shared forwards
    batch = report["batch_s_by_rows"]
    assert report["limit"] == pytest.approx(3 * batch["1"] / batch["3"], rel=1e-9)
    assert png.stat().st_size > 0


def test_slo_simulation_smoke(tmp_path):
    """The simulator drives the real scheduler: every request is accounted for, a lone request
    takes exactly its profiled service time, and the goal figures come out of the sweep."""
    from benchmarks import slo
    from benchmarks.simulator import Profile, Spec, simulate_diffusers, simulate_stepweave

    profile = Profile("benchmarks/profiles/flux-dev-h100.json")
    alone = profile.alone_s(28, 1024, 1024)
    assert 6.5 < alone < 7.5  # the published anchor: ~7.1 s for 28 steps at 1024x1024 on one H100
    lone = [Spec(0, 1.0, "long", 28, 1024, 1024, None)]
    for outcomes in (simulate_diffusers(lone, profile), simulate_stepweave(lone, profile, "deadline")):
        assert outcomes[0].finish - outcomes[0].arrival == pytest.approx(alone, rel=1e-6)
    report = slo.main(
        ["--sim", "benchmarks/profiles/flux-dev-h100.json", "--sim-requests", "300", "--sim-loads", "0.2", "0.6", "1.0"]
        + ["--json", str(tmp_path / "slo.json"), "--plot", ""]
    )
    run = report["sim"]["flux-dev-h100"]
    assert set(run["systems"]) == {f"diffusers-{k}" for k in ("sequential", "static")} | {
        f"stepweave-{p}" for p in ("fcfs", "priority", "deadline")
    }
    for rows in run["systems"].values():
        assert [r["short"]["count"] + r["long"]["count"] for r in rows] == [300] * 3
        assert all(0 <= r["attainment"] <= 1 for r in rows)
    assert (
        run["goals"]["deadline_long_finished"] + sum(r["refused"] for r in run["systems"]["stepweave-deadline"])
        >= run["goals"]["deadline_long_count"]
    )
    assert json.loads((tmp_path / "slo.json").read_text())["sim"]["flux-dev-h100"]["loads"] == [0.2, 0.6, 1.0]


def test_the_simulator_schedules_one_batch_ahead_as_the_engine_does_and_times_diffusers_apart(tmp_path):
    """With async scheduling (the engine's default) a request arriving while a batch runs is
    seen when that batch's results come back and joins the batch after the one already queued;
    a profile's `diffusers` section times diffusers' pipeline calls, not the engine's batches."""
    from benchmarks.simulator import Profile, Spec, simulate_diffusers, simulate_stepweave

    geometry = {"vae_scale": 8, "patch": 2, "rows": 2, "text_tokens": 8}
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"name": "x", "geometry": geometry, "coefficients": {"batch": 1.0}}))
    specs = [Spec(0, 0.0, "long", 3, 64, 64, None), Spec(1, 0.5, "short", 1, 64, 64, None)]
    sync = simulate_stepweave(specs, Profile(path), "fcfs", in_flight=1)
    ahead = simulate_stepweave(specs, Profile(path), "fcfs", in_flight=2)
    assert [o.finish for o in sync] == [3.0, 2.0]  # the short one joins batch 2, at 1 s
    assert [o.finish for o in ahead] == [3.0, 3.0]  # batch 2 was chosen at 0 s: it joins batch 3
    assert simulate_diffusers(specs[:1], Profile(path))[0].finish == 3.0
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "diffusers": {"coefficients": {"batch": 2.0}}}))
    assert simulate_diffusers(specs[:1], Profile(path))[0].finish == 6.0
