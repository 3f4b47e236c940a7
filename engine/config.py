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

    def validate_layers(self, num_layers: int) -> None:
        """Every stage needs at least one block, and a partition must cover all of them."""
        stages = self.pipeline_parallel_size
        if stages > 1 and num_layers < stages:
            raise ValueError(
                f"ParallelConfig.pipeline_parallel_size must be in [1, {num_layers}] for a {num_layers}-block transformer, got {stages}"
            )
        parts = self.pp_layer_partition
        if parts is not None and sum(parts) != num_layers:
            raise ValueError(
                f"ParallelConfig.pp_layer_partition must sum to the transformer's {num_layers} blocks, got {parts} (sum {sum(parts)})"
            )

    @property
    def world_size(self) -> int:
        return self.cfg_parallel_size * self.pipeline_parallel_size
