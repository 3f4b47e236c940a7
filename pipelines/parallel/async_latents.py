"""AsyncLatents: latents that are still arriving from the last pipeline stage.

Stage 0 posts the `irecv` for a request's new latents as soon as it has sent that request's
hidden states on, and then moves on to other step batches. The wrapper waits on the receive only
when the latents are first used — any attribute access or any torch operation, through
`__torch_function__` — and from then on behaves as the tensor. That late wait is what lets stage
0 run batch B while the later stages still work on batch A.
"""

from __future__ import annotations

from typing import Any

import torch


class AsyncLatents:
    __slots__ = ("_buffer", "_work", "_ready")

    def __init__(self, buffer: torch.Tensor, work: Any):
        object.__setattr__(self, "_buffer", buffer)
        object.__setattr__(self, "_work", work)
        object.__setattr__(self, "_ready", False)

    @classmethod
    def receive(cls, shape: tuple, dtype: torch.dtype, device: torch.device, src: int, tag: int = 0) -> "AsyncLatents":
        import torch.distributed as dist

        buffer = torch.empty(shape, dtype=dtype, device=device)
        return cls(buffer, dist.irecv(buffer, src=src, tag=tag))

    @property
    def is_ready(self) -> bool:
        """True once the receive has been waited on (checking does not wait)."""
        return object.__getattribute__(self, "_ready")

    def wait(self) -> torch.Tensor:
        if not object.__getattribute__(self, "_ready"):
            object.__getattribute__(self, "_work").wait()
            object.__setattr__(self, "_ready", True)
        return object.__getattribute__(self, "_buffer")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wait(), name)

    def __repr__(self) -> str:
        state = "ready" if self.is_ready else "pending"
        return f"AsyncLatents({state})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*_resolve(args), **_resolve(kwargs or {}))

    def __len__(self) -> int:
        return len(self.wait())

    def __getitem__(self, index):
        return self.wait()[index]

    # Arithmetic operators route to the tensor as well.
    def __add__(self, other):
        return self.wait() + _resolve(other)

    def __radd__(self, other):
        return _resolve(other) + self.wait()

    def __sub__(self, other):
        return self.wait() - _resolve(other)

    def __rsub__(self, other):
        return _resolve(other) - self.wait()

    def __mul__(self, other):
        return self.wait() * _resolve(other)

    def __rmul__(self, other):
        return _resolve(other) * self.wait()

    def __truediv__(self, other):
        return self.wait() / _resolve(other)


def _resolve(value: Any) -> Any:
    if isinstance(value, AsyncLatents):
        return value.wait()
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    return value


def resolve(value: Any) -> Any:
    """The tensor behind `value` (waiting if it is AsyncLatents)."""
    return _resolve(value)
