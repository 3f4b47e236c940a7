"""SLO attainment and goodput of the scheduling policies against diffusers, at rising load.

Workload: short interactive requests (few steps, small images, tight deadline) mixed with long
ones (many steps, large images, loose deadline), Poisson arrivals. A deadline is a multiple of
the request's own service time alone (its SLO factor), so "tight" and "loose" mean the same on
every model. Offered load = arrival rate x mean service time alone: 1.0 keeps diffusers'
sequential pipeline exactly busy. Systems: diffusers sequential and static batching, and
stepweave with the fcfs, priority (short requests priority 1) and deadline policies.

- `--sim PROFILE...`: the simulator (benchmarks/simulator.py: the real scheduler on a simulated
  clock) with each cost profile, at scale;
- `--real`: the real engine and diffusers' pipeline on this machine (small-qwen-image), then the
  simulator on the same requests with the measured profile, to check its predictions.

Reported per system and load: SLO attainment (finished within deadline; refused requests count
as misses), goodput (requests per second finished within deadline), p50/p99 latency per class.
Usage: python benchmarks/slo.py --sim benchmarks/profiles/*.json [--real] [--json docs/results/slo.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.plotting import headless_pyplot  # noqa: E402
from benchmarks.simulator import (  # noqa: E402
    Outcome,
    Profile,
    Spec,
    simulate_diffusers,
    simulate_stepweave,
)

# Per model: the two request classes. share: fraction of requests; slo: deadline / service alone.
WORKLOADS = {
    "small-qwen-image": {
        "short": {"steps": 6, "height": 64, "width": 64, "share": 0.7, "slo": 3.0, "priority": 1},
        "long": {"steps": 30, "height": 128, "width": 128, "share": 0.3, "slo": 6.0, "priority": 0},
        "loads": [0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0],
    },
    "flux-dev-h100": {
        "short": {"steps": 8, "height": 512, "width": 512, "share": 0.7, "slo": 3.0, "priority": 1},
        "long": {"steps": 50, "height": 1024, "width": 1024, "share": 0.3, "slo": 6.0, "priority": 0},
        # compute-bound: batching saves little, so the sequential pipeline's capacity is about the limit
        "loads": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2],
    },
}
POLICIES = ("fcfs", "priority", "deadline")
MAX_NUM_SEQS = 8
MAX_PAUSED = 8


def workload_classes(profile: Profile) -> dict:
    """The classes with their deadlines in seconds, from the profile's service times."""
    classes = {}
    for kind, c in WORKLOADS[profile.data["name"]].items():
        if kind == "loads":
            continue
        alone = profile.alone_s(c["steps"], c["height"], c["width"])
        classes[kind] = {**c, "alone_s": alone, "deadline_s": c["slo"] * alone}
    return classes


def make_workload(num: int, load: float, classes: dict, profile: Profile, seed: int = 0) -> list[Spec]:
    rng = random.Random(seed)
    mean_service = sum(c["share"] * c["alone_s"] for c in classes.values())
    rate = load / mean_service
    kinds = list(classes)
    clock, specs = 0.0, []
    for i in range(num):
        clock += rng.expovariate(rate)
        kind = rng.choices(kinds, weights=[classes[k]["share"] for k in kinds])[0]
        c = classes[kind]
        specs.append(Spec(i, clock, kind, c["steps"], c["height"], c["width"], c["deadline_s"], c["priority"]))
    return specs


# -- metrics -------------------------------------------------------------------------------------
def attainment(outcomes: list[Outcome]) -> float:
    return sum(o.met for o in outcomes) / len(outcomes)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(outcomes: list[Outcome]) -> dict:
    start = min(o.arrival for o in outcomes)
    end = max(max(o.finish or o.arrival for o in outcomes), max(o.arrival for o in outcomes))
    report = {
        "attainment": attainment(outcomes),
        "goodput_rps": sum(o.met for o in outcomes) / (end - start),
        "refused": sum(o.finish is None for o in outcomes),
        "latency_p50_s": percentile([o.finish - o.arrival for o in outcomes if o.finish is not None], 0.5),
        "latency_p99_s": percentile([o.finish - o.arrival for o in outcomes if o.finish is not None], 0.99),
    }
    for kind in sorted({o.kind for o in outcomes}):
        mine = [o for o in outcomes if o.kind == kind]
        latencies = [o.finish - o.arrival for o in mine if o.finish is not None]
        report[kind] = {
            "count": len(mine),
            "finished": len(latencies),
            "attainment": attainment(mine),
            "p50_s": percentile(latencies, 0.5),
            "p99_s": percentile(latencies, 0.99),
        }
    return report


def load_where(loads: list[float], values: list[float], level: float) -> float | None:
    """The load at which a falling curve first crosses `level` (linear interpolation)."""
    for (l0, v0), (l1, v1) in zip(zip(loads, values), zip(loads[1:], values[1:])):
        if v0 >= level > v1:
            return l0 + (l1 - l0) * (v0 - level) / (v0 - v1)
    return None


def at_load(loads: list[float], values: list[float], load: float) -> float:
    for (l0, v0), (l1, v1) in zip(zip(loads, values), zip(loads[1:], values[1:])):
        if l0 <= load <= l1:
            return v0 + (v1 - v0) * (load - l0) / (l1 - l0)
    raise ValueError(f"load {load} outside {loads}")


