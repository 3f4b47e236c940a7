"""`deadline`: as many requests as possible finish by their deadline_s.

- Order: least slack first. A request's slack is its deadline minus now minus the time its
  remaining steps need alone (from the cost model); waiting requests are admitted earliest
  deadline first.
- Preemption at step boundaries: when more requests run than a step should hold, the ones with
  the most slack sit the step out; their state stays on the workers. How many may sit out is
  the scheduler's `max_paused` budget (EngineConfig.max_paused); a waiting request with an
  earlier deadline than a running one starts within that budget instead of waiting for a slot.
- Rows per step: more rows make every step slower (the cost model says how much), so the batch
  grows in urgency order only while the extra row makes none of the more urgent requests that
  would meet their deadlines miss them.
- Admission control: a request whose deadline_s is shorter than it needs even alone is refused
  at submission (admission="reject", DeadlineUnmeetableError) or runs best effort
  ("best_effort"). Until the cost model has a profile or a measured batch, nothing is refused.
- No starvation: a request without a deadline, or one whose deadline can no longer be met
  (it is then "late"), is ordered by a fallback deadline `horizon_s` after its own (or after its
  arrival), so it outranks every request that arrives more than that later.
"""

from __future__ import annotations

from engine.contract.errors import DeadlineUnmeetableError
from engine.core.cost_model import FORWARDS, START, CostModel, batch_features
from engine.core.keyed_queue import KeyedQueue
from engine.core.policy import SchedulingPolicy
from engine.core.request import Request

ADMISSIONS = ("reject", "best_effort")
HORIZON_S = 600.0


class DeadlinePolicy(SchedulingPolicy):
    name = "deadline"
    uses_start_time = True  # with async scheduling a batch runs after the one in flight

    def __init__(self, cost_model: CostModel | None = None, admission: str = "reject", horizon_s: float = HORIZON_S):
        super().__init__(cost_model)
        if admission not in ADMISSIONS:
            raise ValueError(f"EngineConfig.deadline_admission must be one of {ADMISSIONS}, got {admission!r}")
        self.admission = admission
        self.horizon_s = horizon_s

    # -- order -------------------------------------------------------------------------------
    def key(self, request: Request) -> float:
        """The deadline the request is ordered by."""
        if request.deadline_at is None or request.late:
            return request.fallback_at
        return request.deadline_at

    def _alone(self, request: Request, steps: int) -> float:
        return self.cost_model.run_alone_time(request.shape, steps)

    def _remaining(self, request: Request) -> int:
        return max(0, request.num_steps - request.steps_scheduled)

    def _check_late(self, request: Request, now: float) -> bool:
        """Mark a waiting request late once even running alone it would miss its deadline (a
        running one is judged afresh every step, in choose)."""
        if not request.late and request.deadline_at is not None:
            if now + self._alone(request, self._remaining(request)) > request.deadline_at:
                request.late = True
        return request.late

    # -- the four questions ----------------------------------------------------------------------
    def new_queue(self) -> KeyedQueue:
        return KeyedQueue(self.key)

    def admit(self, request: Request) -> None:
        deadline = request.params.deadline_s
        if deadline is None:
            request.fallback_at = request.arrival_time + self.horizon_s
            return
        need = self._alone(request, request.num_steps)
        request.fallback_at = request.arrival_time + deadline + self.horizon_s
        if self.cost_model.known and need > deadline:
            if self.admission == "reject":
                raise DeadlineUnmeetableError(
                    f"SamplingParams.deadline_s={deadline:g} cannot be met: this request needs about {need:.2f} s "
                    f"with the workers to itself ({request.num_steps} steps); ask for deadline_s >= {need:.2f}, "
                    "fewer steps or a smaller image"
                )
            return  # best effort from the start: no deadline of its own
        request.deadline_at = request.arrival_time + deadline

    def prepare(self, queue: KeyedQueue, now: float) -> None:
        """Waiting requests that can no longer make it move behind the ones that still can."""
        while queue:
            head = queue.peek()
            if head.late or not self._check_late(head, now):
                return
            queue.rekey(head)

    def may_pause_others(self, head, running, by_client) -> bool:
        return bool(running) and self.key(head) < max(self.key(r) for r in running)

    def choose(self, eligible, rows, now):
        predict = self.cost_model.predict
        alone: dict[str, float] = {}
        for r in eligible:
            # judged afresh every step: the cost model may have moved since
            alone[r.request_id] = self._alone(r, self._remaining(r))
            r.late = r.deadline_at is not None and now + alone[r.request_id] > r.deadline_at

        def order_key(r: Request):
            # best effort (and late) requests go behind, until their fallback deadline passes
            behind = (r.late or r.deadline_at is None) and now < r.fallback_at
            return behind, self.key(r) - now - alone[r.request_id], r.last_batch

        order = sorted(eligible, key=order_key)
        limit = min(rows, len(order))
        if limit <= 1:
            return order[:limit]
        # Grow the batch in urgency order while the extra row makes no more urgent request that
        # would meet its deadline miss it.
        features = batch_features([order[0].shape])
        keys = {order[0].shape.key}
        met = self._meeting(order[:1], predict(features), now)
        chosen = 1
        for k in range(2, limit + 1):
            shape = order[k - 1].shape
            features = [a + b for a, b in zip(features, batch_features([shape]))]
            keys.add(shape.key)
            features[0], features[FORWARDS] = 1.0, float(len(keys))  # one batch, one forward per key
            now_met = self._meeting(order[:k], predict(features), now)
            if met - now_met:
                break
            chosen, met = k, now_met
        return order[:chosen]

    def _meeting(self, batch: list[Request], step: float, now: float) -> set[str]:
        """The requests of `batch` that meet their deadlines if every step takes `step`, plus the
        encodes of the ones starting and the decodes of those finishing no later than each."""
        model = self.cost_model
        starting = model.coef[START] * sum(not r.sent_to_workers for r in batch)
        remaining = [(self._remaining(r), r) for r in batch]
        met = set()
        for left, r in remaining:
            if r.late or r.deadline_at is None:
                continue
            decodes = sum(model.decode_time(o.shape) for n, o in remaining if n <= left)
            if now + left * step + starting + decodes <= r.deadline_at:
                met.add(r.request_id)
        return met
