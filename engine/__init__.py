"""stepweave's engine: the front doors, the engine core and the contract they share.

The names below are loaded on first use, so `from engine import EngineClient, SamplingParams`
(a client of a remote server) imports neither torch nor diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AsyncEngine": "engine.async_engine",
    "AsyncEngineClient": "engine.service.client",
    "EngineClient": "engine.service.client",
    "EngineConfig": "engine.contract.config",
    "EngineDeadError": "engine.contract.errors",
    "DeadlineUnmeetableError": "engine.contract.errors",
    "Omni": "engine.omni",
    "OverloadedError": "engine.contract.errors",
    "ParallelConfig": "engine.contract.config",
    "RequestMetrics": "engine.contract.outputs",
    "RequestOutput": "engine.contract.outputs",
    "SamplingParams": "engine.contract.sampling_params",
    "ServerUnavailableError": "engine.contract.errors",
}

__all__ = [
    "AsyncEngine",
    "AsyncEngineClient",
    "DeadlineUnmeetableError",
    "EngineClient",
    "EngineConfig",
    "EngineDeadError",
    "Omni",
    "OverloadedError",
    "ParallelConfig",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "ServerUnavailableError",
]

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine
    from engine.contract.config import EngineConfig, ParallelConfig
    from engine.contract.errors import DeadlineUnmeetableError, EngineDeadError, OverloadedError, ServerUnavailableError
    from engine.contract.outputs import RequestMetrics, RequestOutput
    from engine.contract.sampling_params import SamplingParams
    from engine.omni import Omni
    from engine.service.client import AsyncEngineClient, EngineClient


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
