"""The scheduling policy interface, and `fcfs`, the default.

The scheduler owns the mechanics (the running set, batches in flight, memory, drops); a policy
only answers four questions, so policies stay small and the scheduler stays pure:
- `new_queue()`: the waiting queue, in the policy's order (admission takes its head);
- `admit(request)`: at submission, accept or refuse the request (admission control);
- `may_pause_others(head, running, by_client)`: may `head` start although max_num_seqs requests
  run (it then takes a row from one of them, within the max_paused budget);
- `choose(eligible, rows, now)`: which running requests take this step (the others sit it out,
  their state kept on the workers). A policy with `uses_start_time` gets, as `now`, when the
  batch will start: after the batches still in flight, as the cost model predicts them.

`fcfs` is first come, first served with fairness between clients: the waiting queue is the
FairQueue, a client with nothing running may start beyond the cap, and running requests beyond
the cap take turns (least recently stepped first, spread over clients).
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

from engine.core.cost_model import CostModel
from engine.core.fair_queue import FairQueue
from engine.core.request import Request

POLICIES = ("fcfs", "priority", "deadline")


class SchedulingPolicy:
    name = ""
    uses_start_time = False  # choose() gets when its batch will start (after those in flight), not now

    def __init__(self, cost_model: CostModel | None = None):
        self.cost_model = cost_model if cost_model is not None else CostModel()

    def new_queue(self):
        raise NotImplementedError

    def admit(self, request: Request) -> None:
        """Called once per request at submission; raise to refuse it."""

    def prepare(self, queue, now: float) -> None:
        """Called at the start of every schedule(), before admission."""

    def may_pause_others(self, head: Request, running: Sequence[Request], by_client: Mapping[str, int]) -> bool:
        raise NotImplementedError

    def choose(self, eligible: list[Request], rows: int, now: float) -> list[Request]:
        raise NotImplementedError


class FcfsPolicy(SchedulingPolicy):
    name = "fcfs"

    def __init__(self, cost_model: CostModel | None = None, take_turns: bool = False):
        super().__init__(cost_model)
        self.take_turns = take_turns  # with a paused budget: running requests beyond the cap take turns

    def new_queue(self) -> FairQueue:
        return FairQueue()

    def may_pause_others(self, head, running, by_client) -> bool:
        return not by_client.get(head.client, 0)

    def choose(self, eligible, rows, now):
        return _take_turns(eligible, rows) if self.take_turns else eligible[:rows]


def _take_turns(eligible: list[Request], rows: int) -> list[Request]:
    """`rows` of the eligible requests, shared evenly between clients and, within a client, the
    ones that waited longest since their last step first: requests beyond the row cap sit out
    steps in turn (their state stays on the workers) instead of one client's requests holding
    every row."""
    if len(eligible) <= rows:
        return eligible
    taken: Counter[str] = Counter()
    pool, chosen = list(eligible), []
    for _ in range(rows):
        pick = min(pool, key=lambda r: (taken[r.client], r.last_batch))
        pool.remove(pick)
        chosen.append(pick)
        taken[pick.client] += 1
    return chosen


def make_policy(
    name: str,
    cost_model: CostModel | None = None,
    *,
    take_turns: bool = False,
    priority_aging_s: float = 10.0,
    deadline_admission: str = "reject",
) -> SchedulingPolicy:
    """The policy `EngineConfig.scheduling_policy` names."""
    if name == "fcfs":
        return FcfsPolicy(cost_model, take_turns=take_turns)
    if name == "priority":
        from engine.core.priority_policy import PriorityPolicy

        return PriorityPolicy(cost_model, aging_s=priority_aging_s)
    if name == "deadline":
        from engine.core.deadline_policy import DeadlinePolicy

        return DeadlinePolicy(cost_model, admission=deadline_admission)
    raise ValueError(f"EngineConfig.scheduling_policy must be one of {POLICIES}, got {name!r}")
