"""`priority`: higher SamplingParams.priority first, with aging so that nothing starves.

A request's effective priority grows by one level every `aging_s` seconds it has been in the
engine: priority + (now - arrival) / aging_s. Since every request ages at the same rate, the
order between two requests never changes while they wait, and it equals ordering by
arrival - priority * aging_s (smaller first); that is the waiting queue's key, and the order
in which running requests get rows when more run than a step holds (the rest sit the step out).

The wait bound: a request of priority p that arrived at t runs before every request of priority
q that arrives after t + (q - p) * aging_s. So under an endless flood of priority-q requests it
waits at most for the requests that arrived before t + (q - p) * aging_s, and never forever.
"""

from __future__ import annotations

from engine.core.cost_model import CostModel
from engine.core.keyed_queue import KeyedQueue
from engine.core.policy import SchedulingPolicy
from engine.core.request import Request


class PriorityPolicy(SchedulingPolicy):
    name = "priority"

    def __init__(self, cost_model: CostModel | None = None, aging_s: float = 10.0):
        super().__init__(cost_model)
        self.aging_s = aging_s

    def key(self, request: Request) -> float:
        return request.arrival_time - request.params.priority * self.aging_s

    def new_queue(self) -> KeyedQueue:
        return KeyedQueue(self.key)

    def may_pause_others(self, head, running, by_client) -> bool:
        return bool(running) and self.key(head) < max(self.key(r) for r in running)

    def choose(self, eligible, rows, now):
        if len(eligible) <= rows:
            return eligible
        return sorted(eligible, key=lambda r: (self.key(r), r.last_batch))[:rows]
