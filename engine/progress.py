"""The progress bars the front doors show: denoising steps for one prompt, prompts for many.

One long request under a bar that counts requests sits at 0/1 until it ends; so a single prompt
gets a bar of its steps (all its images' steps), and a batch of prompts a bar of finished prompts.
"""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, enabled: bool, unit: str = "req") -> Any:
    """A tqdm bar, or None when disabled or there is nothing to count."""
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    desc = "Denoising" if unit == "step" else "Generating"
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


class GenerateProgress:
    """Feeds one bar from a front door's outputs: steps when there is one prompt, else prompts."""

    def __init__(self, prompts: int, steps: int, enabled: bool):
        self.by_steps = prompts == 1
        self.bar = progress_bar(steps if self.by_steps else prompts, enabled, "step" if self.by_steps else "req")
        self._steps: dict[str, int] = {}

    def step(self, request_id: str, step: int) -> None:
        """A request reached `step` (progress or final output)."""
        if self.bar is None or not self.by_steps:
            return
        done = self._steps.get(request_id, 0)
        if step > done:
            self._steps[request_id] = step
            self.bar.update(step - done)

    def prompt_done(self) -> None:
        if self.bar is not None and not self.by_steps:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
