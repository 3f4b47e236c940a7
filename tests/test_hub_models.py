"""A Hugging Face repo id as the model: resolved through huggingface_hub's cache (offline here,
so the cache is built by the test in the hub's layout: models--ORG--NAME/{refs,snapshots})."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from engine import Omni, SamplingParams
from engine.cli import main
from pipelines.model_info import ModelInfo


@pytest.fixture
def hub_cache(qwen_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-qwen-image"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(qwen_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / commit


def test_repo_id_resolves_from_the_cache_and_generates_the_same_image(hub_cache, qwen_dir):
    assert ModelInfo.load("acme/tiny-qwen-image").path == hub_cache
    params = SamplingParams(num_inference_steps=2, seed=4, output_type="np")
    with Omni("acme/tiny-qwen-image", executor="inproc") as omni:
        (from_hub,) = omni.generate(["a fox"], params, use_tqdm=False)
    with Omni(str(qwen_dir), executor="inproc") as omni:
        (from_dir,) = omni.generate(["a fox"], params, use_tqdm=False)
    np.testing.assert_array_equal(from_hub.images, from_dir.images)


def test_repo_missing_from_an_offline_cache_is_one_line(hub_cache, capsys):
    assert main(["generate", "--model", "acme/absent", "--executor", "inproc"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: model 'acme/absent': not a preset or directory")
