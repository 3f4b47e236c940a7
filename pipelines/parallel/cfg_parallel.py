"""CFG-parallel evaluation of a step's rows: branch i runs on CFG rank i % M, then all-gather.

Every rank sees the same rows (SPMD), so each knows without talking which rows every other rank
computes. Ranks first agree that every forward succeeded (one tiny all-reduce): if any rank
failed, all of them raise, and the runner's row-by-row retry stays in lock-step instead of
leaving a peer blocked in a collective. Predictions are padded to the largest per-rank row
count and all-gathered; each rank then holds every branch of every request and combines and
steps locally.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class PeerForwardError(RuntimeError):
    """Another CFG rank's forward failed for this group of rows."""


def evaluate_rows_across_ranks(pipeline: Any, rows: list) -> list[Any]:
    world, rank, group = pipeline.cfg_world_size, pipeline.cfg_rank, pipeline.cfg_group
    owners = [branch % world for _, branch in rows]
    mine = [row for row, owner in zip(rows, owners) if owner == rank]
    local, error = None, None
    if mine:
        try:
            local = pipeline.forward_rows(mine)
        except Exception as exc:  # reported to the peers first, raised below
            error = exc
    failed = torch.tensor([1 if error is not None else 0], dtype=torch.int32, device=pipeline.device)  # NCCL needs CUDA
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    if failed.item():
        raise PeerForwardError("the forward failed on another CFG rank")
    if not getattr(pipeline, "is_last_stage", True):
        return None  # this pipeline stage sent its rows on; the last stage gathers

    shapes = pipeline.prediction_shapes(rows[0][0])
    multi = isinstance(shapes, list)
    shapes = shapes if multi else [shapes]
    locals_ = list(local) if multi and local is not None else [local]
    counts = [owners.count(r) for r in range(world)]
    longest = max(counts)
    gathered_parts = []
    for part, shape in enumerate(shapes):
        device = pipeline.device
        send = torch.zeros((longest, *shape[1:]), dtype=pipeline.dtype, device=device)
        if mine:
            send[: len(mine)] = locals_[part]
        receive = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(receive, send, group=group)
        gathered_parts.append(receive)

    taken = [0] * world
    predictions = []
    for owner in owners:
        index = taken[owner]
        taken[owner] += 1
        parts = tuple(g[owner][index : index + 1] for g in gathered_parts)
        predictions.append(parts if multi else parts[0])
    return predictions
