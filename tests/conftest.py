"""Shared fixtures: presets exported once per session, diffusers references, staggered runs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Two cores: keep each process to one intra-op thread so parallel workers do not oversubscribe.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _preset_cache(tmp_path_factory):
    """Build presets once per test session, in a private cache."""
    if "STEPWEAVE_CACHE_DIR" not in os.environ:
        os.environ["STEPWEAVE_CACHE_DIR"] = str(tmp_path_factory.mktemp("preset-cache"))


@pytest.fixture(scope="session")
def qwen_dir(_preset_cache, tmp_path_factory):
    from pipelines.presets import export_preset

    return export_preset("tiny-qwen-image", tmp_path_factory.mktemp("tiny-qwen-image"), preset_size=True)


@pytest.fixture(scope="session")
def dit_dir(_preset_cache, tmp_path_factory):
    from pipelines.presets import export_preset

    return export_preset("tiny-dit", tmp_path_factory.mktemp("tiny-dit"), preset_size=True)


# How diffusers' documentation switches a general solver to a flow-matching model's velocity field
# (e.g. its Wan pipelines: UniPCMultistepScheduler(prediction_type="flow_prediction",
# use_flow_sigmas=True)); every other option keeps the value in the model's scheduler config or
# the class default. Written out here, not imported from stepweave, so that a wrong default in
# stepweave's own table cannot also change the reference it is checked against.
DIFFUSERS_FLOW_SOLVER_OPTIONS = {
    "UniPCMultistepScheduler": {"prediction_type": "flow_prediction", "use_flow_sigmas": True},
}


def diffusers_reference(pipe, prompt, params, size=None):
    """What diffusers' own pipeline returns for one request (output_type="np"); `prompt` is a
    string or a dict as stepweave takes it."""
    import diffusers

    if isinstance(prompt, str):
        prompt = {"prompt": prompt}

    original = pipe.scheduler
    if params.scheduler or params.scheduler_config:
        name = params.scheduler or type(original).__name__
        options = {}
        if isinstance(pipe, diffusers.QwenImagePipeline) and name != type(original).__name__:
            options.update(DIFFUSERS_FLOW_SOLVER_OPTIONS[name])
        options.update(params.scheduler_config or {})
        pipe.scheduler = getattr(diffusers, name).from_config(original.config, **options)
    try:
        generator = torch.Generator().manual_seed(params.seed)
        if isinstance(pipe, diffusers.DiTPipeline):
            images = pipe(
                class_labels=[prompt["class_label"]],
                guidance_scale=4.0 if params.guidance_scale is None else params.guidance_scale,
                num_inference_steps=params.num_inference_steps,
                generator=generator,
                output_type="np",
            ).images
        else:
            images = pipe(
                prompt=prompt["prompt"],
                negative_prompt=prompt.get("negative_prompt"),
                true_cfg_scale=4.0 if params.true_cfg_scale is None else params.true_cfg_scale,
                num_inference_steps=params.num_inference_steps,
                height=params.height or size[0],
                width=params.width or size[1],
                generator=generator,
                output_type="np",
            ).images
    finally:
        pipe.scheduler = original
    return np.asarray(images, dtype=np.float32)


def run_staggered(core, plan):
    """Drive an EngineCore step by step; plan = [(join_at_step, request)]. Returns outputs by id."""
    pending = sorted(plan, key=lambda item: item[0])
    finished = {}
    step = 0
    while pending or core.has_work():
        while pending and pending[0][0] <= step:
            core.add_request(pending.pop(0)[1])
        for output in core.step():
            if output.finished:
                finished[output.request_id] = output
        step += 1
        assert step < 10_000
    return finished
