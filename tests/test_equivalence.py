"""Outputs equal diffusers' own pipelines, alone and co-batched with requests joining mid-flight."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from engine import Omni, SamplingParams
from tests.conftest import diffusers_reference, run_staggered

TOL = 1e-4


def _engine_and_reference(model_dir):
    """stepweave and diffusers' own pipeline on the same directory."""
    with Omni(model=str(model_dir), max_num_seqs=8, executor="inproc") as omni:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(model_dir))
        pipe.set_progress_bar_config(disable=True)
        yield omni, pipe


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    yield from _engine_and_reference(qwen_dir)


@pytest.fixture(scope="module")
def dit(dit_dir):
    yield from _engine_and_reference(dit_dir)


def _assert_matches(omni, pipe, output, prompt, params):
    assert output.error is None, output.error
    info = omni.core.model_info
    expected = diffusers_reference(pipe, prompt, params, size=(info.default_height, info.default_width))
    assert output.images.shape == expected.shape
    diff = float(np.abs(output.images - expected).max())
    assert diff < TOL, f"max abs diff {diff} for {prompt} {params}"


def test_qwen_alone_matches_diffusers(qwen):
    omni, pipe = qwen
    assert isinstance(pipe, diffusers.QwenImagePipeline)
    prompt = {"prompt": "a red fox in the snow", "negative_prompt": "blurry"}
    params = SamplingParams(num_inference_steps=5, true_cfg_scale=3.0, seed=7, output_type="np")
    (output,) = omni.generate([prompt], params, use_tqdm=False)
    _assert_matches(omni, pipe, output, prompt, params)
    assert output.metrics.num_steps == 5 and output.metrics.latency_s > 0


def test_qwen_co_batched_with_staggered_joins_matches_diffusers(qwen):
    omni, pipe = qwen
    core = omni.core
    cases = [
        (
            0,
            {"prompt": "a red fox in the snow", "negative_prompt": "blurry"},
            SamplingParams(num_inference_steps=6, true_cfg_scale=4.0, seed=1, output_type="np"),
        ),
        (
            1,
            {"prompt": "an old map of a harbour town with many small boats", "negative_prompt": "dark, low quality"},
            SamplingParams(
                num_inference_steps=8, true_cfg_scale=2.5, seed=2, scheduler="UniPCMultistepScheduler", output_type="np"
            ),
        ),
        (2, {"prompt": "a cat"}, SamplingParams(num_inference_steps=4, seed=3, output_type="np")),
        (
            3,
            {"prompt": "a tall tower", "negative_prompt": "fog"},
            SamplingParams(num_inference_steps=5, true_cfg_scale=6.0, seed=4, height=32, width=64, output_type="np"),
        ),
        (
            3,
            {"prompt": "a sailing ship", "negative_prompt": "rain"},
            SamplingParams(
                num_inference_steps=3,
                true_cfg_scale=1.5,
                seed=5,
                scheduler="UniPCMultistepScheduler",
                scheduler_config={"solver_order": 1},
                output_type="np",
            ),
        ),
    ]
    requests = [(join, core.make_request(prompt, params)) for join, prompt, params in cases]
    finished = run_staggered(core, requests)
    for (join, request), (_, prompt, params) in zip(requests, cases, strict=True):
        _assert_matches(omni, pipe, finished[request.request_id], prompt, params)
    assert core.executor.state_ids() == []


def test_dit_co_batched_with_schedulers_matches_diffusers(dit):
    omni, pipe = dit
    assert isinstance(pipe, diffusers.DiTPipeline)
    core = omni.core
    cases = [
        (0, {"class_label": 3}, SamplingParams(num_inference_steps=6, guidance_scale=4.0, seed=11, output_type="np")),
        (
            1,
            {"class_label": 7},
            SamplingParams(
                num_inference_steps=9, guidance_scale=2.0, seed=12, scheduler="DDIMScheduler", output_type="np"
            ),
        ),
        (2, {"class_label": 5}, SamplingParams(num_inference_steps=4, guidance_scale=1.0, seed=13, output_type="np")),
        (
            2,
            {"class_label": 1},
            SamplingParams(
                num_inference_steps=5, guidance_scale=3.0, seed=14, scheduler="EulerDiscreteScheduler", output_type="np"
            ),
        ),
    ]
    requests = [(join, core.make_request(prompt, params)) for join, prompt, params in cases]
    finished = run_staggered(core, requests)
    for (join, request), (_, prompt, params) in zip(requests, cases, strict=True):
        _assert_matches(omni, pipe, finished[request.request_id], prompt, params)
    # alone, with the model's default multistep solver
    prompt, params = cases[0][1], cases[0][2]
    (alone,) = omni.generate([prompt], params, use_tqdm=False)
    _assert_matches(omni, pipe, alone, prompt, params)


def test_pil_output_matches_diffusers_pil_output(qwen):
    """output_type="pil" gives the pixels diffusers' own pipeline gives with output_type="pil"."""
    omni, pipe = qwen
    prompt = {"prompt": "a boat on a lake", "negative_prompt": "fog"}
    params = SamplingParams(num_inference_steps=3, seed=9)
    (pil,) = omni.generate([prompt], params, use_tqdm=False)
    info = omni.core.model_info
    expected = pipe(
        prompt=prompt["prompt"],
        negative_prompt=prompt["negative_prompt"],
        num_inference_steps=3,
        height=info.default_height,
        width=info.default_width,
        generator=torch.Generator().manual_seed(9),
        output_type="pil",
    ).images[0]
    got = np.asarray(pil.images[0], dtype=np.int16)
    want = np.asarray(expected, dtype=np.int16)
    assert pil.images[0].mode == expected.mode and got.shape == want.shape
    # The float outputs agree to 1e-4, so a pixel may round the other way only on a .5 boundary.
    assert np.abs(got - want).max() <= 1
    assert np.mean(got != want) < 1e-3
