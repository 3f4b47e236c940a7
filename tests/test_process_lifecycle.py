"""No worker process outlives its engine: forgotten shutdown, Ctrl-C, or a killed engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import sys
    from engine import Omni, SamplingParams
    omni = Omni(model=sys.argv[1], executor="mp")
    print(omni.core.executor.processes[0].pid, omni.core.executor._dir, flush=True)
    if sys.argv[2] == "forget":
        omni.generate(["a fox"], SamplingParams(num_inference_steps=2), use_tqdm=False)
        sys.exit(0)  # no shutdown(): the finalizer must stop the worker
    print("generating", flush=True)
    omni.generate(["a long request"], SamplingParams(num_inference_steps=1000), use_tqdm=False)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _start(qwen_dir, mode):
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(qwen_dir), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    worker_pid, socket_dir = proc.stdout.readline().split()
    return proc, int(worker_pid), socket_dir


@pytest.mark.parametrize("how", ["forget", "ctrl-c", "kill-engine"])
def test_worker_does_not_outlive_engine(qwen_dir, how):
    proc, worker_pid, socket_dir = _start(qwen_dir, "forget" if how == "forget" else "run")
    assert _alive(worker_pid)
    if how == "forget":
        assert proc.wait(60) == 0
    else:
        assert proc.stdout.readline().strip() == "generating"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
        proc.wait(60)
    assert _wait_gone(worker_pid), f"worker {worker_pid} survived ({how})"
    if how == "kill-engine":  # SIGKILL ran no cleanup: the next engine's start reclaims the directory
        from runner.mp_executor import _reclaim_stale_dirs

        assert os.path.isdir(socket_dir)
        _reclaim_stale_dirs()
    assert not os.path.exists(socket_dir), f"{socket_dir} left behind ({how})"


def test_engine_built_in_a_thread_that_has_exited_still_serves(qwen_dir):
    """Workers watch the engine process, not the thread that started them (the parent-death
    signal fires when that thread exits, which used to kill them and hang the next request)."""
    import threading

    from engine import Omni, SamplingParams

    built = {}
    thread = threading.Thread(target=lambda: built.setdefault("omni", Omni(model=str(qwen_dir), executor="mp")))
    thread.start()
    thread.join()
    omni = built["omni"]
    try:
        time.sleep(0.5)
        assert all(p.is_alive() for p in omni.core.executor.processes)
        (output,) = omni.generate(["a fox"], SamplingParams(num_inference_steps=2), use_tqdm=False)
        assert output.error is None and len(output.images) == 1
    finally:
        omni.shutdown()


def test_a_dead_worker_fails_the_next_request_instead_of_hanging(qwen_dir):
    from engine import EngineDeadError, Omni, SamplingParams

    omni = Omni(model=str(qwen_dir), executor="mp")
    try:
        os.kill(omni.core.executor.processes[0].pid, signal.SIGKILL)
        _wait_gone(omni.core.executor.processes[0].pid)
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="died"):
            omni.generate(["a fox"], SamplingParams(num_inference_steps=2), use_tqdm=False)
        assert time.monotonic() - started < 10
    finally:
        omni.shutdown()
