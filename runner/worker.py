"""A worker process: loads the model, then runs every step batch the engine sends.

All ranks receive the same batches (SPMD) and keep their own request state; tensors between
ranks go through torch.distributed. Only the reporting rank sends results back. The worker
ignores Ctrl-C (the engine owns shutdown) and dies with its parent, so no process outlives the
engine.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
import traceback

import msgspec
import zmq

from engine.contract.config import EngineConfig
from engine.contract.messages import Shutdown, StateQuery, StateReply, StepBatch, ToWorker, WorkerFailed, WorkerReady
from engine.contract.wire import Decoder, Encoder, WireError


class WorkerConfig(msgspec.Struct, kw_only=True):
    """One rank of the worker grid: the engine's config plus where this rank sits and talks."""

    engine: EngineConfig  # model resolved to a directory by the engine
    family: str  # "module:Class" of the step pipeline the engine chose for the model
    rank: int
    batch_address: str  # this worker's PULL socket for step batches
    result_address: str  # the engine's PULL socket for results
    dist_address: str  # host:port for torch.distributed rendezvous
    num_threads: int


def _die_with_parent(parent: int) -> None:
    """Exit as soon as the engine process is gone, however it went (kill -9 included).

    Watches the parent *process* (a pidfd that becomes readable when it exits; polling its pid
    where pidfds are missing), not the parent-death signal: that one fires when the *thread*
    that started the worker exits, which killed the workers of an engine built in a thread."""

    def watch() -> None:
        try:
            fd = os.pidfd_open(parent)
        except (AttributeError, OSError):
            while os.getppid() == parent:
                time.sleep(0.5)
        else:
            select.select([fd], [], [])
        os._exit(0)

    threading.Thread(target=watch, name="stepweave-parent-watch", daemon=True).start()


def worker_main(config: WorkerConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    _die_with_parent(parent)
    import torch

    torch.set_num_threads(config.num_threads)
    context = zmq.Context()
    batches = context.socket(zmq.PULL)
    batches.connect(config.batch_address)
    results = context.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 1000)
    results.connect(config.result_address)
    encoder, decoder = Encoder(), Decoder(ToWorker, max_frames=1 << 20)  # the engine: one frame per input image
    try:
        runner, reports_results = _build_runner(config)
    except BaseException:
        results.send_multipart(encoder.encode(WorkerFailed(rank=config.rank, error=traceback.format_exc(limit=8))))
        results.close()
        context.term()
        return
    from runner.devices import free_memory_bytes, rank_device

    info = {
        "pid": os.getpid(),
        "transformer_parameters": runner.pipeline.parameter_count(),
        "free_memory_bytes": free_memory_bytes(rank_device(config.engine.device, config.rank)),
    }
    results.send_multipart(encoder.encode(WorkerReady(rank=config.rank, info=info)))

    # When the previous batch ended with requests still running here; None when nothing was
    # running (before the first batch, or after every request finished): waiting for new
    # requests is not overhead, so only gaps between consecutive batches of running ones count.
    idle_since: float | None = None
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
            idle = None if idle_since is None else time.perf_counter() - idle_since
            step_results = runner.execute(message)
            idle_since = time.perf_counter() if runner.states else None
            if reports_results:
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
    """The model runner for this rank, and whether this rank reports results."""
    from runner.model_runner import build_model_runner

    runner = build_model_runner(config.engine, config.family, config.rank, config.dist_address)
    return runner, runner.pipeline.reports_results


if __name__ == "__main__":
    import sys

    worker_main(msgspec.json.decode(sys.argv[1], type=WorkerConfig))
