"""README's figures equal the committed benchmark JSON they come from.

Every table under "Current figures" is marked `<!-- figures: docs/results/NAME.json ... -->`;
this test formats the numbers of those files the way README prints them and checks that each
row says so. A figure edited by hand, or a JSON file rerun without updating README, fails here.
Each expected cell recomputes its ratio from the raw fields, so a ratio written by a wrong
formula into the JSON also fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!-- figures: ([^>]+?) -->\n+((?:\|.*\|\n)+)")


def _tables() -> list[tuple[list[str], dict[str, list[str]]]]:
    """(JSON paths, {first cell: cells}) for every marked README table."""
    tables = []
    for match in MARKER.finditer((ROOT / "README.md").read_text()):
        rows = {}
        for line in match.group(2).splitlines()[2:]:  # after the header and its rule
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
        tables.append((match.group(1).split(), rows))
    return tables


def _load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def _x(value: float) -> str:
    return f"{value:.2f}×"


def _overhead(reports) -> dict[str, list[str]]:
    (report,) = reports
    expected = {}
    for r in report["results"]:
        direct = r["direct_step_us"]
        expected[r["model"]] = [
            f"{direct:.0f} µs",
            f"{r['inproc_step_us']:.0f} µs ({_x(r['inproc_step_us'] / direct)})",
            f"{r['mp_step_us']:.0f} µs ({_x(r['mp_step_us'] / direct)})",
            f"{r['mp_worker_idle_per_step_us']:.0f} µs / {r['mp_sync_worker_idle_per_step_us']:.0f} µs",
        ]
    return expected


def _parallel(reports, key: str, label: str) -> dict[str, list[str]]:
    """CFG-parallel and pipeline-parallel: layout 2 against 1, and the limit from its forwards."""
    (report,) = reports
    one, two = (report["systems"][f"{key}-{n}"] for n in (1, 2))
    n = report["config"]["num_requests"]
    ratio = two["throughput_rps"] / one["throughput_rps"]
    if key == "cfg":  # all 2n CFG rows in one process over n rows while another process runs n
        forward, concurrent = report["forward_s_by_rows"], report["concurrent_forward_s_by_rows"]
        limit = forward[str(2 * n)] / concurrent[str(n)]
    else:  # n requests per (steps x the slower stage's blocks over 2n rows), over PP=1's throughput
        limit = n / (report["config"]["steps"] * max(report["stage_block_s"])) / one["throughput_rps"]
    rows = {
        f"{label}=1": [
            f"{one['throughput_rps']:.3f} req/s",
            f"{one['mean_latency_s']:.2f} s",
            f"{one['single_request_latency_s']:.2f} s",
        ],
        f"{label}=2": [f"{two['throughput_rps']:.3f} req/s ({_x(ratio)})", f"{two['mean_latency_s']:.2f} s"],
    }
    if key == "cfg":  # one request's two branches on two ranks
        speedup = one["single_request_latency_s"] / two["single_request_latency_s"]
        single_limit = forward["2"] / concurrent["1"]
        rows[f"{label}=2"].append(f"{two['single_request_latency_s']:.2f} s ({_x(speedup)})")
        rows["limit, same run"] = [_x(limit), "", _x(single_limit)]
        rows["efficiency"] = [f"{ratio / limit:.2f}", "", f"{speedup / single_limit:.2f}"]
    else:  # one request alone cannot overlap stages: its limit is 1x
        slower = two["single_request_latency_s"] / one["single_request_latency_s"]
        rows[f"{label}=2"].append(f"{two['single_request_latency_s']:.2f} s ({_x(slower)} the latency)")
        rows["limit, same run"] = [_x(limit), "", "1.00× (latency)"]
        rows["efficiency"] = [f"{ratio / limit:.2f}"]
    return rows


def _limit(report) -> float:
    detail = report["limit_detail"]
    forward = {int(rows): s for rows, s in detail["forward_s_by_rows"].items()}
    per_request = [forward[detail["rows_per_request"] * n] / n for n in report["config"]["max_num_seqs"]]
    return detail["diffusers_calls_per_step"] * forward[detail["diffusers_rows_per_call"]] / min(per_request)


def _throughput(reports) -> dict[str, list[str]]:
    (report,) = reports
    systems = report["systems"]
    base = systems["diffusers-sequential"]["throughput_rps"]
    limit = _limit(report)
    rows = {}
    for name, s in systems.items():
        speedup = s["throughput_rps"] / base
        rows[name] = [
            f"{s['throughput_rps']:.2f} req/s ({_x(speedup)}",
            f"{s['p50_latency_s']:.2f} s",
            f"{s['p99_latency_s']:.2f} s",
            f"{s['mean_queue_s']:.2f} s",
            f"{s['mean_batch_occupancy']:.2f}",
            f"{speedup / limit:.2f}",
        ]
    rows["limit, same run"] = [_x(limit)]
    return rows


def _adapter(reports) -> dict[str, list[str]]:
    (report,) = reports
    systems = report["systems"]
    base = systems["diffusers-sequential"]["throughput_rps"]
    rows = {}
    for name, s in systems.items():
        cell = f"{s['throughput_rps']:.2f} req/s ({_x(s['throughput_rps'] / base)}"
        rows[name] = [cell, f"{s['p50_latency_s']:.2f} s", f"{s['p99_latency_s']:.2f} s"]
        if name.startswith("stepweave-adapter-"):
            hand_split = systems[name.replace("adapter-", "")]["throughput_rps"]
            rows[name][0] += f"; {_x(s['throughput_rps'] / hand_split)} hand-split"
    return rows


def _tiny_adapter_models(reports) -> dict[str, list[str]]:
    rows = {}
    for report in reports:
        systems = report["systems"]
        base = systems["diffusers-sequential"]["throughput_rps"]
        rows[report["config"]["model"]] = [
            f"{base:.2f} req/s",
            _x(systems["diffusers-static"]["throughput_rps"] / base),
            _x(systems["stepweave-8"]["throughput_rps"] / base),
        ]
    return rows


def _client(reports) -> dict[str, list[str]]:
    (report,) = reports
    r = report["results"]
    burst = report["config"]["burst"]
    rows = {"embedded `AsyncEngine`": [f"{r['embedded_p50_ms']:.2f} ms", f"{r['embedded_p90_ms']:.2f} ms"]}
    for name, label in (("async_client", "AsyncEngineClient"), ("sync_client", "EngineClient")):
        overhead = r[f"{name}_p50_ms"] - r["embedded_p50_ms"]
        rows[f"`{label}` → `stepweave serve` (ipc)"] = [
            f"{r[f'{name}_p50_ms']:.2f} ms",
            f"{r[f'{name}_p90_ms']:.2f} ms",
            f"{overhead:+.2f} ms ({_x(r[f'{name}_p50_ms'] / r['embedded_p50_ms'])})",
        ]
    embedded, client = r["embedded_burst_per_request_ms"], r["client_burst_per_request_ms"]
    rows[f"burst of {burst}, embedded"] = [f"{embedded:.2f} ms / request"]
    rows[f"burst of {burst}, `AsyncEngineClient`"] = [
        f"{client:.2f} ms / request",
        "",
        f"{client - embedded:+.2f} ms ({_x(client / embedded)})",
    ]
    return rows


def _gpu(reports) -> dict[str, list[str]]:
    """The GPU check's four throughput runs in one table: each against its own sequential baseline."""
    rows = {}
    for report in reports:
        config, systems = report["config"], report["systems"]
        base_run = systems["diffusers-sequential"]
        base = base_run["throughput_rps"]
        load = "all at once" if config["rate"] >= 1000 else "Poisson"
        best = max(
            (s for name, s in systems.items() if name.startswith("stepweave-")), key=lambda s: s["throughput_rps"]
        )
        rows[f"{config['height']}², {load}"] = [
            f"{base:.2f} req/s",
            _x(systems["diffusers-static"]["throughput_rps"] / base),
            _x(systems["stepweave-8"]["throughput_rps"] / base),
            _x(systems["stepweave-16"]["throughput_rps"] / base),
            _x(_limit(report)),
            " / ".join(f"{s['p50_latency_s']:.2f}" for s in (base_run, systems["diffusers-static"], best)) + " s",
        ]
    return rows


