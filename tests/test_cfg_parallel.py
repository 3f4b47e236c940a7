"""CFG-parallel worker groups give the same images as one rank (multi-process, gloo)."""

from __future__ import annotations

import multiprocessing
import socket

import numpy as np
import pytest
import torch

from engine import Omni, ParallelConfig, SamplingParams
from tests import cfg_worlds

pytestmark = pytest.mark.slow

QWEN_MIX = [
    (
        {"prompt": "a red fox", "negative_prompt": "blurry"},
        SamplingParams(num_inference_steps=5, seed=1, output_type="np"),
    ),
    ("a cat without guidance", SamplingParams(num_inference_steps=4, seed=2, output_type="np")),
    (
        {"prompt": "a harbour town at dusk", "negative_prompt": "dark"},
        SamplingParams(
            num_inference_steps=6, true_cfg_scale=2.0, seed=3, scheduler="UniPCMultistepScheduler", output_type="np"
        ),
    ),
    (
        {"prompt": "a tower", "negative_prompt": "fog"},
        SamplingParams(num_inference_steps=3, true_cfg_scale=7.0, seed=4, height=32, width=64, output_type="np"),
    ),
]
DIT_MIX = [
    ({"class_label": 3}, SamplingParams(num_inference_steps=5, guidance_scale=4.0, seed=1, output_type="np")),
    (
        {"class_label": 4},
        SamplingParams(num_inference_steps=6, guidance_scale=2.0, seed=2, scheduler="DDPMScheduler", output_type="np"),
    ),
    ({"class_label": 5}, SamplingParams(num_inference_steps=4, guidance_scale=1.0, seed=3, output_type="np")),
]


@pytest.mark.parametrize("fixture, mix", [("qwen_dir", QWEN_MIX), ("dit_dir", DIT_MIX)])
def test_cfg_parallel_2_matches_1(request, fixture, mix):
    model = str(request.getfixturevalue(fixture))
    prompts, params = [p for p, _ in mix], [sp for _, sp in mix]
    with Omni(model, executor="inproc") as single:
        expected = single.generate(prompts, params, use_tqdm=False)
    with Omni(model, executor="mp", parallel_config=ParallelConfig(cfg_parallel_size=2)) as parallel:
        got = parallel.generate(prompts, params, use_tqdm=False)
        assert parallel.core.executor.state_ids() == []
    for a, b in zip(got, expected):
        assert a.error is None and b.error is None
        assert float(np.abs(a.images - b.images).max()) < 1e-4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(world, tmp_path):
    port, out = _free_port(), str(tmp_path / f"world{world}")
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=cfg_worlds.rank_main, args=(r, world, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    return [torch.load(f"{out}.rank{r}") for r in range(world)]


def _flatten(latents):
    return [t for item in latents for t in (item if isinstance(item, tuple) else (item,))]


def test_multi_branch_and_tuple_outputs_agree_across_world_sizes(tmp_path):
    reference = {kind: cfg_worlds.run(kind) for kind in ("three", "tuple")}
    for world in (2, 3):
        for rank_result in _run_world(world, tmp_path):  # every rank ends with the same latents
            for kind in ("three", "tuple"):
                for got, want in zip(_flatten(rank_result[kind]), _flatten(reference[kind])):
                    assert torch.allclose(got, want, atol=1e-5), (world, kind)
