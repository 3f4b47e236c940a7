"""The layout holds: every module imports on its own, a remote client needs neither torch nor
diffusers, and the code is clean under the project's ruff rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "runner", "pipelines")


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_module_imports_on_its_own():
    """Each module is imported with none of the project's modules loaded before it (third-party
    ones stay cached, so this is fast), which is where an import-time cycle would break."""
    modules = _modules()
    assert len(modules) > 30 and "runner.executor" in modules
    code = f"""
import importlib, json, sys, traceback
failures = {{}}
for name in {modules!r}:
    for loaded in [m for m in sys.modules if m.split(".")[0] in {PACKAGES!r}]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=3)
print(json.dumps(failures))
"""
    assert json.loads(_python(code)) == {}


def test_remote_client_loads_neither_torch_nor_diffusers():
    code = """
import sys
from engine import AsyncEngineClient, EngineClient, SamplingParams
from engine.contract.request_fields import request_fields
import engine.gateway_cli, engine.http.app, engine.http.gateway  # the gateway is a remote client too
try:
    request_fields("a fox", SamplingParams(num_inference_steps=0))
except ValueError as exc:
    print(exc)
print(sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
"""
    error, heavy = _python(code).strip().splitlines()
    assert error == "SamplingParams.num_inference_steps must be an integer in [1, 1000], got 0"
    assert heavy == "[]"


def test_ruff_is_clean():
    """Lint (pyflakes, pycodestyle, import order) and formatting, as pyproject.toml sets them."""
    for command in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr
