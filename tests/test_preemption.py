"""Scheduling does not change images: a request that sits out steps for more urgent ones (its
state kept on the workers) gives what diffusers gives for it alone, for a hand-split family and
through the generic diffusers adapter."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest

from engine import Omni, SamplingParams
from tests.conftest import diffusers_reference

TOL = 1e-4


@pytest.fixture(scope="module", params=[False, True], ids=["family", "adapter"])
def engine(request, qwen_dir, tmp_path_factory):
    # A cost profile instead of measuring at start: every step 10 ms, so every deadline below is
    # meetable and the order is decided by the deadlines alone.
    profile = tmp_path_factory.mktemp("profile") / "cost.json"
    profile.write_text(json.dumps({"coefficients": {"batch": 0.01}}))
    options = dict(max_num_seqs=1, max_paused=2, scheduling_policy="deadline", cost_profile=str(profile))
    with Omni(str(qwen_dir), executor="inproc", diffusers_adapter=request.param, **options) as omni:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(qwen_dir))
        pipe.set_progress_bar_config(disable=True)
        yield omni, pipe


def test_preempted_request_matches_diffusers_alone(engine):
    omni, pipe = engine
    core = omni.core
    long_prompt = {"prompt": "a steam train crossing a stone bridge", "negative_prompt": "blurry"}
    long_params = SamplingParams(num_inference_steps=8, seed=5, output_type="np", deadline_s=600.0)
    urgent = [
        (
            {"prompt": f"a red fox number {i}", "negative_prompt": "dark"},
            SamplingParams(num_inference_steps=3, seed=10 + i, output_type="np", deadline_s=60.0),
        )
        for i in range(2)
    ]
    core.add_request(core.make_request(long_prompt, long_params, "long"))
    progress, finished = {"long": 0}, {}
    while progress["long"] < 2:
        for out in core.step():
            progress[out.request_id] = out.step
    for i, (prompt, params) in enumerate(urgent):
        core.add_request(core.make_request(prompt, params, f"urgent-{i}"))
    paused_at = progress["long"]
    while core.has_work():
        for out in core.step():
            progress[out.request_id] = out.step
            if out.finished:
                finished[out.request_id] = (out, progress["long"])
    # both urgent requests ran to the end while the long one sat at its step boundary
    assert finished["urgent-0"][1] == paused_at and finished["urgent-1"][1] == paused_at
    info = core.model_info
    size = (info.default_height, info.default_width)
    cases = [("long", long_prompt, long_params)] + [(f"urgent-{i}", p, s) for i, (p, s) in enumerate(urgent)]
    for request_id, prompt, params in cases:
        output = finished[request_id][0]
        assert output.error is None, output.error
        expected = diffusers_reference(pipe, prompt, params, size=size)
        diff = float(np.abs(output.images - expected).max())
        assert diff < TOL, f"{request_id}: max abs diff {diff}"
