"""Everything a worker keeps for one running request between steps.

The latents, the generator, the prompt embeddings and the request's own diffusers scheduler live
here and never travel to the engine. `step_index` is advanced only by `step_scheduler` (the step
contract), so the timestep a row uses is always `timesteps[step_index]`. A family that needs more
per-request facts subclasses this with typed fields of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.contract.messages import NewRequest


@dataclass
class RequestState:
    request: NewRequest
    generator: torch.Generator
    scheduler: Any  # a private deep copy of a diffusers scheduler, after set_timesteps
    timesteps: torch.Tensor
    latents: Any  # torch.Tensor, or AsyncLatents on a pipeline-parallel stage 0
    # One entry per CFG branch: index 0 is the positive (conditional) branch.
    branch_inputs: list[dict[str, Any]] = field(default_factory=list)
    cfg_scale: float = 1.0
    cfg_normalize: bool = False
    # Rows that can share one transformer forward have equal batch keys (e.g. latent shape).
    batch_key: tuple = ()
    step_index: int = 0
    # The latents' shape for the whole run (a pipeline stage receiving them needs it up front).
    latent_shape: tuple = field(init=False)

    def __post_init__(self) -> None:
        shape = getattr(self.latents, "shape", None)  # multi-output models keep a tuple of tensors
        self.latent_shape = tuple(shape) if shape is not None else ()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_branches(self) -> int:
        return len(self.branch_inputs)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def timestep(self) -> torch.Tensor:
        return self.timesteps[self.step_index]

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.timesteps)
