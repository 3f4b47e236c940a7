"""Joining the denoiser forwards of many requests into one call, and splitting the result back.

Each request's thread hands the runner its forward as it would have run it (`ForwardCall`: the
module, positional and keyword arguments, how many rows it carries). Calls join when every
argument either carries the call's rows — a tensor whose leading dimension is the call's row
count (concatenated along dim 0), a per-sample list of that length (joined) — or is equal in
every call (passed once). Text of different lengths joins where a pipeline declares how to pad
it with a mask (`TEXT_PADDING`); everything else that differs keeps calls in separate groups.
The output is split along dim 0 in the same order, element by element for tuples, lists and
diffusers output objects. No rule is specific to a model, so outputs equal the calls run alone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

# Pipeline class -> (text tensor kwarg, its mask kwarg) pairs whose sequence dim (1) may differ
# between calls: shorter rows are right-padded with zeros and masked out, which the model's
# attention ignores. A mask of None means every position is valid.
TEXT_PADDING: dict[str, list[tuple[str, str]]] = {
    "QwenImagePipeline": [("encoder_hidden_states", "encoder_hidden_states_mask")],
}


@dataclass(eq=False)
class ForwardCall:
    """One proxied forward, waiting in its request's thread for `done`."""

    module: Any  # the module, or a bound method such as a VAE's decode
    args: tuple
    kwargs: dict
    padding: list[tuple[str, str]] = field(default_factory=list)
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        first = self.args[0] if self.args else next(iter(self.kwargs.values()), None)
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            return first.shape[0]
        if isinstance(first, (list, tuple)):
            return len(first)
        return 1

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


def group_calls(calls: list[ForwardCall]) -> list[list[ForwardCall]]:
    """Calls that can run as one forward, in first-come order within and across groups."""
    groups: list[list[ForwardCall]] = []
    for call in calls:
        for group in groups:
            if _joinable(group[0], call):
                group.append(call)
                break
        else:
            groups.append([call])
    return groups


def run_group(group: list[ForwardCall]) -> None:
    """Run one joined forward and hand each call its share; if it raises, run the calls one by
    one so an error reaches only the request whose inputs caused it."""
    if len(group) == 1:
        _run_alone(group[0])
        return
    try:
        args, kwargs = _join(group)
        output = group[0].module(*args, **kwargs)
        parts = _split(output, [call.rows for call in group])
    except Exception:
        for call in group:
            _run_alone(call)
        return
    for call, part in zip(group, parts, strict=True):
        call.finish(part)


def _run_alone(call: ForwardCall) -> None:
    try:
        call.finish(call.module(*call.args, **call.kwargs))
    except Exception as exc:
        call.finish(error=exc)


# -- joining ---------------------------------------------------------------------------------
def _joinable(a: ForwardCall, b: ForwardCall) -> bool:
    # The same module, or the same bound method of one (a fresh object on every attribute read).
    if a.module != b.module or len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
        return False
    padded = _padded_pairs(a)
    for text, _ in padded:
        x, y = a.kwargs[text], b.kwargs[text]
        if not (_text_rows(x, a.rows) and _text_rows(y, b.rows)):
            return False
        if x.shape[2:] != y.shape[2:] or x.dtype != y.dtype or x.device != y.device:
            return False
    skip = {name for pair in padded for name in pair}
    slots = [[a.args[i], b.args[i]] for i in range(len(a.args))]
    slots += [[a.kwargs[k], b.kwargs[k]] for k in a.kwargs if k not in skip]
    return all(_slot_kind(values, [a.rows, b.rows]) is not None for values in slots)


def _padded_pairs(call: ForwardCall) -> list[tuple[str, str]]:
    return [(text, mask) for text, mask in call.padding if text in call.kwargs and mask in call.kwargs]


def _text_rows(value: Any, rows: int) -> bool:
    return _is_tensor(value) and value.dim() >= 2 and value.shape[0] == rows


def _slot_kind(values: list[Any], rows: list[int]) -> str | None:
    """How one argument joins across calls: "cat", "join", "same", or None (it cannot)."""
    first = values[0]
    if all(_is_tensor(v) and v.dim() > 0 and v.shape[0] == n for v, n in zip(values, rows)):
        if all(v.shape[1:] == first.shape[1:] and v.dtype == first.dtype and v.device == first.device for v in values):
            return "cat"
        return None
    if all(isinstance(v, (list, tuple)) and len(v) == n for v, n in zip(values, rows)):
        return "join"
    return "same" if all(_equal(first, v) for v in values[1:]) else None


def _join(group: list[ForwardCall]) -> tuple[tuple, dict]:
    rows = [call.rows for call in group]
    args = tuple(_merge([call.args[i] for call in group], rows) for i in range(len(group[0].args)))
    skip = {name for pair in _padded_pairs(group[0]) for name in pair}
    kwargs = {key: _merge([call.kwargs[key] for call in group], rows) for key in group[0].kwargs if key not in skip}
    for text, mask in _padded_pairs(group[0]):
        kwargs[text], kwargs[mask] = _pad_text([c.kwargs[text] for c in group], [c.kwargs[mask] for c in group])
    return args, kwargs


def _merge(values: list[Any], rows: list[int]) -> Any:
    kind = _slot_kind(values, rows)
    if kind == "cat":
        return torch.cat(values)
    if kind == "join":
        joined = [item for value in values for item in value]
        return type(values[0])(joined) if isinstance(values[0], tuple) else joined
    return values[0]  # "same"


def _pad_text(texts: list[torch.Tensor], masks: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    longest = max(t.shape[1] for t in texts)
    if all(t.shape[1] == longest for t in texts) and all(m is None for m in masks):
        return torch.cat(texts), None
    padded, full_masks = [], []
    for text, mask in zip(texts, masks, strict=True):
        rows, length = text.shape[0], text.shape[1]
        grown = text.new_zeros((rows, longest, *text.shape[2:]))
        grown[:, :length] = text
        padded.append(grown)
        valid = torch.zeros((rows, longest), dtype=torch.long, device=text.device)
        valid[:, :length] = 1 if mask is None else mask.to(torch.long)
        full_masks.append(valid)
    return torch.cat(padded), torch.cat(full_masks)


# -- splitting -------------------------------------------------------------------------------
def _split(output: Any, rows: list[int]) -> list[Any]:
    total = sum(rows)
    if _is_tensor(output) and output.dim() > 0 and output.shape[0] == total:
        return list(output.split(rows))
    if isinstance(output, (list, tuple)) and not hasattr(output, "keys"):
        if isinstance(output, list) and len(output) == total and all(_is_tensor(o) for o in output):
            starts = [sum(rows[:i]) for i in range(len(rows))]
            return [output[s : s + n] for s, n in zip(starts, rows)]  # per-sample outputs
        columns = [_split(item, rows) for item in output]
        return [type(output)(column[i] for column in columns) for i in range(len(rows))]
    if hasattr(output, "keys") and hasattr(output, "__getitem__"):  # diffusers BaseOutput, dicts
        columns = {key: _split(output[key], rows) for key in output.keys()}
        return [type(output)(**{key: parts[i] for key, parts in columns.items()}) for i in range(len(rows))]
    return [output] * len(rows)  # None, scalars: shared


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _equal(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if _is_tensor(a) or _is_tensor(b):
        return (
            _is_tensor(a)
            and _is_tensor(b)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return False
