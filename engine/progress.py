"""The progress bar the batch front doors (`Omni.generate`, `EngineClient.generate`) show."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar counting finished requests, or None when disabled or there is nothing to count."""
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Generating", unit="req", dynamic_ncols=True)
