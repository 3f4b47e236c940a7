"""Aborts free state; bad input and failing requests fail alone while the rest complete."""

from __future__ import annotations

import numpy as np
import pytest

from engine import Omni, SamplingParams
from tests.conftest import diffusers_reference


@pytest.fixture(scope="module")
def omni(qwen_dir):
    with Omni(model=str(qwen_dir), max_num_seqs=2, executor="inproc") as omni:
        yield omni


def test_abort_running_and_waiting_leaves_no_state(omni, qwen_dir):
    """Aborting one running and one waiting request frees them; the survivors, including a
    request admitted into the freed slot next to a running one, still equal diffusers."""
    import diffusers

    core = omni.core
    plan = {  # distinct prompts, seeds and step counts, so a mix-up between requests shows
        "keep": ({"prompt": "a red fox in the snow", "negative_prompt": "blurry"}, 6, 1),
        "run": ({"prompt": "an old stone bridge", "negative_prompt": "dark"}, 6, 2),
        "wait": ({"prompt": "a field of sunflowers"}, 4, 3),
        "late": ({"prompt": "a lighthouse at dusk", "negative_prompt": "rain"}, 5, 4),
    }
    params = {
        name: SamplingParams(num_inference_steps=steps, seed=seed, output_type="np")
        for name, (_, steps, seed) in plan.items()
    }
    requests = {name: core.make_request(plan[name][0], params[name]) for name in plan}
    for request in requests.values():
        core.add_request(request)
    core.step()
    core.step()
    assert set(core.executor.state_ids()) == {requests["keep"].request_id, requests["run"].request_id}
    assert core.abort(requests["run"].request_id).error == "request aborted"
    assert core.abort(requests["wait"].request_id).error == "request aborted"
    finished = {}
    while core.has_work():
        finished.update({o.request_id: o for o in core.step() if o.finished})
    assert set(finished) == {requests["keep"].request_id, requests["late"].request_id}
    core.step()  # nothing left to run: the drop of an already-freed request is a no-op
    assert core.executor.state_ids() == []

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(qwen_dir))
    pipe.set_progress_bar_config(disable=True)
    size = (core.model_info.default_height, core.model_info.default_width)
    for name in ("keep", "late"):
        output = finished[requests[name].request_id]
        assert output.error is None, output.error
        expected = diffusers_reference(pipe, plan[name][0], params[name], size=size)
        assert output.images.shape == expected.shape
        assert float(np.abs(output.images - expected).max()) < 1e-4, name


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("ok", SamplingParams(num_inference_steps=0), "num_inference_steps must be an integer in [1, 1000]"),
        ("ok", SamplingParams(height=40), "height must be a multiple of 16"),
        ("ok", SamplingParams(num_inference_steps=1), "num_inference_steps=1 gives a non-finite schedule"),
        ("ok", SamplingParams(scheduler="NoSuchScheduler"), "unknown diffusers scheduler class 'NoSuchScheduler'"),
        ("ok", SamplingParams(scheduler="DDIMScheduler"), "cannot drive this model"),
        ("ok", SamplingParams(scheduler_config={"not_an_option": 1}), "has no option(s) ['not_an_option']"),
        (
            "ok",
            SamplingParams(scheduler_config={"num_train_timesteps": 10**7 + 3}),
            "scheduler_config['num_train_timesteps'] must be an integer in [1, 10000]",
        ),
        (
            "ok",
            SamplingParams(scheduler="UniPCMultistepScheduler", scheduler_config={"solver_order": 0}),
            "scheduler_config['solver_order'] must be an integer in [1, 3]",
        ),
        ("ok", SamplingParams(scheduler_config={"shift": float("inf")}), "['shift'] must be a number in [0.01, 100.0]"),
        (123, None, "prompt must be a string or a dict"),
        ({"prompt": "x", "colour": "red"}, None, "unknown key(s) ['colour']"),
        ("", None, "prompt must be a non-empty string"),
        ("x" * 20_001, None, "at most 20000 characters"),
        ({"prompt": "x", "negative_prompt": 5}, None, "negative_prompt must be null or a string"),
        ("ok", SamplingParams(height=4096, width=4096), "image tokens; this model allows at most 8192"),
        ("a lone surrogate \udcff", None, "request cannot be sent to the workers"),
        ({"prompt": "ok", "negative_prompt": "\ud800"}, None, "request cannot be sent to the workers"),
    ],
)
def test_bad_requests_are_rejected_while_others_complete(omni, prompt, params, message):
    good = SamplingParams(num_inference_steps=2, seed=1)
    bad, ok = omni.generate([prompt, "a lighthouse"], [params or SamplingParams(), good], use_tqdm=False)
    assert bad.finished and message in bad.error
    assert ok.error is None and len(ok.images) == 1


def test_non_finite_request_fails_alone(omni, monkeypatch):
    pipeline = omni.core.executor.runner.pipeline
    original = pipeline.forward_rows

    def poisoned(rows):
        out = original(rows)
        for i, (state, _) in enumerate(rows):
            if state.request.prompt == "poison":
                out[i] = float("nan")
        return out

    monkeypatch.setattr(pipeline, "forward_rows", poisoned)
    params = SamplingParams(num_inference_steps=3, seed=2)
    bad, good = omni.generate(["poison", "a calm lake"], params, use_tqdm=False)
    assert "noise prediction is not finite at step 1" in bad.error
    assert good.error is None
    assert omni.core.executor.state_ids() == []


def test_exception_in_a_shared_forward_fails_only_the_culprit(omni, monkeypatch):
    pipeline = omni.core.executor.runner.pipeline
    original = pipeline.forward_rows

    def fragile(rows):
        if any(state.request.prompt == "explode" for state, _ in rows):
            raise RuntimeError("kernel exploded")
        return original(rows)

    monkeypatch.setattr(pipeline, "forward_rows", fragile)
    bad, good = omni.generate(
        ["explode", "a quiet street"], SamplingParams(num_inference_steps=2, seed=3), use_tqdm=False
    )
    assert "RuntimeError: kernel exploded" in bad.error
    assert good.error is None
