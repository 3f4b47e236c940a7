"""Driving a real `stepweave serve` process from tests: the process itself, a hand-driven raw
peer for hostile input, and small helpers to wait on the server's state."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from engine import AsyncEngineClient, SamplingParams
from engine.contract.wire import Decoder, Encoder
from engine.service.protocol import PROTOCOL_VERSION, Error, Hello, ServerMessage, Welcome

TOKEN = "test-token-0123456789"
ROOT = Path(__file__).resolve().parent.parent
# ~14 s of steps on the tiny model (512x512 makes each step cost): always aborted before its end
LONG = SamplingParams(num_inference_steps=1000, seed=1, height=512, width=512)


class ServerProcess:
    """`python -m engine.cli serve`, on an ipc socket unless given an address (tcp port `*` is
    read back from the log once ready); its log goes to a file we can read."""

    def __init__(self, model, *args: str, executor: str = "inproc", address: str | None = None):
        self.dir = tempfile.mkdtemp(prefix="sw-", dir="/tmp")  # ipc paths must stay short
        self.address = address or f"ipc://{self.dir}/engine.sock"
        self.log_path = Path(self.dir) / "server.log"
        self._log_file = open(self.log_path, "wb")
        command = [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            "--model",
            str(model),
            "--executor",
            executor,
            "--address",
            self.address,
            *args,
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while "server ready" not in self.log():
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"server not ready after {timeout} s:\n{self.log()}"
            time.sleep(0.05)
        self.address = re.search(r"server ready: serving .* on (\S+) \(protocol", self.log()).group(1)
        http = re.search(r"HTTP API \(OpenAI Images\) on (\S+)", self.log())
        self.http_url = None if http is None else http.group(1)  # with --http HOST:0, the port it got
        return self

    def children(self) -> set[int]:
        tasks = Path(f"/proc/{self.proc.pid}/task")
        return {int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class RawPeer:
    """A hand-driven DEALER: sends whatever frames a test wants and reads raw replies."""

    def __init__(self, address: str):
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.encoder, self.decoder = Encoder(), Decoder(ServerMessage, max_frames=2)

    def send(self, message) -> None:
        self.sock.send_multipart(self.encoder.encode(message))

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 10.0):
        assert self.sock.poll(int(timeout * 1000)), "no reply from the server"
        return self.decoder.decode(self.sock.recv_multipart())

    def recv_until(self, kind, timeout: float = 10.0):
        """The next reply of type `kind`, skipping others (outputs of earlier requests, pongs)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(message, kind):
                return message

    def drain(self) -> None:
        while self.sock.poll(200):
            self.sock.recv_multipart()

    def hello(self, token: str | None = TOKEN) -> Welcome | Error:
        self.send(Hello(protocol_version=PROTOCOL_VERSION, auth_token=token))
        return self.recv_until((Welcome, Error))

    def close(self) -> None:
        self.sock.close()
        self.context.term()


async def wait_state(client: AsyncEngineClient, predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        state = await client.debug_state()
        if predicate(state) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.1)


def no_request_state(state) -> bool:
    return not state.all_worker_requests and not state.all_server_requests


async def collect(stream):
    return [o async for o in stream]


class GatewayProcess:
    """`python -m engine.cli gateway` on a free loopback port, over the given engine addresses."""

    def __init__(self, engines: list[str], *args: str):
        self.dir = tempfile.mkdtemp(prefix="sw-gw-", dir="/tmp")
        self.log_path = Path(self.dir) / "gateway.log"
        self._log_file = open(self.log_path, "wb")
        command = [sys.executable, "-m", "engine.cli", "gateway", "--http", "127.0.0.1:0", *args]
        for address in engines:
            command += ["--engine", address]
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> "GatewayProcess":
        deadline = time.monotonic() + timeout
        while "gateway ready" not in self.log():
            assert self.proc.poll() is None, f"gateway exited with {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"gateway not ready after {timeout} s:\n{self.log()}"
            time.sleep(0.05)
        self.url = re.search(r"gateway ready: (\S+) over", self.log()).group(1)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def metric_samples(text: str) -> dict[tuple, float]:
    """Prometheus text -> {(sample name, sorted labels): value}, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
