"""The real StepScheduler and its policies on a simulated clock, for evaluating policies at scale.

Nothing is stubbed on the scheduler's side: requests go through `add_request` (admission
control included), every step batch comes from `schedule()`, and results go through `update()`,
which also refits the policy's cost model from the "measured" batch time, as in the engine.
Only the workers are replaced: they count steps, and a batch takes the time a cost profile
(benchmarks/profiles/*.json) predicts for its composition, times optional noise. So 10,000
requests take seconds, and the same workload can be replayed under every policy and load.

The diffusers baselines run on the same clock: `sequential` runs one request at a time in arrival
order, `static` runs batches of waiting requests with equal parameters to completion (as
benchmarks/throughput.py serves them on real hardware). A pipeline call takes what the profile's
`diffusers` section predicts (fitted on timed calls of the pipeline, which runs its CFG branches
as separate forwards and encodes prompts in the call); a profile without one (a GPU profile built
from published step times) times diffusers with the engine's coefficients.

Usage: python benchmarks/simulator.py --profile benchmarks/profiles/flux-dev-h100.json --num-requests 10000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.contract.errors import DeadlineUnmeetableError  # noqa: E402
from engine.contract.messages import StepBatch, StepOutput, StepResults  # noqa: E402
from engine.contract.sampling_params import SamplingParams  # noqa: E402
from engine.core.cost_model import FEATURES, CostModel, RequestShape, batch_features  # noqa: E402
from engine.core.policy import make_policy  # noqa: E402
from engine.core.request import Request  # noqa: E402
from engine.core.scheduler import StepScheduler  # noqa: E402


@dataclass
class Spec:
    """One request of a workload."""

    index: int
    arrival: float
    kind: str  # "short" or "long"
    steps: int
    height: int
    width: int
    deadline_s: float | None
    priority: int = 0


@dataclass
class Outcome:
    kind: str
    arrival: float
    finish: float | None  # None: refused at admission
    deadline_s: float | None

    @property
    def met(self) -> bool:
        return self.finish is not None and (self.deadline_s is None or self.finish - self.arrival <= self.deadline_s)


class Profile:
    """A cost profile: the step-time coefficients and the model geometry that turns a request's
    size into its shape (rows, image tokens, text tokens). `speed` scales every time (a machine
    running slower than when the profile was taken: 1.1 is 10% slower)."""

    def __init__(self, path: str | Path, speed: float = 1.0):
        self.path = Path(path)
        self.data = json.loads(self.path.read_text())
        self.speed = speed
        self.cost = self._scaled(CostModel.load(self.path))
        section = self.data.get("diffusers")
        self.diffusers_cost = self._scaled(CostModel(section["coefficients"])) if section else self.cost
        geometry = self.data["geometry"]
        self.scale = geometry["vae_scale"] * geometry["patch"]
        self.rows = geometry["rows"]
        self.text_tokens = geometry["text_tokens"]

    def _scaled(self, model: CostModel) -> CostModel:
        return model if self.speed == 1.0 else CostModel(dict(zip(FEATURES, model.coef * self.speed)))

    def shape(self, height: int, width: int) -> RequestShape:
        tokens = (height // self.scale) * (width // self.scale)
        return RequestShape(self.rows, tokens, self.text_tokens, forward_key=(height, width))

    def alone_s(self, steps: int, height: int, width: int) -> float:
        """A request's service time with the workers to itself (one batch per step)."""
        shape = self.shape(height, width)
        return self.cost.run_alone_time(shape, steps)

    def fresh_model(self) -> CostModel:
        """What a policy starts from: the profile, refitted online from then on."""
        return self._scaled(CostModel.load(self.path))


_PIXEL = np.zeros((1, 1, 1, 3), np.float32)  # what a finished request returns (the scheduler wants an image)


class StepCountingWorkers:
    """Workers that only count steps: each request's count is its state, as the real workers keep
    its latents; a dropped request's state is freed, a finished one frees its own. The simulator
    drives the scheduler with them, and so do the scheduling tests (which also read `steps_run`)."""

    def __init__(self, record_steps: bool = False) -> None:
        self.state: dict[str, list[int]] = {}  # wire id -> [steps done, steps in all]
        self.steps_run: dict[str, list[int]] = {}  # wire id -> the step numbers it ran (record_steps)
        self.record_steps = record_steps

    def run(self, batch: StepBatch, seconds: float = 0.0) -> StepResults:
        for wire_id in batch.drop:
            self.state.pop(wire_id, None)
        for new in batch.new:
            self.state[new.request_id] = [0, new.params.num_inference_steps]
        outputs = []
        for wire_id in [n.request_id for n in batch.new] + batch.cached:
            done = self.state[wire_id]
            done[0] += 1
            if self.record_steps:
                self.steps_run.setdefault(wire_id, []).append(done[0])
            finished = done[0] == done[1]
            image = _PIXEL if finished else None
            outputs.append(
                StepOutput(request_id=wire_id, step=done[0], num_steps=done[1], finished=finished, image=image)
            )
            if finished:
                del self.state[wire_id]
        return StepResults(step_id=batch.step_id, outputs=outputs, execute_s=seconds)


