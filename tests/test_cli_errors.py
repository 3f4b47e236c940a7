"""Each common CLI mistake: one line on stderr naming the flag or field, the documented exit
code, no traceback, and nothing started (no worker, no model load beyond its configs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from engine.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, main

MISTAKES = [
    # (arguments, exit code, what the line must name)
    (["generate", "--steps", "-5"], EXIT_USAGE, "SamplingParams.num_inference_steps must be an integer in [1, 1000]"),
    (["generate", "--steps", "x"], EXIT_USAGE, "argument --steps: invalid int value: 'x'"),
    (["generate", "--height", "10"], EXIT_USAGE, "SamplingParams.height must be an integer in [16, 4096]"),
    (["generate", "--cfg-scale", "500"], EXIT_USAGE, "SamplingParams.true_cfg_scale must be a number in [0.0, 100.0]"),
    (["generate", "--num-images", "0"], EXIT_USAGE, "SamplingParams.num_images_per_prompt must be an integer"),
    (["generate", "--scheduler", "NoSuchScheduler"], EXIT_USAGE, "NoSuchScheduler"),
    (["generate", "--output", "/nonexistent/dir/x.png"], EXIT_USAGE, "--output '/nonexistent/dir/x.png': folder"),
    (["generate", "--output", "noext"], EXIT_USAGE, "--output 'noext': the file extension (none) must be"),
    (["generate", "--output", "x.notanimage"], EXIT_USAGE, "the file extension ('.notanimage') must be"),
    (["generate", "--model", "no-such-model"], EXIT_USAGE, "model must be a preset name"),
    (["generate", "--executor", "gpu"], EXIT_USAGE, "argument --executor: invalid choice: 'gpu'"),
    (["generate", "--max-num-seqs", "0"], EXIT_USAGE, "EngineConfig.max_num_seqs must be an integer in [1, 4096]"),
    (["generate", "--class-label", "3"], EXIT_USAGE, "class_label is not an input of qwen-image models"),
    (["generate", "--image", "/nonexistent/in.png"], EXIT_USAGE, "--image '/nonexistent/in.png': no such file"),
    (["generate", "--image", __file__], EXIT_USAGE, "not an image file PIL can read"),
    (["generate", "--strength", "1.5"], EXIT_USAGE, "SamplingParams.strength must be a number in (0, 1]"),
    (["generate", "--pipeline-arg", "oops"], EXIT_USAGE, "--pipeline-arg 'oops': expected NAME=VALUE"),
    (["generate", "--deadline-s", "0"], EXIT_USAGE, "SamplingParams.deadline_s must be seconds in (0, 604800]"),
    (["generate", "--scheduling-policy", "edf"], EXIT_USAGE, "argument --scheduling-policy: invalid choice: 'edf'"),
    (["generate", "--priority-aging-s", "-1"], EXIT_USAGE, "EngineConfig.priority_aging_s must be seconds"),
    (
        ["export-preset", "no-such-preset", "/tmp/x"],
        EXIT_USAGE,
        "unknown preset 'no-such-preset'; presets: digits-qwen-image, tiny-qwen-image",
    ),
    (["export-preset", "tiny-dit", "/proc/forbidden"], EXIT_USAGE, "cannot write /proc/forbidden"),
    (["serve", "--address", "tcp://0.0.0.0:5555"], EXIT_USAGE, "--auth-token"),
    (["serve", "--http", "localhost"], EXIT_USAGE, "--http must be HOST:PORT with a port in [0, 65535]"),
    (["serve", "--http", "0.0.0.0:8000"], EXIT_USAGE, "binding a non-loopback address requires --api-key"),
    (
        ["gateway", "--engine", "ipc:///tmp/sw-nobody/a.sock"],
        EXIT_USAGE,
        "the following arguments are required: --http",
    ),
    (
        ["gateway", "--http", "127.0.0.1:0", "--engine", "ipc:///tmp/a", "--server-key", "k1", "--server-key", "k2"],
        EXIT_USAGE,
        "--server-key: give one for all engines or one per --engine (1), got 2",
    ),
    (["status", "--address", "ipc:///tmp/sw-nobody/x.sock", "--timeout", "0.5"], EXIT_FAILED, "no stepweave server"),
    (["bench", "--bogus"], EXIT_USAGE, "stepweave bench: error: unrecognized arguments: --bogus"),
    (["frobnicate"], EXIT_USAGE, "argument COMMAND: invalid choice: 'frobnicate'"),
]
if not torch.cuda.is_available():
    MISTAKES.append((["generate", "--device", "cuda"], EXIT_USAGE, "EngineConfig.device='cuda' asks for CUDA"))


def run_cli(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as exit:  # argparse's own errors
        return exit.code


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if an engine gets as far as starting its executor."""

    def refuse(*args, **kwargs):
        raise AssertionError("a worker was started for a command that should have been refused")

    monkeypatch.setattr("engine.core.engine_core.make_executor", refuse)
    monkeypatch.delenv("STEPWEAVE_AUTH_TOKEN", raising=False)


@pytest.mark.parametrize("args,code,needle", MISTAKES, ids=[" ".join(m[0]) for m in MISTAKES])
def test_mistake_is_one_line(args, code, needle, capsys, no_workers):
    assert run_cli(args) == code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert needle in lines[0] and "Traceback" not in captured.err and "ValueError:" not in lines[0]
    assert captured.out == ""


def test_sigint_exits_130_without_traceback_and_leaves_no_process(tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group, workers included."""
    command = [sys.executable, "-m", "engine.cli", "generate", "--steps", "1000", "--height", "512", "--width", "512"]
    command += ["--output", str(tmp_path / "x.png")]
    proc = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=tmp_path,
        # as in a terminal: a job started in the background by a non-interactive shell (a CI
        # script's `&`) inherits SIGINT ignored, and Python then leaves it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    cli = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    while not cli.children(recursive=True):  # the worker process is up
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(3)  # let it load the model and start stepping
    started = cli.children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    gone, alive = psutil.wait_procs(started, timeout=30)
    assert alive == [], alive
    assert not (tmp_path / "x.png").exists()
