"""When to restart a crashed worker grid, and when to give up.

A worker can die for reasons that pass (an out-of-memory kill, a stray signal) or that do not (a
broken GPU, a model that crashes on load). The engine restarts the grid after a crash, waiting
longer after each crash in a row, and gives up after `max_restarts` of them: a run of crashes
ends once the grid has stayed up for `healthy_after_s`.
"""

from __future__ import annotations


class RestartPolicy:
    def __init__(
        self,
        max_restarts: int,
        base_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        healthy_after_s: float = 60.0,
    ):
        self.max_restarts = max_restarts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.healthy_after_s = healthy_after_s
        self.streak = 0  # crashes in the current run
        self._last_start: float | None = None

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before restarting after a crash at `now`, or None: give up."""
        if self._last_start is not None and now - self._last_start >= self.healthy_after_s:
            self.streak = 0
        if self.streak >= self.max_restarts:
            return None
        self.streak += 1
        return min(self.max_delay_s, self.base_delay_s * 2 ** (self.streak - 1))

    def started(self, now: float) -> None:
        """The grid is up again at `now`; it counts as healthy after `healthy_after_s`."""
        self._last_start = now
