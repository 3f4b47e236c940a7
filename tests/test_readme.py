"""Every code block of README.md runs as written, in a fresh folder, the way a new user runs it.

bash blocks run in bash, python blocks as scripts. A block that starts `stepweave serve` starts
a server the later blocks talk to (each stopped at the end); the install prefix of the first
commands is what CI (.ci/run) has just done, so it is checked against .ci/run and left out; the
test command is checked against .ci/run's and not run (it would run this test again).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INSTALL = re.compile(r'^pip install (torch==\S+) && pip install -e (\.|"\.\[([\w,]+)\]") && ')

pytestmark = pytest.mark.slow


def readme_blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall((ROOT / "README.md").read_text())]


def ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def without_install(command: str) -> str:
    """The command after README's install prefix, once the prefix is checked to install what
    .ci/run installs (the same torch pin, extras CI includes)."""
    match = INSTALL.match(command)
    if match is None:
        return command
    ci = ci_commands()
    assert f"python -m pip install --quiet {match.group(1)}" in ci, (match.group(1), ci)
    ci_extras = re.search(r'install --quiet -e "\.\[([\w,]+)\]"', " ".join(ci)).group(1).split(",")
    extras = (match.group(3) or "").split(",") if match.group(3) else []
    assert set(extras) <= set(ci_extras), (extras, ci_extras)
    return command[match.end() :]


class Server:
    """A README `stepweave serve` command, running in the background until the end."""

    def __init__(self, command: str, cwd: Path, env: dict, log_name: str):
        self.log = cwd / log_name
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", command], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 180
        while "server ready" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def test_readme_has_the_blocks_this_test_expects():
    langs = [lang for lang, _ in readme_blocks()]
    assert langs.count("python") >= 4 and langs.count("bash") >= 4
    assert set(langs) <= {"python", "bash", "text"}, "a block this test does not know how to run"


def test_every_readme_block_runs_as_written(_preset_cache):
    work = Path(tempfile.mkdtemp(prefix="sw-readme-", dir="/tmp"))  # short: the ipc socket lives here
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        XDG_RUNTIME_DIR=str(work),  # the default server address, private to this test
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    servers: list[Server] = []
    ran = []
    try:
        for lang, body in readme_blocks():
            if lang == "text":
                continue
            if lang == "python":
                script = work / f"block{len(ran)}.py"
                script.write_text(body)
                command = [sys.executable, str(script)]
            else:
                body = without_install(body.strip())
                if "pytest" in body:  # the test suite: CI runs it; here it would run this test again
                    assert body == ci_commands()[-1], (body, ci_commands()[-1])
                    continue
                if body.split()[:2] == ["stepweave", "serve"]:
                    servers.append(Server(body, work, env, f"server{len(servers) or ''}.log"))
                    ran.append(body)
                    continue
                command = ["bash", "-e", "-c", body]
            result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"README block failed:\n{body}\n--- stderr:\n{result.stderr[-3000:]}"
            assert "Traceback" not in result.stderr, result.stderr
            ran.append(body)
    finally:
        for server in servers:
            server.stop()
    assert servers and all(s.proc.returncode == 0 for s in servers), "a README serve block did not stop cleanly"
    assert any("stepweave generate" in body for body in ran)
    # what the blocks say they write is there
    written = (
        "seven.png",
        "fox.png",
        "fox-2.png",
        "fox-blue.png",
        "fox-night.png",
        "dit-0.png",
        "dit-1.png",
        "waves.mp4",
        "curl-fox.png",
        "openai-fox.png",
        "curl-edit.png",
    )
    for name in written:
        assert (work / name).is_file(), name
    assert "request " in (work / "server.log").read_text()  # one log line per finished request
