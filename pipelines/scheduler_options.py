"""The documented ranges of `SamplingParams.scheduler_config` overrides.

A scheduler override is user input that sizes arrays and indexes tables inside diffusers:
`num_train_timesteps=10**7` allocates ~76 MB per distinct value and `solver_order=0` fails
mid-run with an IndexError. Each numeric option a scheduler may take is bounded here; any other
option must be a plain scalar (or, for `trained_betas`, a short list of numbers). The ranges are
wide enough for every published model config and narrow enough that a cached scheduler stays
small.
"""

from __future__ import annotations

from typing import Any

MAX_TRAIN_TIMESTEPS = 10_000

# option -> (low, high, integer?)
RANGES: dict[str, tuple[float, float, bool]] = {
    "num_train_timesteps": (1, MAX_TRAIN_TIMESTEPS, True),
    "solver_order": (1, 3, True),
    "steps_offset": (0, MAX_TRAIN_TIMESTEPS, True),
    "original_inference_steps": (1, MAX_TRAIN_TIMESTEPS, True),
    "base_image_seq_len": (1, 1 << 20, True),
    "max_image_seq_len": (1, 1 << 20, True),
    "beta_start": (0.0, 1.0, False),
    "beta_end": (0.0, 1.0, False),
    "shift": (0.01, 100.0, False),
    "flow_shift": (0.01, 100.0, False),
    "base_shift": (-10.0, 10.0, False),
    "max_shift": (-10.0, 10.0, False),
    "shift_terminal": (0.0, 1.0, False),
    "sample_max_value": (0.0, 1e4, False),
    "dynamic_thresholding_ratio": (0.0, 1.0, False),
    "clip_sample_range": (0.0, 1e4, False),
    "sigma_min": (0.0, 1e4, False),
    "sigma_max": (0.0, 1e4, False),
    "s_noise": (0.0, 10.0, False),
    "eta": (0.0, 10.0, False),
}

MAX_STRING_CHARS = 64


def check_scheduler_overrides(overrides: dict[str, Any] | None) -> None:
    """Raise ValueError naming the first override outside its documented range."""
    for name, value in (overrides or {}).items():
        field = f"SamplingParams.scheduler_config[{name!r}]"
        if name == "trained_betas":
            _check_betas(field, value)
        elif name in RANGES and not isinstance(value, bool):
            low, high, integer = RANGES[name]
            kind = int if integer else (int, float)
            if not isinstance(value, kind) or not low <= value <= high:
                what = "an integer" if integer else "a number"
                raise ValueError(f"{field} must be {what} in [{low}, {high}], got {value!r}")
        elif not (value is None or isinstance(value, (bool, int, float, str))):
            raise ValueError(f"{field} must be a number, string, boolean or null, got {type(value).__name__}")
        elif isinstance(value, str) and len(value) > MAX_STRING_CHARS:
            raise ValueError(f"{field} must be at most {MAX_STRING_CHARS} characters, got {len(value)}")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 1 << 31:
            raise ValueError(f"{field} must be within +-2**31, got {value}")


def _check_betas(field: str, value: Any) -> None:
    if value is None:
        return
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_TRAIN_TIMESTEPS
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b <= 1 for b in value)
    ):
        raise ValueError(f"{field} must be a list of 1 to {MAX_TRAIN_TIMESTEPS} numbers in [0, 1]")
