"""What every preset builder shares: the spec type and the two helpers that make random weights
reproducible and strong enough for a prompt to show in the image.

Kept apart from the family modules so each of them, and the package's `__init__`, can import it
without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class PresetSpec:
    """What a preset is, without building it (the engine reads defaults before loading)."""

    family: str  # "qwen-image", "dit", or "diffusers" (served by the generic diffusers adapter)
    default_height: int
    default_width: int
    builder: Callable[[], Any]  # () -> a diffusers pipeline with seeded random weights
    description: str
    default_num_frames: int | None = None  # video presets: frames when a request gives none


def seeded(seed: int, make: Callable[[], Any]) -> Any:
    """Build one component under its own seed, in float32, without disturbing the caller's RNG
    stream or default dtype (so exports are identical whatever ran before)."""
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            module = make()
        finally:
            torch.set_default_dtype(dtype)
    if isinstance(module, torch.nn.Module):
        module.eval()
    return module


def init_linears_(model: torch.nn.Module, gain: dict[str, float]) -> None:
    """Re-draw every Linear as N(0, g^2 / fan_in) with zero bias (g=1 unless a name fragment in
    `gain` matches). torch's default draws ~1/sqrt(3) smaller, which makes attention (the only
    path the prompt takes into the image stream) so weak that prompts barely change the output;
    unit-variance weights keep the prompt visible while the output projection stays modest."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                g = next((v for k, v in gain.items() if k in name), 1.0)
                module.weight.normal_(0.0, g / module.in_features**0.5)
                if module.bias is not None:
                    module.bias.zero_()
