"""A worker process: loads the model, then runs every step batch the engine sends.

All ranks receive the same batches (SPMD) and keep their own request state; tensors between
ranks go through torch.distributed. Only the reporting rank sends results back. The worker
ignores Ctrl-C (the engine owns shutdown) and dies with its parent, so no process outlives the
engine.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
import traceback
from dataclasses import dataclass

import zmq

from engine.protocol import Shutdown, StateQuery, StateReply, StepBatch, ToWorker, WorkerFailed, WorkerReady
from engine.wire import Decoder, Encoder, WireError


@dataclass
class WorkerConfig:
    model: str
    rank: int
    world_size: int
    cfg_parallel_size: int
    pipeline_parallel_size: int
    pp_layer_partition: list[int] | None
    batch_address: str  # this worker's PULL socket for step batches
    result_address: str  # the engine's PULL socket for results
    dist_address: str  # host:port for torch.distributed rendezvous
    device: str | None
    num_threads: int

    @property
    def reports_results(self) -> bool:
        from runner.parallel_groups import GridPosition

        return GridPosition.of(self.rank, self.cfg_parallel_size, self.pipeline_parallel_size).reports_results


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def worker_main(config: WorkerConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    parent = os.getppid()
    import torch

    torch.set_num_threads(config.num_threads)
    context = zmq.Context()
    batches = context.socket(zmq.PULL)
    batches.connect(config.batch_address)
    results = context.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 1000)
    results.connect(config.result_address)
    encoder, decoder = Encoder(), Decoder(ToWorker)
    try:
        runner = _build_runner(config)
    except BaseException:
        results.send_multipart(encoder.encode(WorkerFailed(rank=config.rank, error=traceback.format_exc(limit=8))))
        results.close()
        context.term()
        return
    info = {"pid": os.getpid(), "transformer_parameters": runner.pipeline.parameter_count()}
    results.send_multipart(encoder.encode(WorkerReady(rank=config.rank, info=info)))

    idle_since: float | None = None  # waiting before the first batch is not overhead
    try:
        while True:
            if not batches.poll(1000):
                if os.getppid() != parent:
                    break
                continue
            frames = batches.recv_multipart(copy=False)
            try:
                message = decoder.decode(frames)
            except WireError:
                continue  # only the engine talks to this socket; a bad frame is dropped
            if isinstance(message, Shutdown):
                break
            if isinstance(message, StateQuery):
                reply = StateReply(rank=config.rank, request_ids=list(runner.states))
                results.send_multipart(encoder.encode(reply))
                continue
            assert isinstance(message, StepBatch)
            idle = 0.0 if idle_since is None else time.perf_counter() - idle_since
            step_results = runner.execute(message)
            idle_since = time.perf_counter()
            if config.reports_results:
                step_results.idle_s = idle
                results.send_multipart(encoder.encode(step_results), copy=False)
    except BaseException:
        results.send_multipart(encoder.encode(WorkerFailed(rank=config.rank, error=traceback.format_exc(limit=8))))
        raise
    finally:
        batches.close(linger=0)
        results.close()
        context.term()


def _build_runner(config: WorkerConfig):
    from pipelines.loading import load_step_pipeline
    from runner.model_runner import ModelRunner

    pipeline = load_step_pipeline(config.model, device=config.device)
    if config.world_size > 1:
        from runner.parallel_groups import setup_parallel

        setup_parallel(pipeline, config)
    return ModelRunner(pipeline)


if __name__ == "__main__":
    import sys

    import msgspec

    worker_main(msgspec.json.decode(sys.argv[1], type=WorkerConfig))