def goals(loads: list[float], systems: dict) -> dict:
    """The issue's goal figures: deadline's attainment where fcfs attains 80%, and the goodput
    ratio where fcfs first attains under 50%."""
    fcfs = [r["attainment"] for r in systems["stepweave-fcfs"]]
    deadline = [r["attainment"] for r in systems["stepweave-deadline"]]
    at80 = load_where(loads, fcfs, 0.8)
    under50 = next((load for load, a in zip(loads, fcfs) if a < 0.5), None)
    result = {"load_fcfs_80": at80, "deadline_attainment_at_fcfs_80": None, "load_fcfs_under_50": under50}
    if at80 is not None:
        result["deadline_attainment_at_fcfs_80"] = at_load(loads, deadline, at80)
    if under50 is not None:
        i = loads.index(under50)
        fcfs_good = systems["stepweave-fcfs"][i]["goodput_rps"]
        result["goodput_ratio_at_fcfs_under_50"] = systems["stepweave-deadline"][i]["goodput_rps"] / fcfs_good
    # no starvation: every long request the deadline policy accepted finished
    longs = [r["long"] for r in systems["stepweave-deadline"] if "long" in r]
    result["deadline_long_finished"] = sum(r["finished"] for r in longs)
    result["deadline_long_count"] = sum(r["count"] for r in longs)
    return result


# -- simulated -----------------------------------------------------------------------------------
def run_sim(profile_path: str, loads: list[float] | None, num: int, seed: int) -> dict:
    profile = Profile(profile_path)
    classes = workload_classes(profile)
    loads = loads or WORKLOADS[profile.data["name"]]["loads"]
    systems: dict[str, list] = {}
    wall = time.perf_counter()
    for load in loads:
        specs = make_workload(num, load, classes, profile, seed)
        say(f"{profile.data['name']}: load {load}: {num} requests")
        systems.setdefault("diffusers-sequential", []).append(summarize(simulate_diffusers(specs, profile, 1)))
        static = simulate_diffusers(specs, profile, MAX_NUM_SEQS)
        systems.setdefault("diffusers-static", []).append(summarize(static))
        for policy in POLICIES:
            outcomes = simulate_stepweave(specs, profile, policy, MAX_NUM_SEQS, MAX_PAUSED)
            systems.setdefault(f"stepweave-{policy}", []).append(summarize(outcomes))
    return {
        "profile": profile_path,
        "source": profile.data.get("source"),
        "classes": classes,
        "num_requests": num,
        "loads": loads,
        "systems": systems,
        "goals": goals(loads, systems),
        "sim_wall_s": time.perf_counter() - wall,
    }


# -- report --------------------------------------------------------------------------------------
def plot(report: dict, path: str) -> bool:
    plt = headless_pyplot(path)
    if plt is None:
        return False

    panels = [(f"{name} (simulated)", run) for name, run in report["sim"].items()]
    if report.get("real"):
        panels.append(("small-qwen-image on this CPU (real)", report["real"]))
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 7), squeeze=False)
    for col, (title, run) in enumerate(panels):
        for name, rows in run["systems"].items():
            axes[0][col].plot(run["loads"], [r["attainment"] for r in rows], marker="o", label=name)
            axes[1][col].plot(run["loads"], [r["goodput_rps"] for r in rows], marker="o", label=name)
        axes[0][col].set_title(title, fontsize=9)
        axes[0][col].set_ylabel("SLO attainment")
        axes[0][col].set_ylim(0, 1.05)
        axes[1][col].set_ylabel("goodput (req/s within deadline)")
        axes[1][col].set_xlabel("offered load (x what diffusers-sequential sustains)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return True


def say(message: str) -> None:
    print(f"[slo] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sim", nargs="*", default=[], help="cost profiles to simulate")
    parser.add_argument("--sim-requests", type=int, default=10_000)
    parser.add_argument("--sim-loads", type=float, nargs="+", default=None, help="default: the workload's own")
    parser.add_argument("--real", action="store_true", help="also run the real engine on small-qwen-image")
    parser.add_argument(
        "--real-profile", default="measure", help="a cost profile, or 'measure' (cost_profile.py, just before)"
    )
    parser.add_argument("--real-requests", type=int, default=200)
    parser.add_argument("--real-loads", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/slo.json")
    parser.add_argument("--plot", default="benchmarks/results/slo.png")
    args = parser.parse_args(argv)
    report: dict = {"config": vars(args), "sim": {}, "real": None}
    for path in args.sim:
        run = run_sim(path, args.sim_loads, args.sim_requests, args.seed)
        report["sim"][Profile(path).data["name"]] = run
        print_run(Profile(path).data["name"] + " (simulated)", run)
    if args.real:
        from benchmarks.slo_real import run_real

        partial = str(Path(tempfile.gettempdir()) / "slo_real.partial.json")
        report["real"] = run_real(args.real_profile, args.real_loads, args.real_requests, args.seed, partial)
        print_run("small-qwen-image (real)", report["real"])
        for kind in ("simulated", "calibrated", "paced"):
            print_run(f"small-qwen-image ({kind}, same requests)", {**report["real"], "systems": report["real"][kind]})
        print(f"simulator vs real: worst relative error {report['real']['sim_error']['worst']}")
        for kind in ("calibrated", "paced"):
            print(f"{kind} simulator vs real: worst relative error {report['real'][f'{kind}_error']['worst']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    say(f"wrote {args.json}")
    if args.plot and plot(report, args.plot):
        say(f"wrote {args.plot}")
    return report


def print_run(title: str, run: dict) -> None:
    print(f"\n{title}: SLO attainment by offered load")
    print("| system | " + " | ".join(f"{load:g}" for load in run["loads"]) + " |")
    print("|---|" + "---|" * len(run["loads"]))
    for name, rows in run["systems"].items():
        print(f"| {name} | " + " | ".join(f"{r['attainment']:.2f}" for r in rows) + " |")
    if "goals" in run:
        print(json.dumps(run["goals"]))


if __name__ == "__main__":
    main()
