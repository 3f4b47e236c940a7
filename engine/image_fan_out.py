"""Several images per prompt: one request per image, joined back into one output.

`num_images_per_prompt=N` runs as N ordinary requests seeded seed, seed + 1, ..., so image i is
exactly what a single request with seed + i gives (each image stays reproducible alone), and the
N requests share step batches like any others. The front doors split a request here before
submitting it and join the N final outputs into one, images in seed order.
"""

from __future__ import annotations

import dataclasses
import random

import msgspec
import numpy as np

from engine.contract.outputs import RequestMetrics, RequestOutput
from engine.contract.sampling_params import MAX_SEED, SamplingParams


def split_images(params: SamplingParams) -> list[SamplingParams]:
    """One SamplingParams per image (num_images_per_prompt=1 each, seeds counting up from the
    request's seed, or from a random one drawn here when it has none)."""
    count = params.num_images_per_prompt
    if count == 1:
        return [params]
    seed = params.seed if params.seed is not None else random.randint(0, MAX_SEED - count + 1)
    return [msgspec.structs.replace(params, seed=seed + i, num_images_per_prompt=1) for i in range(count)]


def sub_request_id(request_id: str, index: int) -> str:
    return f"{request_id}/image{index}"


def progress_of(request_id: str, parts: list[RequestOutput | None], num_steps: int) -> RequestOutput:
    """One progress update for the whole prompt: the step every image has reached."""
    step = min((p.step if p is not None else 0) for p in parts)
    seed = parts[0].seed if parts[0] is not None else None
    return RequestOutput(request_id, step, num_steps, seed=seed)


def join_outputs(request_id: str, parts: list[RequestOutput], output_type: str) -> RequestOutput:
    """The final output of a prompt from its images' final outputs: the first error if any
    image failed, else every image in seed order; the seed reported is the first image's."""
    if len(parts) == 1:
        return dataclasses.replace(parts[0], request_id=request_id)
    failed = next((p for p in parts if p.error is not None), None)
    first = parts[0]
    arrival = min(p.metrics.arrival_time for p in parts if p.metrics is not None) if first.metrics else 0.0
    latencies = [p.metrics.latency_s for p in parts if p.metrics is not None and p.metrics.latency_s is not None]
    queues = [p.metrics.queue_time_s for p in parts if p.metrics is not None and p.metrics.queue_time_s is not None]
    metrics = RequestMetrics(
        arrival, min(queues) if queues else None, max(latencies) if latencies else None, first.num_steps
    )
    if failed is not None:
        return RequestOutput(
            request_id,
            failed.step,
            failed.num_steps,
            finished=True,
            error=failed.error,
            seed=first.seed,
            metrics=metrics,
        )
    if output_type == "np":
        images = np.concatenate([p.images for p in parts], axis=0)
    else:
        images = [image for p in parts for image in p.images]
    return RequestOutput(
        request_id, first.step, first.num_steps, finished=True, images=images, seed=first.seed, metrics=metrics
    )