def _http(reports) -> dict[str, list[str]]:
    (report,) = reports
    r = report["results"]
    burst = report["config"]["burst"]
    rows = {"embedded `AsyncEngine`": [f"{r['embedded_p50_ms']:.2f} ms", f"{r['embedded_p90_ms']:.2f} ms"]}
    labels = {
        "async_client": "`AsyncEngineClient` → `stepweave serve` (ipc)",
        "http": "HTTP → `stepweave serve --http`",
        "gateway": "HTTP → `stepweave gateway` → `stepweave serve`",
    }
    client = r["async_client_p50_ms"]
    for name, label in labels.items():
        p50 = r[f"{name}_p50_ms"]
        rows[label] = [
            f"{p50:.2f} ms",
            f"{r[f'{name}_p90_ms']:.2f} ms",
            f"{p50 - r['embedded_p50_ms']:+.2f} ms ({_x(p50 / r['embedded_p50_ms'])})",
        ]
        if name != "async_client":
            rows[label].append(f"{p50 - client:+.2f} ms ({_x(p50 / client)})")
    one, two = r["one_engine_req_per_s"], r["two_engines_req_per_s"]
    rows[f"gateway over 1 engine server, {burst} at once"] = [f"{one:.2f} req/s"]
    rows[f"gateway over 2 engine servers, {burst} at once"] = [f"{two:.2f} req/s", "", _x(two / one)]
    return rows


