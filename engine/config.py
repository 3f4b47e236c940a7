"""How the workers are laid out."""

from __future__ import annotations

import msgspec


class ParallelConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A grid of cfg_parallel_size x pipeline_parallel_size worker ranks."""

    cfg_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Transformer blocks per pipeline stage; None splits them evenly.
    pp_layer_partition: list[int] | None = None

    def validate(self) -> None:
        for name in ("cfg_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
                raise ValueError(f"ParallelConfig.{name} must be an integer in [1, 16], got {value!r}")
        if self.pp_layer_partition is not None:
            parts = self.pp_layer_partition
            if len(parts) != self.pipeline_parallel_size or any(not isinstance(p, int) or p < 1 for p in parts):
                raise ValueError(
                    "ParallelConfig.pp_layer_partition must list one positive block count per pipeline stage "
                    f"({self.pipeline_parallel_size}), got {parts!r}"
                )

    @property
    def world_size(self) -> int:
        return self.cfg_parallel_size * self.pipeline_parallel_size
