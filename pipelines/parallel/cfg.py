"""Classifier-free guidance: the single path every pipeline's noise prediction goes through.

A pipeline only says how to run one transformer forward over a list of rows (`forward_rows`,
each row being a request and one of its CFG branches). This mixin decides which rows run here
and combines the branches per request. Sequential CFG runs all branches of all requests in one
forward; CFG-parallel runs branch i on CFG rank i % M and all-gathers, then every rank combines
(and later steps its own scheduler copy), so ranks never need a broadcast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from pipelines.parallel.cfg_parallel import evaluate_rows_across_ranks

if TYPE_CHECKING:  # the step contract's state; this layer only reads its documented fields
    from pipelines.request_state import RequestState

Row = tuple["RequestState", int]  # (request, CFG branch index; 0 is the positive branch)


class CFGParallelMixin:
    # Keep only [:, :output_slice] of every prediction before combining (e.g. image-edit models
    # whose transformer also predicts the reference image tokens, or DiT's learned variance).
    output_slice: int | None = None
    # Set by the worker under CFG-parallel; None means all branches run on this rank.
    cfg_group: Any = None
    cfg_rank: int = 0
    cfg_world_size: int = 1

    # -- implemented by each pipeline --------------------------------------------------------
    def forward_rows(self, rows: Sequence[Row]) -> Any:
        """One model evaluation over `rows`; returns predictions stacked along dim 0
        (a tuple of such tensors for multi-output models)."""
        raise NotImplementedError

    # -- noise prediction --------------------------------------------------------------------
    def predict_noise(self, states: Sequence[RequestState]) -> list[Any] | None:
        """One noise prediction per request: every branch of every request runs (branch i on
        CFG rank i % world) and is combined; a request with one branch skips CFG. None on a
        pipeline stage that only passes hidden states on."""
        max_branches = max(s.num_branches for s in states)
        rows = [(s, b) for b in range(max_branches) for s in states if b < s.num_branches]
        predictions = self._evaluate_rows(rows)
        if predictions is None:
            return None
        per_request: dict[str, list[Any]] = {s.request_id: [] for s in states}
        for (state, _), prediction in zip(rows, predictions, strict=True):
            per_request[state.request_id].append(self._slice(prediction))
        return [self._combine(state, per_request[state.request_id]) for state in states]

    def _evaluate_rows(self, rows: list[Row]) -> list[Any] | None:
        """Predictions for `rows`, in order, each with a leading batch dim of 1."""
        if self.cfg_world_size == 1:
            predictions = self.forward_rows(rows)
            return None if predictions is None else _split_rows(predictions, len(rows))
        return evaluate_rows_across_ranks(self, rows)

    def _slice(self, prediction: Any) -> Any:
        if self.output_slice is None:
            return prediction
        if isinstance(prediction, tuple):
            return tuple(p[:, : self.output_slice] for p in prediction)
        return prediction[:, : self.output_slice]

    def _combine(self, state: RequestState, branches: list[Any]) -> Any:
        if len(branches) == 1:
            return branches[0]
        if len(branches) == 2:
            return self.combine_cfg_noise(branches[0], branches[1], state.cfg_scale, state.cfg_normalize)
        return self.combine_multi_branch_cfg_noise(branches, state)

    # -- combination (override per model) ----------------------------------------------------
    def combine_cfg_noise(self, positive: Any, negative: Any, scale: float, normalize: bool) -> Any:
        """negative + scale * (positive - negative), optionally rescaled to the positive norm."""
        if isinstance(positive, tuple):
            return tuple(self.combine_cfg_noise(p, n, scale, normalize) for p, n in zip(positive, negative))
        combined = negative + scale * (positive - negative)
        if normalize:
            combined = self.cfg_normalize_function(positive, combined)
        return combined

    def cfg_normalize_function(self, positive: torch.Tensor, combined: torch.Tensor) -> torch.Tensor:
        """Rescale so every token keeps the positive branch's norm (over the last dim)."""
        positive_norm = torch.norm(positive, dim=-1, keepdim=True)
        combined_norm = torch.norm(combined, dim=-1, keepdim=True)
        return combined * (positive_norm / combined_norm)

    def combine_multi_branch_cfg_noise(self, branches: list[Any], state: RequestState) -> Any:
        """Models with three or more CFG branches define how they mix."""
        raise NotImplementedError(f"{type(self).__name__} does not define a {len(branches)}-branch CFG combination")


def _split_rows(predictions: Any, count: int) -> list[Any]:
    if isinstance(predictions, tuple):
        parts = [p.split(1) for p in predictions]
        return [tuple(part[i] for part in parts) for i in range(count)]
    return list(predictions.split(1))
