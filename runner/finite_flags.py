"""Whether each noise prediction of a step was finite, learnt without stalling the device.

Reading a device tensor on the host (`.item()`, `.tolist()`) makes the CPU wait for the GPU to
finish everything queued so far, once per step, which defeats sending the next step ahead. The
flags are instead computed on the device and copied into pinned host memory asynchronously,
and read one step later, when the copy has long completed: a request whose prediction is not
finite still fails alone, one step after the fact (its later steps are NaN anyway). On the CPU
the copy is an ordinary one and the read is a numpy lookup.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


class FiniteFlags:
    def __init__(self, predictions: Sequence[Any]):
        flags = torch.stack([_all_finite(p) for p in predictions])
        self._event = None
        if flags.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._values = host.numpy()  # a view of host memory: no device round trip
        else:
            self._values = np.empty(flags.shape, dtype=bool)
            torch.from_numpy(self._values).copy_(flags)

    def finite(self, index: int) -> bool:
        """Row `index`'s flag; waits only for this group's copy, which has long finished."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return bool(self._values[index])


def _all_finite(prediction: Any) -> torch.Tensor:
    if isinstance(prediction, tuple):
        return torch.stack([torch.isfinite(p).all() for p in prediction]).all()
    return torch.isfinite(prediction).all()
