"""Runs the workers as separate processes and talks to them over ZeroMQ.

Every worker gets every step batch on its own PUSH/PULL pair (encoded once, sent zero-copy);
results come back on one PULL socket. Liveness is watched while waiting: a worker that exits for
any reason (crash, kill -9, OOM) turns the executor dead within a poll interval, and every later
call raises `EngineDeadError` with the reason. Shutdown is idempotent and also runs at
interpreter exit and when the executor is garbage-collected, so no worker outlives the engine.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections import deque

import msgspec
import torch
import zmq

from engine.contract.config import EngineConfig
from engine.contract.errors import EngineDeadError
from engine.contract.messages import (
    FromWorker,
    Shutdown,
    StateQuery,
    StateReply,
    StepBatch,
    StepResults,
    WorkerFailed,
    WorkerReady,
)
from engine.contract.wire import Decoder, Encoder, WireError
from runner.executor import Executor
from runner.worker import WorkerConfig

POLL_S = 0.2
# The engine's socket directory: stepweave-<engine pid>-<random>, owner-only (mkdtemp).
DIR_PREFIX = "stepweave-"
_STALE_DIR = re.compile(r"^stepweave-(\d+)-\w+$")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MultiprocExecutor(Executor):
    def __init__(
        self,
        config: EngineConfig,
        family: str,
        startup_timeout_s: float = 300.0,
        threads_per_worker: int | None = None,
    ):
        self.world_size = config.parallel_config.world_size
        self._dead: str | None = None
        self._outstanding: deque[int] = deque()
        self.worker_info: dict[int, dict] = {}
        _reclaim_stale_dirs()
        self._dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
        self._context = zmq.Context()
        self._results = self._context.socket(zmq.PULL)
        result_address = f"ipc://{self._dir}/results"
        self._results.bind(result_address)
        # Workers split the engine process's intra-op thread budget.
        threads = threads_per_worker or max(1, torch.get_num_threads() // self.world_size)
        dist_address = f"127.0.0.1:{_free_port()}"
        self._batch_sockets, self.processes = [], []
        for rank in range(self.world_size):
            address = f"ipc://{self._dir}/batches-{rank}"
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(address)
            self._batch_sockets.append(sock)
            worker = WorkerConfig(
                engine=config,
                family=family,
                rank=rank,
                batch_address=address,
                result_address=result_address,
                dist_address=dist_address,
                num_threads=threads,
            )
            self.processes.append(WorkerProcess(worker))
        self._encoder = Encoder()
        self._decoder = Decoder(FromWorker, max_frames=1 << 20)  # trusted peers: one frame per finished image
        self._finalizer = weakref.finalize(
            self, _shutdown, self._context, self._batch_sockets, self.processes, self._dir
        )
        try:
            self._wait_ready(startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    # -- lifecycle ---------------------------------------------------------------------------
    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.worker_info) < self.world_size:
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers did not become ready within {timeout_s:.0f} s")
            message = self._receive(POLL_S)
            if isinstance(message, WorkerReady):
                self.worker_info[message.rank] = message.info
            elif isinstance(message, WorkerFailed):
                raise RuntimeError(f"worker {message.rank} failed to start:\n{message.error}")

    def shutdown(self) -> None:
        self._finalizer()

    @property
    def is_alive(self) -> bool:
        return self._dead is None

    def check_health(self) -> None:
        self._check_alive()
        self._check_workers()

    # -- steps -------------------------------------------------------------------------------
    def submit(self, batch: StepBatch) -> None:
        self._check_alive()
        frames = self._encoder.encode(batch)
        for sock in self._batch_sockets:
            self._send(sock, frames)
        self._outstanding.append(batch.step_id)

    def _send(self, sock: zmq.Socket, frames: list) -> None:
        """A PUSH send blocks while its worker is not connected: never wait on a dead one."""
        while True:
            try:
                sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                self._check_workers()
                time.sleep(0.005)

    def collect(self, timeout: float | None = None) -> StepResults:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            message = self._receive(POLL_S)
            if isinstance(message, StepResults):
                if self._outstanding and self._outstanding[0] == message.step_id:
                    self._outstanding.popleft()
                return message
            if isinstance(message, WorkerFailed):
                # A peer that died is the cause (its stage's send or collective failed here), so
                # name it rather than the rank that reported the broken connection first.
                self._check_workers()
                self._mark_dead(f"worker {message.rank} failed:\n{message.error}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("no step results within the timeout")

    def state_ids(self) -> list[str]:
        """Union over ranks of the request ids that still hold state."""
        self._check_alive()
        if self._outstanding:
            raise RuntimeError("state_ids() needs an idle executor (batches are in flight)")
        frames = self._encoder.encode(StateQuery())
        for sock in self._batch_sockets:
            self._send(sock, frames)
        ids, replies = set(), 0
        while replies < self.world_size:
            message = self._receive(POLL_S)
            if isinstance(message, StateReply):
                ids.update(message.request_ids)
                replies += 1
        return sorted(ids)

    # -- internals ---------------------------------------------------------------------------
    def _receive(self, poll_s: float):
        """One message from any worker, or None after `poll_s`; raises once a worker is gone."""
        self._check_alive()
        if self._results.poll(int(poll_s * 1000)):
            frames = self._results.recv_multipart(copy=False)
            try:
                return self._decoder.decode(frames)
            except WireError as exc:
                self._mark_dead(f"undecodable message from a worker: {exc}")
        self._check_workers()
        return None

    def _check_workers(self) -> None:
        """Raise EngineDeadError (and shut the rest down) once any worker has exited."""
        for rank, process in enumerate(self.processes):
            if process.exitcode is not None:
                self._mark_dead(f"worker {rank} (pid {process.pid}) died with exit code {process.exitcode}")

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine is dead: {self._dead}; restart it to serve new requests", self._dead)

    def _mark_dead(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
            self.shutdown()
        self._check_alive()


class WorkerProcess:
    """A worker started as `python -m runner.worker CONFIG`.

    A fresh interpreter, not multiprocessing's spawn: spawn re-imports the caller's __main__ in
    the child, so a user script without an `if __name__ == "__main__"` guard would start engines
    recursively. Its own session keeps the terminal's Ctrl-C away from it (the engine shuts it
    down), and the worker dies with its parent (PR_SET_PDEATHSIG).
    """

    def __init__(self, config: WorkerConfig):
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._popen = subprocess.Popen(
            [sys.executable, "-m", "runner.worker", msgspec.json.encode(config).decode()],
            env=env,
            start_new_session=True,
        )
        self.pid = self._popen.pid

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        self._popen.terminate()

    def kill(self) -> None:
        self._popen.kill()


def _reclaim_stale_dirs() -> None:
    """Remove socket directories left by engines that were killed (SIGKILL runs no cleanup):
    ours (same owner) whose engine process no longer exists."""
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        match = _STALE_DIR.match(name)
        if match is None:
            continue
        path = os.path.join(root, name)
        try:
            if os.stat(path).st_uid != os.getuid() or _process_exists(int(match.group(1))):
                continue
            entries = os.listdir(path)
            if not all(e == "results" or e.startswith("batches-") for e in entries):
                continue  # not one of ours after all
            for entry in entries:
                os.unlink(os.path.join(path, entry))
            os.rmdir(path)
        except OSError:
            continue


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shutdown(context, batch_sockets, processes, directory) -> None:
    """Stop every worker: ask politely, then terminate, then kill."""
    frames = Encoder().encode(Shutdown())
    for sock, process in zip(batch_sockets, processes):
        if process.is_alive():
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
    deadline = time.monotonic() + 5
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.terminate()
            process.join(2)
        if process.is_alive():
            process.kill()
            process.join(2)
    context.destroy(linger=0)
    try:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)
    except OSError:
        pass
