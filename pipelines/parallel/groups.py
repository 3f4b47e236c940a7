"""torch.distributed process groups for the cfg x pipeline worker grid.

Rank layout: rank = cfg_rank * pipeline_parallel_size + pp_stage. Ranks that share a pipeline
stage form a CFG group (they all-gather branch predictions); ranks that share a CFG rank form a
pipeline (stages talk point-to-point by global rank). gloo on CPU, NCCL on CUDA; multi-node goes
through the same tcp:// rendezvous (MASTER_ADDR:MASTER_PORT of rank 0).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class GridPosition:
    rank: int
    cfg_rank: int
    pp_stage: int
    cfg_size: int
    pp_size: int

    @classmethod
    def of(cls, rank: int, cfg_size: int, pp_size: int) -> "GridPosition":
        return cls(rank, rank // pp_size, rank % pp_size, cfg_size, pp_size)

    def global_rank(self, cfg_rank: int, pp_stage: int) -> int:
        return cfg_rank * self.pp_size + pp_stage

    @property
    def reports_results(self) -> bool:
        """The last pipeline stage of CFG rank 0 owns the final latents and reports."""
        return self.cfg_rank == 0 and self.pp_stage == self.pp_size - 1


def setup_parallel(pipeline: Any, rank: int, parallel: Any, dist_address: str) -> GridPosition:
    """Join the process group (rendezvous at `dist_address`, host:port) and hand the pipeline
    its CFG group and pipeline stage. `parallel` is the engine's ParallelConfig."""
    position = GridPosition.of(rank, parallel.cfg_parallel_size, parallel.pipeline_parallel_size)
    backend = "nccl" if pipeline.device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(pipeline.device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{dist_address}",
        rank=rank,
        world_size=parallel.world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    cfg_groups = []
    for stage in range(position.pp_size):  # every rank creates every group, in the same order
        ranks = [position.global_rank(c, stage) for c in range(position.cfg_size)]
        cfg_groups.append(dist.new_group(ranks) if position.cfg_size > 1 else None)
    if position.cfg_size > 1:
        pipeline.cfg_group = cfg_groups[position.pp_stage]
        pipeline.cfg_rank = position.cfg_rank
        pipeline.cfg_world_size = position.cfg_size
    if position.pp_size > 1:
        pipeline.setup_pipeline_stage(position, parallel.pp_layer_partition)
    pipeline.reports_results = position.reports_results
    return position
