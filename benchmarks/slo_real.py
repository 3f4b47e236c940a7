"""The real-engine half of benchmarks/slo.py: the workload served by the real engine and by
diffusers' pipeline on this machine (small-qwen-image), then the simulator on the same requests,
to check its predictions (`python benchmarks/slo.py --real`).

The machine's speed drifts over minutes, so the check measures its cost profile first, and
besides the prediction from that profile reports the simulator with the costs refitted from the
run's own batches and calls, scaled to the speed of each system's run ("paced"): what is left
then is the simulator's scheduling, not its cost model.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

from benchmarks.simulator import Outcome, Profile, Spec, call_features, simulate_diffusers, simulate_stepweave
from benchmarks.slo import MAX_NUM_SEQS, MAX_PAUSED, POLICIES, make_workload, say, summarize, workload_classes


def run_real(profile_path: str, loads: list[float], num: int, seed: int, partial: str | None = None) -> dict:
    """The real engine and diffusers on small-qwen-image, then the simulator on the same requests:
    `simulated` with the profile (`measure`: measured by benchmarks/cost_profile.py just before,
    so the machine's speed is today's), `calibrated` with step costs refitted from the batches
    and pipeline calls this run measured (what is left is the simulator's scheduling, not its
    cost model), and `paced` with those costs scaled to how fast the machine ran while each
    system and load was measured (a shared machine's speed drifts by 10-20% over minutes)."""
    import diffusers
    import torch

    from benchmarks import throughput
    from pipelines.model_info import ModelInfo

    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="slo-real-"))
    if profile_path == "measure":
        from benchmarks import cost_profile

        say("real: measuring the cost profile first")
        profile_path = str(scratch / "small-qwen-image-measured.json")
        cost_profile.main(["--model", "small-qwen-image", "--out", profile_path])
    profile = Profile(profile_path)
    classes = workload_classes(profile)
    info = ModelInfo.load(profile.data["name"])
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(info.path))
    pipe.set_progress_bar_config(disable=True)
    workloads = {load: make_workload(num, load, classes, profile, seed) for load in loads}
    measured: dict[str, list] = {}
    calls: list = []  # (features, seconds) of every diffusers pipeline call
    phases: dict = {}  # (system, load) -> the slice of `calls` or `batches` it measured
    for name, max_batch in (("diffusers-sequential", 1), ("diffusers-static", MAX_NUM_SEQS)):
        for load in loads:
            say(f"real: {name} at load {load}")
            start = len(calls)
            outcomes = _serve_diffusers(throughput, pipe, workloads[load], max_batch, profile, calls)
            measured.setdefault(name, []).append(summarize(outcomes))
            phases[name, load] = slice(start, len(calls))
    batches: list = []  # (features, seconds) of every engine step batch
    for policy in POLICIES:
        from engine import AsyncEngine

        engine = AsyncEngine(
            model=str(info.path),
            max_num_seqs=MAX_NUM_SEQS,
            max_paused=MAX_PAUSED,
            scheduling_policy=policy,
            cost_profile=profile_path,
        )
        try:
            asyncio.run(_serve_engine(engine, workloads[loads[0]][:2]))  # warm-up
            _record_batches(engine.core.scheduler.cost_model, batches)
            for load in loads:
                say(f"real: stepweave-{policy} at load {load}")
                start = len(batches)
                outcomes = asyncio.run(_serve_engine(engine, workloads[load]))
                measured.setdefault(f"stepweave-{policy}", []).append(summarize(outcomes))
                phases[f"stepweave-{policy}", load] = slice(start, len(batches))
                _save_partial(partial, measured)
        finally:
            engine.shutdown()
    hindsight, noise = _refit(profile, batches, calls, scratch / "small-qwen-image-calibrated.json")
    calibrated = Profile(hindsight)
    # how fast the machine ran while each system and load was measured, against the refitted costs
    speed = {}
    for (name, load), part in phases.items():
        model, done = (calibrated.diffusers_cost, calls) if name.startswith("diffusers") else (calibrated.cost, batches)
        modelled = sum(model.predict(features) for features, _ in done[part])
        speed.setdefault(name, []).append(sum(seconds for _, seconds in done[part]) / modelled if modelled else 1.0)
    predicted = _simulate_same(workloads, loads, lambda name, i: profile, 0.0)
    refitted = _simulate_same(workloads, loads, lambda name, i: calibrated, noise)
    paced = _simulate_same(workloads, loads, lambda name, i: Profile(hindsight, speed[name][i]), noise)
    return {
        "profile": profile.data,
        "calibrated_profile": calibrated.data,
        "calibrated_noise": noise,
        "machine_speed": speed,
        "classes": classes,
        "num_requests": num,
        "loads": loads,
        "systems": measured,
        "simulated": predicted,
        "calibrated": refitted,
        "paced": paced,
        "sim_error": sim_error(measured, predicted),
        "calibrated_error": sim_error(measured, refitted),
        "paced_error": sim_error(measured, paced),
    }


def _simulate_same(workloads: dict, loads: list[float], profile_for, noise: float) -> dict:
    """The simulator on the real run's requests, each system and load with `profile_for(system,
    load index)` (the stepweave runs with batch-time noise `noise`, the spread of
    log(measured / modelled) batch time)."""
    predicted: dict[str, list] = {}
    for i, load in enumerate(loads):
        specs = workloads[load]
        for name, batch in (("diffusers-sequential", 1), ("diffusers-static", MAX_NUM_SEQS)):
            outcomes = simulate_diffusers(specs, profile_for(name, i), batch)
            predicted.setdefault(name, []).append(summarize(outcomes))
        for policy in POLICIES:
            name = f"stepweave-{policy}"
            outcomes = simulate_stepweave(specs, profile_for(name, i), policy, MAX_NUM_SEQS, MAX_PAUSED, noise=noise)
            predicted.setdefault(name, []).append(summarize(outcomes))
    return predicted