def _mutations(reports) -> dict[str, list[str]]:
    (report,) = reports
    return {m["name"]: [m["path"], "caught" if m["caught"] else "MISSED"] for m in report["mutations"]}


def _chaos(reports) -> dict[str, list[str]]:
    (report,) = reports
    storm, soak, hostile, flood = (report[k] for k in ("abort_storm", "soak", "hostile_frames", "flood"))
    dead, restart = report["kill_under_load_restarts_0"], report["kill_under_load_restarts_1"]
    p99_ratio = flood["polite_under_flood_p99_s"] / flood["polite_unloaded_p99_s"]
    return {
        "abort storm": [
            f"{storm['requests']} requests, {storm['aborted']} aborted at random steps",
            f"{storm['lost_or_hung']} lost or hung, {storm['wrong_outputs']} wrong, "
            f"{storm['worker_state_left']} worker states left",
        ],
        "kill -9 under load, restarts off": [
            f"{dead['failed_requests']} requests failed",
            f"every stream ended {dead['seconds_until_every_stream_ended']:.2f} s after the kill",
        ],
        "kill -9 under load, restarts on": [
            f"{restart['failed_requests']} running failed, {restart['waiting_requests_finished']} waiting finished",
            f"restart {restart['restart_seconds']:.1f} s (first start {restart['first_start_seconds']:.1f} s), "
            f"{restart['wrong_outputs']} wrong",
        ],
        "soak": [
            f"{soak['clients_killed_mid_stream']} clients killed mid-stream",
            f"server memory {soak['server_rss_growth_mb']:+.1f} MB, {soak['state_left']} requests left, "
            f"{'still serves' if soak['still_serves'] else 'NO LONGER SERVES'}",
        ],
        "hostile frames": [
            f"{hostile['messages']} junk, truncated, unknown-field, many-part and oversize messages",
            f"{hostile['answered']} answered, server {'alive' if hostile['server_alive'] else 'DEAD'}",
        ],
        "one-client flood": [
            f"{flood['flood_requests']} long requests from one client",
            f"polite p50 {flood['polite_unloaded_p50_s']:.2f} → {flood['polite_under_flood_p50_s']:.2f} s, "
            f"p99 {flood['polite_unloaded_p99_s']:.2f} → {flood['polite_under_flood_p99_s']:.2f} s ({_x(p99_ratio)})",
        ],
    }


def _video(reports) -> dict[str, list[str]]:
    """Text-to-video: each system's median round against diffusers one video at a time, and the
    limit from diffusers' own batched call."""
    (report,) = reports
    systems = report["systems"]
    base = systems["diffusers-sequential"]["throughput_rps"]
    rows = {
        name: [f"{r['throughput_rps']:.2f} videos/s ({_x(r['throughput_rps'] / base)})", f"{r['mean_latency_s']:.2f} s"]
        for name, r in systems.items()
    }
    batch = report["batch_s_by_rows"]
    n = report["config"]["max_num_seqs"]
    rows["limit, same run"] = [_x(n * batch["1"] / batch[str(n)])]
    for name, r in systems.items():
        if "forward_calls" in r:
            rows[name].append(f"{r['forward_calls']} → {r['forwards_run']}")
    return rows


