"""stepweave's engine: request lifecycle, step scheduling and the front doors."""

from engine.async_engine import AsyncEngine
from engine.client import AsyncEngineClient, EngineClient, ServerUnavailableError
from engine.config import ParallelConfig
from engine.omni import Omni
from engine.outputs import RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import OverloadedError
from runner.executor import EngineDeadError

__all__ = [
    "AsyncEngine",
    "AsyncEngineClient",
    "EngineClient",
    "EngineDeadError",
    "Omni",
    "OverloadedError",
    "ParallelConfig",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "ServerUnavailableError",
]
