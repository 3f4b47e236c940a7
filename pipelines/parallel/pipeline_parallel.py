"""Pipeline parallelism: the transformer's blocks split across stage processes.

Every stage receives the same step batches and keeps the same per-request bookkeeping (step
index, timesteps), but holds only its own blocks. Stage s runs its blocks on the rows and
`isend`s the hidden states to stage s+1; the last stage finishes the forward, combines CFG,
steps each request's scheduler and `isend`s the new latents back to stage 0, which posts the
matching `irecv` at once and waits only on first use (`AsyncLatents`). Sends and receives
between two stages happen in the same order on both sides (same batches, same groups, same
request order), so one tag per direction is enough.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pipelines.parallel.async_latents import AsyncLatents, resolve

HIDDEN_TAG, LATENTS_TAG = 1, 2


def split_evenly(num_blocks: int, stages: int) -> list[int]:
    base, extra = divmod(num_blocks, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


class PipelineParallelMixin:
    pp_size: int = 1
    pp_stage: int = 0

    def setup_pipeline_stage(self, position: Any, partition: list[int] | None) -> None:
        """Keep only this stage's blocks and learn the neighbours' global ranks. The engine has
        checked the partition against the block count (ParallelConfig.validate_layers)."""
        counts = partition or split_evenly(len(self.transformer_blocks()), position.pp_size)
        start = sum(counts[: position.pp_stage])
        self.keep_blocks(start, start + counts[position.pp_stage])
        self.pp_size, self.pp_stage = position.pp_size, position.pp_stage
        self.pp_first = position.global_rank(position.cfg_rank, 0)
        self.pp_last = position.global_rank(position.cfg_rank, position.pp_size - 1)
        self.pp_prev = position.global_rank(position.cfg_rank, position.pp_stage - 1) if position.pp_stage else None
        self.pp_next = (
            position.global_rank(position.cfg_rank, position.pp_stage + 1)
            if position.pp_stage < position.pp_size - 1
            else None
        )
        self._pending_sends: list[Any] = []

    # -- implemented by pipelines that support PP ---------------------------------------------
    supports_pipeline_parallel: bool = False

    def transformer_blocks(self) -> torch.nn.ModuleList:
        raise NotImplementedError

    def keep_blocks(self, start: int, end: int) -> None:
        raise NotImplementedError

    # -- stage roles --------------------------------------------------------------------------
    @property
    def is_first_stage(self) -> bool:
        return self.pp_stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_stage == self.pp_size - 1

    def send(self, tensors: list[torch.Tensor], tag: int, dst: int) -> None:
        """Post sends without waiting; the buffers are kept alive until they complete."""
        self._pending_sends = [w for w in self._pending_sends if not w.is_completed()]
        for tensor in tensors:
            tensor = tensor.contiguous()
            self._pending_sends.append(_KeepAlive(dist.isend(tensor, dst=dst, tag=tag), tensor))

    def receive(self, shapes: list[tuple], tag: int, src: int) -> list[torch.Tensor]:
        buffers = [torch.empty(shape, dtype=self.dtype, device=self.device) for shape in shapes]
        works = [dist.irecv(buffer, src=src, tag=tag) for buffer in buffers]
        for work in works:
            work.wait()
        return buffers

    # -- the step contract under PP ------------------------------------------------------------
    def pp_step_scheduler(self, state: Any, noise_pred: Any, step_fn) -> None:
        """Last stage: step the scheduler and send the latents to stage 0. Stage 0: post the
        receive for them. Every stage: advance the step index."""
        last_step = state.step_index + 1 >= state.num_steps
        if self.is_last_stage:
            try:
                step_fn(state, noise_pred)
            finally:
                if not last_step:  # always send, even for a failing request, to keep order
                    self.send([resolve(state.latents)], LATENTS_TAG, self.pp_first)
            return
        state.step_index += 1
        if self.is_first_stage and not last_step:
            # A CFG rank that owns no row of this request never touched its latents: complete
            # that receive before posting the next, or the unfinished one would be dropped.
            self.release(state)
            state.latents = AsyncLatents.receive(
                state.latent_shape, self.dtype, self.device, src=self.pp_last, tag=LATENTS_TAG
            )

    def release(self, state: Any) -> None:
        """Before dropping a request, complete any receive still posted for it."""
        if isinstance(state.latents, AsyncLatents):
            state.latents.wait()


class _KeepAlive:
    def __init__(self, work: Any, tensor: torch.Tensor):
        self.work, self.tensor = work, tensor

    def is_completed(self) -> bool:
        return self.work.is_completed()
