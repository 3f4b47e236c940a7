"""What a caller receives for a request: progress while it runs, then the final images or video."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class RequestMetrics:
    arrival_time: float
    queue_time_s: float | None  # arrival until the first step was scheduled
    latency_s: float | None  # arrival until the final output
    num_steps: int


@dataclass
class RequestOutput:
    """One update for one request.

    `images` is set on the final output of a successful request: a list of PIL images for
    output_type="pil", or a float32 array (N, H, W, 3) in [0, 1] for output_type="np", laid out as
    diffusers returns it. A video request's final output carries `frames` instead: a float32
    array (F, H, W, 3) in [0, 1] for "np" (diffusers' `output.frames[0]`), or a list of F PIL
    images for "pil". `error` is None on success.
    """

    request_id: str
    step: int
    num_steps: int
    finished: bool = False
    images: Any = None
    error: str | None = None
    seed: int | None = None
    metrics: RequestMetrics | None = None
    frames: Any = None

    @property
    def ok(self) -> bool:
        return self.finished and self.error is None


def to_images(array: np.ndarray, output_type: str) -> Any:
    """Turn the workers' float array into what the request asked for (diffusers' rounding)."""
    if output_type == "np":
        return array if array.flags.writeable else array.copy()
    from PIL import Image

    pixels = (array * 255).round().astype("uint8")
    return [Image.fromarray(p) for p in pixels]


def to_frames(array: np.ndarray, output_type: str) -> Any:
    """A video from the workers' float array (1, F, H, W, 3) -> what the request asked for."""
    return to_images(array[0], output_type)


def is_video(array: Any) -> bool:
    """The workers' final array is a video (1, F, H, W, 3) rather than images (N, H, W, 3)."""
    return isinstance(array, np.ndarray) and array.ndim == 5


def failed_output(request_id: str, error: str) -> RequestOutput:
    """A final output for a request that ended without running (rejected, or its server lost)."""
    return RequestOutput(
        request_id, 0, 0, finished=True, error=error, metrics=RequestMetrics(time.monotonic(), None, 0.0, 0)
    )