def _slo(reports) -> dict[str, list[str]]:
    """benchmarks/slo.py: SLO attainment by offered load (simulated: one profile per file), and
    for the real run the simulator's prediction beside each measured figure."""
    (report,) = reports
    if report["real"] is None:
        (run,) = report["sim"].values()
        rows = {name: [f"{r['attainment']:.2f}" for r in results] for name, results in run["systems"].items()}
        goals = run["goals"]
        if goals["load_fcfs_80"] is not None:
            rows["deadline where fcfs attains 0.80"] = [
                f"{goals['deadline_attainment_at_fcfs_80']:.2f} (load {goals['load_fcfs_80']:.2f})"
            ]
        if goals["load_fcfs_under_50"] is not None:
            i = run["loads"].index(goals["load_fcfs_under_50"])
            ratio = (
                run["systems"]["stepweave-deadline"][i]["goodput_rps"]
                / run["systems"]["stepweave-fcfs"][i]["goodput_rps"]
            )
            rows["goodput, deadline over fcfs where fcfs < 0.50"] = [f"{_x(ratio)} (load {run['loads'][i]:g})"]
        return rows
    run = report["real"]
    rows = {}
    for name, results in run["systems"].items():
        cells = []
        for real, sim, paced in zip(results, run["simulated"][name], run["paced"][name]):
            cells.append(f"{real['attainment']:.2f} ({sim['attainment']:.2f} / {paced['attainment']:.2f})")
            cells.append(
                f"{real['latency_p50_s']:.2f} / {real['latency_p99_s']:.2f} s "
                f"({sim['latency_p50_s']:.2f} / {sim['latency_p99_s']:.2f}; "
                f"{paced['latency_p50_s']:.2f} / {paced['latency_p99_s']:.2f})"
            )
        rows[name] = cells
    for kind in ("simulated", "paced"):
        errors = {
            name: max(
                abs(sim[key] - real[key]) / max(real[key], 1e-9)
                for real, sim in zip(results, run[kind][name])
                for key in ("attainment", "latency_p50_s", "latency_p99_s")
            )
            for name, results in run["systems"].items()
        }
        ours = max(error for name, error in errors.items() if name.startswith("stepweave"))
        label = "predicted" if kind == "simulated" else kind
        rows[f"worst relative error, {label}"] = [f"{max(errors.values()):.0%} (stepweave: {ours:.0%})"]
    return rows


def _expected(paths: list[str]) -> dict[str, list[str]]:
    reports = [_load(p) for p in paths]
    name = Path(paths[0]).stem
    if name == "overhead":
        return _overhead(reports)
    if name == "cfg_parallel":
        return _parallel(reports, "cfg", "cfg_parallel_size")
    if name == "pipeline_parallel":
        return _parallel(reports, "pp", "pipeline_parallel_size")
    if name.startswith("gpu_throughput_"):
        return _gpu(reports)
    if name.startswith("throughput_tiny-"):
        return _tiny_adapter_models(reports)
    if name.startswith("throughput_"):
        return _throughput(reports)
    if name.startswith("adapter_throughput_"):
        return _adapter(reports)
    if name == "client_overhead":
        return _client(reports)
    if name == "http_overhead":
        return _http(reports)
    if name == "mutation_check":
        return _mutations(reports)
    if name == "chaos":
        return _chaos(reports)
    if name == "video_throughput":
        return _video(reports)
    if name.startswith("slo_"):
        return _slo(reports)
    raise AssertionError(f"README marks a table with {paths}, which this test does not know how to check")


def test_every_committed_result_backs_a_readme_table():
    tables = _tables()
    assert len(tables) >= 10
    marked = [p for paths, _ in tables for p in paths]
    committed = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "results").glob("*.json"))
    assert sorted(marked) == committed


@pytest.mark.parametrize("paths", [paths for paths, _ in _tables()], ids=lambda paths: Path(paths[0]).stem)
def test_readme_table_matches_its_json(paths):
    (rows,) = [rows for marked, rows in _tables() if marked == paths]
    for row, cells in _expected(paths).items():
        assert row in rows, f"README's table for {paths} has no row {row!r}"
        got = rows[row][1:]
        assert len(got) >= len(cells), f"{paths}, row {row!r}: {got}"
        for column, want in enumerate(cells):
            assert want in got[column], f"{paths}, row {row!r}, column {column + 2}: {got[column]!r} lacks {want!r}"