def simulate_stepweave(
    specs: list[Spec],
    profile: Profile,
    policy: str,
    max_num_seqs: int = 8,
    max_paused: int = 8,
    admission: str = "reject",
    noise: float = 0.0,
    seed: int = 0,
    in_flight: int = 2,
) -> list[Outcome]:
    """Serve `specs` with the real scheduler under `policy`; batch times from the profile.

    `in_flight=2` is the engine's async scheduling (worker processes, the default): the engine
    schedules a batch while the workers run the one before, so each batch is chosen one batch
    ahead of running, and a request that arrives while a batch runs is seen when that batch's
    results come back. 1 is synchronous scheduling (an in-process engine)."""
    rng = random.Random(seed)
    model = profile.fresh_model()
    scheduler = StepScheduler(
        max_num_seqs,
        max_batches_in_flight=in_flight,
        overlap=in_flight > 1,
        max_paused=max_paused,
        policy=make_policy(policy, model, take_turns=max_paused > 0, deadline_admission=admission),
    )
    truth = profile.cost
    workers = StepCountingWorkers()
    by_id: dict[str, Request] = {}
    outcomes: dict[int, Outcome] = {}
    pending = sorted(specs, key=lambda s: s.arrival)
    queued: deque = deque()  # (batch, its seconds) submitted to the workers, oldest first
    clock, free_at, nxt = 0.0, 0.0, 0  # free_at: when the workers finish what they were given
    while nxt < len(pending) or scheduler.has_work():
        while nxt < len(pending) and pending[nxt].arrival <= clock:
            spec = pending[nxt]
            nxt += 1
            request = _request(spec, profile)
            outcomes[spec.index] = Outcome(spec.kind, spec.arrival, None, spec.deadline_s)
            try:
                scheduler.add_request(request)
            except DeadlineUnmeetableError:
                continue
            by_id[request.request_id] = request
        while (batch := scheduler.schedule(clock)) is not None:
            ids = [n.request_id for n in batch.new] + batch.cached
            shapes = [by_id[i].shape for i in ids]
            finishing = [by_id[i].shape for i in ids if by_id[i].steps_scheduled == by_id[i].num_steps]
            seconds = truth.predict(batch_features(shapes, len(batch.new), finishing))
            if noise:
                seconds *= rng.lognormvariate(0.0, noise)
            free_at = max(free_at, clock) + seconds
            queued.append((batch, seconds, free_at))
        if not queued:
            if nxt >= len(pending):
                break
            clock = max(clock, pending[nxt].arrival)
            continue
        batch, seconds, done_at = queued.popleft()  # the engine waits for the oldest batch's results
        clock = done_at
        for out in scheduler.update(workers.run(batch, seconds), clock, seconds=seconds):
            if out.finished:
                outcomes[int(out.request_id)].finish = clock
                del by_id[out.request_id]
    return [outcomes[s.index] for s in specs]


def _request(spec: Spec, profile: Profile) -> Request:
    params = SamplingParams(
        num_inference_steps=spec.steps,
        height=spec.height,
        width=spec.width,
        priority=spec.priority,
        deadline_s=spec.deadline_s,
        output_type="np",
    )
    request = Request(str(spec.index), params, seed=spec.index, arrival_time=spec.arrival)
    request.shape = profile.shape(spec.height, spec.width)
    return request


def call_features(shapes: list[RequestShape], steps: int) -> list:
    """The cost features of one pipeline call on `shapes` (a model is linear in its features,
    so a call's are the sum of its batches'): `steps` denoising steps, the prompts' encoding,
    one decode."""
    step = batch_features(shapes)
    first = batch_features(shapes, len(shapes))
    last = batch_features(shapes, 0, shapes)
    return [steps * a + (b - a) + (c - a) for a, b, c in zip(step, first, last)]


def simulate_diffusers(specs: list[Spec], profile: Profile, max_batch: int = 1) -> list[Outcome]:
    """diffusers' pipeline on the simulated clock: max_batch=1 is sequential serving, otherwise
    static batches of waiting requests with equal steps and size, each run to completion."""
    pending = sorted(specs, key=lambda s: s.arrival)
    outcomes: dict[int, Outcome] = {}
    arrived: list[Spec] = []
    clock, nxt = 0.0, 0
    while nxt < len(pending) or arrived:
        if not arrived:
            clock = max(clock, pending[nxt].arrival)
        while nxt < len(pending) and pending[nxt].arrival <= clock:
            arrived.append(pending[nxt])
            nxt += 1
        head = arrived[0]
        same = [s for s in arrived if (s.steps, s.height, s.width) == (head.steps, head.height, head.width)]
        batch = same[:max_batch]
        shapes = [profile.shape(s.height, s.width) for s in batch]
        clock += profile.diffusers_cost.predict(call_features(shapes, head.steps))
        taken = {s.index for s in batch}
        arrived = [s for s in arrived if s.index not in taken]
        for s in batch:
            outcomes[s.index] = Outcome(s.kind, s.arrival, clock, s.deadline_s)
    return [outcomes[s.index] for s in specs]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="benchmarks/profiles/flux-dev-h100.json")
    parser.add_argument("--num-requests", type=int, default=10_000)
    parser.add_argument("--load", type=float, default=0.9, help="offered load: arrival rate x mean service alone")
    parser.add_argument("--policy", nargs="+", default=["fcfs", "priority", "deadline"])
    args = parser.parse_args(argv)
    from benchmarks.slo import attainment, make_workload, workload_classes

    profile = Profile(args.profile)
    specs = make_workload(args.num_requests, args.load, workload_classes(profile), profile, seed=0)
    for policy in args.policy:
        started = time.perf_counter()
        outcomes = simulate_stepweave(specs, profile, policy)
        print(f"{policy}: attainment {attainment(outcomes):.3f} ({time.perf_counter() - started:.1f} s wall)")


if __name__ == "__main__":
    main()
