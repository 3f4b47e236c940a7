"""The cost of one transformer forward at a given batch size: the yardstick for speedup limits.

Parallel and batched serving can only beat sequential serving by as much as the hardware lets
a forward get cheaper per request; the benchmarks put that measured limit beside their results.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time

import torch


def _inputs(pipeline, rows: int, size: tuple[int, int] | None = None):
    from engine.contract.messages import NewRequest
    from engine.contract.sampling_params import SamplingParams

    request = NewRequest(
        request_id="probe",
        params=SamplingParams(num_inference_steps=4, height=size[0] if size else None, width=size[1] if size else None),
        prompt="a probe prompt for timing",
        negative_prompt="blurry",
    )
    state = pipeline.prepare_encode(request)
    return [(state, i % state.num_branches) for i in range(rows)]


def forward_seconds(
    model: str,
    rows: int,
    threads: int = 1,
    repeats: int = 5,
    device: str = "cpu",
    dtype: str | None = None,
    size: tuple[int, int] | None = None,
) -> float:
    """Median seconds of one transformer forward over `rows` rows (in this process)."""
    return forward_table(model, [rows], threads, repeats, device, dtype, size)[rows]


def forward_table(
    model: str,
    row_counts: list[int],
    threads: int = 1,
    repeats: int = 5,
    device: str = "cpu",
    dtype: str | None = None,
    size: tuple[int, int] | None = None,
) -> dict[int, float]:
    """Median seconds of one transformer forward for each row count, the model loaded once."""
    from pipelines.loading import load_step_pipeline

    torch.set_num_threads(threads)
    pipeline = load_step_pipeline(model, device=device, dtype=dtype)
    table = {}
    with torch.inference_mode():
        for rows in sorted(set(row_counts)):
            batch = _inputs(pipeline, rows, size)
            pipeline.forward_rows(batch)  # warm-up
            samples = []
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                pipeline.forward_rows(batch)
                _sync(device)
                samples.append(time.perf_counter() - t0)
            table[rows] = statistics.median(samples)
    return table


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _worker(model, rows, threads, repeats, barrier, queue):
    from pipelines.loading import load_step_pipeline

    torch.set_num_threads(threads)
    pipeline = load_step_pipeline(model, device="cpu")
    batch = _inputs(pipeline, rows)
    samples = []
    with torch.inference_mode():
        pipeline.forward_rows(batch)
        barrier.wait()
        for _ in range(repeats):
            t0 = time.perf_counter()
            pipeline.forward_rows(batch)
            samples.append(time.perf_counter() - t0)
    queue.put(statistics.median(samples))


def concurrent_forward_seconds(model: str, rows: int, processes: int, threads: int = 1, repeats: int = 5) -> float:
    """Median forward time over `rows` rows while `processes` processes run forwards at once."""
    spawn = multiprocessing.get_context("spawn")
    barrier, queue = spawn.Barrier(processes), spawn.Queue()
    procs = [
        spawn.Process(target=_worker, args=(model, rows, threads, repeats, barrier, queue)) for _ in range(processes)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return statistics.mean(results)


def _stage_worker(model, rows, stage, stages, threads, repeats, barrier, queue):
    from pipelines.loading import load_step_pipeline
    from pipelines.parallel.pipeline_parallel import split_evenly

    torch.set_num_threads(threads)
    pipeline = load_step_pipeline(model, device="cpu")
    batch = _inputs(pipeline, rows)
    blocks = list(pipeline.transformer_blocks())
    counts = split_evenly(len(blocks), stages)
    start = sum(counts[:stage])
    medians = []
    with torch.inference_mode():
        for kept in (blocks[start : start + counts[stage]], []):  # this stage's blocks, then none
            pipeline.pipe.transformer.transformer_blocks = torch.nn.ModuleList(kept)
            pipeline.forward_rows(batch)
            barrier.wait()  # every stage measures the same part at the same time
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                pipeline.forward_rows(batch)
                samples.append(time.perf_counter() - t0)
            medians.append(statistics.median(samples))
    queue.put((stage, medians[0] - medians[1]))


def concurrent_stage_block_seconds(
    model: str, rows: int, stages: int, threads: int = 1, repeats: int = 5
) -> list[float]:
    """Seconds each pipeline stage spends in its own transformer blocks over `rows` rows while
    every other stage runs its blocks at the same time: a forward with the stage's blocks minus
    the same forward with none, so embeddings and the output head (which the real stages split
    between them) count for no stage."""
    spawn = multiprocessing.get_context("spawn")
    barrier, queue = spawn.Barrier(stages), spawn.Queue()
    procs = [
        spawn.Process(target=_stage_worker, args=(model, rows, s, stages, threads, repeats, barrier, queue))
        for s in range(stages)
    ]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return [results[s] for s in range(stages)]
