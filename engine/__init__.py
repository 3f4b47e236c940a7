"""stepweave's engine: request lifecycle, step scheduling and the front doors."""

from engine.config import ParallelConfig
from engine.omni import Omni
from engine.outputs import RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["Omni", "ParallelConfig", "RequestMetrics", "RequestOutput", "SamplingParams"]