def _record_batches(model, batches: list) -> None:
    """Keep every batch the engine's cost model is shown (its own fit goes on as before)."""
    observe = model.observe

    def recording(features, seconds):
        batches.append((list(features), seconds))
        observe(features, seconds)

    model.observe = recording


def _refit(profile: Profile, batches: list, calls: list, path: Path) -> tuple[str, float]:
    """A profile fitted on the run's own batches and calls, and the batch-time noise around it."""
    import numpy as np

    from engine.core.cost_model import CostModel

    engine_model = CostModel(window=max(1, len(batches)), refit_every=1 << 30)
    for features, seconds in batches:
        engine_model.observe(features, seconds)
    engine_model.refit()
    diffusers_model = CostModel(window=max(1, len(calls)), refit_every=1 << 30)
    for features, seconds in calls:
        diffusers_model.observe(features, seconds)
    diffusers_model.refit()
    modelled = [(seconds, engine_model.predict(f)) for f, seconds in batches]
    ratios = [seconds / p for seconds, p in modelled if seconds > 0 and p > 0]
    noise = float(np.std(np.log(ratios))) if ratios else 0.0
    report = engine_model.to_json(
        name=profile.data["name"],
        source=f"refitted on the {len(batches)} step batches and {len(calls)} pipeline calls of a real slo.py run",
        geometry=profile.data["geometry"],
    )
    report["diffusers"] = diffusers_model.to_json()
    path.write_text(json.dumps(report, indent=2))
    return str(path), noise


def _save_partial(path: str | None, measured: dict) -> None:
    """The real run so far (it takes minutes; a crash at the end should not lose it)."""
    if path:
        Path(path).write_text(json.dumps(measured, indent=2))


def sim_error(measured: dict, predicted: dict) -> dict:
    """Relative error of the simulator's p50, p99 and attainment against the real run (None
    where the real run has no such figure, e.g. no request finished)."""
    errors = {}
    for name in measured:
        rows = []
        for real, sim in zip(measured[name], predicted[name]):
            row = {}
            for key in ("latency_p50_s", "latency_p99_s", "attainment"):
                if real[key] is None or sim[key] is None:
                    row[key] = None
                else:
                    row[key] = abs(sim[key] - real[key]) / max(abs(real[key]), 1e-9)
            rows.append(row)
        errors[name] = rows
    values = [v for rows in errors.values() for row in rows for v in row.values() if v is not None]
    ours = [v for name, rows in errors.items() if name.startswith("stepweave") for row in rows for v in row.values()]
    return {
        "by_system": errors,
        "worst": max(values, default=None),
        "worst_stepweave": max((v for v in ours if v is not None), default=None),
    }


def _serve_diffusers(throughput, pipe, specs: list[Spec], max_batch: int, profile: Profile, calls: list):
    """diffusers' pipeline on a simulated clock with real compute (as throughput.py serves it),
    batching waiting requests of equal steps and size; every call's features and time go to
    `calls`."""
    throughput.CFG_KEY = "true_cfg_scale"
    pending, clock, outcomes = list(specs), 0.0, {}
    while pending:
        clock = max(clock, pending[0].arrival)
        waiting = [s for s in pending if s.arrival <= clock]
        head = waiting[0]
        batch = [s for s in waiting if (s.steps, s.height, s.width) == (head.steps, head.height, head.width)]
        batch = batch[:max_batch]
        seconds = throughput._call(pipe, [_throughput_spec(throughput, s) for s in batch], (head.height, head.width))
        calls.append((call_features([profile.shape(s.height, s.width) for s in batch], head.steps), seconds))
        clock += seconds
        for s in batch:
            outcomes[s.index] = Outcome(s.kind, s.arrival, clock, s.deadline_s)
            pending.remove(s)
    return [outcomes[s.index] for s in specs]


def _throughput_spec(throughput, spec: Spec):
    prompts, negatives = throughput.PROMPTS, throughput.NEGATIVES
    return throughput.Spec(
        spec.index, spec.arrival, spec.steps, prompts[spec.index % len(prompts)], negatives[spec.index % 3], spec.index
    )


async def _serve_engine(engine, specs: list[Spec]) -> list[Outcome]:
    from benchmarks import throughput
    from engine import SamplingParams

    start = time.perf_counter()

    async def one(spec: Spec) -> Outcome:
        await asyncio.sleep(max(0.0, spec.arrival - (time.perf_counter() - start)))
        params = SamplingParams(
            num_inference_steps=spec.steps,
            true_cfg_scale=4.0,
            seed=spec.index,
            height=spec.height,
            width=spec.width,
            priority=spec.priority,
            deadline_s=spec.deadline_s,
            output_type="np",
        )
        prompt = {
            "prompt": throughput.PROMPTS[spec.index % len(throughput.PROMPTS)],
            "negative_prompt": throughput.NEGATIVES[spec.index % 3],
        }
        try:
            final = None
            async for final in engine.generate(prompt, params):
                pass
        except ValueError:  # refused at admission
            return Outcome(spec.kind, spec.arrival, None, spec.deadline_s)
        if final.error and final.error.startswith("SamplingParams.deadline_s"):  # refused in the engine's thread
            return Outcome(spec.kind, spec.arrival, None, spec.deadline_s)
        if final.error:
            raise RuntimeError(final.error)
        # from the scheduled arrival, as for the baselines
        return Outcome(spec.kind, spec.arrival, time.perf_counter() - start, spec.deadline_s)

    return list(await asyncio.gather(*(one(s) for s in specs)))
