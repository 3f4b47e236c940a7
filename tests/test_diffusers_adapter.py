"""The generic diffusers adapter on Qwen-Image (a cross-check of the hand-split path): outputs
equal diffusers' own pipeline alone and co-batched, forwards of different requests join, and
aborts, failures and bad arguments stay with their request, leaving no thread or state behind."""

from __future__ import annotations

import asyncio
import threading

import diffusers
import numpy as np
import pytest
import torch

from engine import AsyncEngine, Omni, ParallelConfig, SamplingParams
from pipelines.diffusers_adapter import DiffusersAdapterPipeline
from tests.conftest import run_staggered

TOL = 1e-4
# diffusers' documented way to run UniPC on a flow-matching model, written out here on purpose.
UNIPC_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}


def reference(pipe, prompt: dict, params: SamplingParams, size: tuple[int, int]) -> np.ndarray:
    """What the diffusers pipeline returns for one request, called as a diffusers user would."""
    kwargs = {
        "prompt": prompt["prompt"],
        "num_inference_steps": params.num_inference_steps,
        "height": params.height or size[0],
        "width": params.width or size[1],
        "generator": torch.Generator().manual_seed(params.seed),
        "output_type": "np",
    }
    if prompt.get("negative_prompt") is not None:
        kwargs["negative_prompt"] = prompt["negative_prompt"]
    for scale in ("true_cfg_scale", "guidance_scale"):
        if getattr(params, scale) is not None:
            kwargs[scale] = getattr(params, scale)
    kwargs.update(params.pipeline_args or {})
    original = pipe.scheduler
    if params.scheduler is not None or params.scheduler_config:
        name = params.scheduler or type(original).__name__
        options = dict(UNIPC_FLOW) if name == "UniPCMultistepScheduler" else {}
        options.update(params.scheduler_config or {})
        pipe.scheduler = getattr(diffusers, name).from_config(original.config, **options)
    try:
        return np.asarray(pipe(**kwargs).images, dtype=np.float32)
    finally:
        pipe.scheduler = original


def adapter_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("stepweave-request-")]


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    with Omni(model=str(qwen_dir), max_num_seqs=8, executor="inproc", diffusers_adapter=True) as omni:
        pipe = diffusers.QwenImagePipeline.from_pretrained(str(qwen_dir))
        pipe.set_progress_bar_config(disable=True)
        yield omni, pipe


def check_output(omni, pipe, output, prompt, params):
    """`output` equals what diffusers' pipeline returns for the same request."""
    assert output.error is None, output.error
    info = omni.core.model_info
    expected = reference(pipe, prompt, params, (info.default_height, info.default_width))
    assert output.images.shape == expected.shape
    diff = float(np.abs(output.images - expected).max())
    assert diff < TOL, f"max abs diff {diff} for {prompt} {params}"


def test_qwen_through_adapter_co_batched_matches_diffusers(qwen):
    omni, pipe = qwen
    core = omni.core
    assert core.model_info.family is DiffusersAdapterPipeline
    runner_pipeline = core.executor.runner.pipeline
    cases = [
        (
            0,
            {"prompt": "a red fox in the snow", "negative_prompt": "blurry"},
            SamplingParams(num_inference_steps=5, true_cfg_scale=4.0, seed=1, output_type="np"),
        ),
        (
            1,
            {"prompt": "an old map of a harbour town with many small boats", "negative_prompt": "dark, low quality"},
            SamplingParams(
                num_inference_steps=6, true_cfg_scale=2.5, seed=2, scheduler="UniPCMultistepScheduler", output_type="np"
            ),
        ),
        (1, {"prompt": "a cat"}, SamplingParams(num_inference_steps=4, seed=3, output_type="np")),
        (
            2,
            {"prompt": "a tall tower", "negative_prompt": "fog"},
            SamplingParams(num_inference_steps=3, true_cfg_scale=6.0, seed=4, height=32, width=64, output_type="np"),
        ),
        (
            3,
            {"prompt": "a sailing ship on a grey sea under heavy clouds"},
            SamplingParams(num_inference_steps=4, seed=5, pipeline_args={"max_sequence_length": 64}, output_type="np"),
        ),
    ]
    calls, forwards = runner_pipeline.forward_calls, runner_pipeline.forwards_run
    requests = [(join, core.make_request(prompt, params)) for join, prompt, params in cases]
    finished = run_staggered(core, requests)
    assert len(finished) == len(cases)
    for (_, request), (_, prompt, params) in zip(requests, cases, strict=True):
        check_output(omni, pipe, finished[request.request_id], prompt, params)
    # Prompts of different lengths, with and without CFG, at different steps shared forwards, and
    # same-size requests finishing together shared a VAE decode (the 32x64 request cannot join
    # the 64x64 ones; alone every call would be a forward of its own).
    calls, forwards = runner_pipeline.forward_calls - calls, runner_pipeline.forwards_run - forwards
    assert forwards <= 0.65 * calls, (calls, forwards)
    assert core.executor.state_ids() == [] and adapter_threads() == []


def test_abort_and_failure_stay_with_their_request(qwen):
    omni, pipe = qwen
    core = omni.core
    keep_prompt, keep_params = (
        {"prompt": "a lighthouse"},
        SamplingParams(num_inference_steps=5, seed=8, output_type="np"),
    )
    keep = core.make_request(keep_prompt, keep_params)
    run = core.make_request("a storm at sea", SamplingParams(num_inference_steps=5, seed=9))
    wait = core.make_request("a quiet garden", SamplingParams(num_inference_steps=5, seed=10))
    # Passes the submission checks, then makes QwenImagePipeline.check_inputs raise in its thread.
    bad = core.make_request(
        "a field", SamplingParams(num_inference_steps=5, pipeline_args={"max_sequence_length": 2048})
    )
    for request in (keep, run, bad):
        core.add_request(request)
    outputs = {o.request_id: o for o in core.step() + core.step()}
    assert outputs[bad.request_id].finished and "max_sequence_length" in outputs[bad.request_id].error
    core.add_request(wait)
    assert len(adapter_threads()) == 2  # keep and run are parked at a step boundary
    assert core.abort(run.request_id).error == "request aborted"
    assert core.abort(wait.request_id).error == "request aborted"
    finished = {}
    while core.has_work():
        finished.update({o.request_id: o for o in core.step() if o.finished})
    assert set(finished) == {keep.request_id}
    check_output(omni, pipe, finished[keep.request_id], keep_prompt, keep_params)
    assert core.executor.state_ids() == [] and adapter_threads() == []


def test_shutdown_ends_parked_request_threads(qwen_dir):
    omni = Omni(model=str(qwen_dir), executor="inproc", diffusers_adapter=True)
    omni.core.add_request(omni.core.make_request("a fox", SamplingParams(num_inference_steps=4)))
    omni.core.step()
    assert len(adapter_threads()) == 1
    omni.shutdown()
    assert adapter_threads() == []


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("ok", SamplingParams(pipeline_args={"colour": "red"}), "QwenImagePipeline takes no argument 'colour'"),
        ("ok", SamplingParams(pipeline_args={"latents": 1}), "'latents' is set by the engine"),
        ("ok", SamplingParams(pipeline_args={"height": 32}), "'height' comes from SamplingParams.height"),
        ("ok", SamplingParams(pipeline_args={"sigmas": [{"a": 1}]}), "must be a string, number, boolean, null"),
        ("ok", SamplingParams(height=40), "height must be a multiple of 16"),
        ({"prompt": "ok", "class_label": 1}, None, "class_label is not an input of diffusers models"),
        ("", None, "prompt must be a non-empty string"),
    ],
)
def test_bad_arguments_are_rejected_at_submission(qwen, prompt, params, message):
    omni, _ = qwen
    good = SamplingParams(num_inference_steps=2, seed=1)
    bad, ok = omni.generate([prompt, "a fox"], [params, good], use_tqdm=False)
    assert bad.error is not None and message in bad.error and bad.metrics.num_steps == 0
    assert ok.error is None


def test_what_the_adapter_cannot_serve_is_refused_at_construction(qwen_dir, dit_dir):
    with pytest.raises(ValueError, match="'DiTPipeline' .*takes no callback_on_step_end"):
        Omni(model=str(dit_dir), executor="inproc", diffusers_adapter=True)
    with pytest.raises(ValueError, match="cfg_parallel_size > 1 supports dit, qwen-image models, not diffusers"):
        Omni(model=str(qwen_dir), diffusers_adapter=True, parallel_config=ParallelConfig(cfg_parallel_size=2))
    with Omni(model=str(qwen_dir), executor="inproc") as hand_split:
        (output,) = hand_split.generate(
            ["x"], SamplingParams(pipeline_args={"max_sequence_length": 64}), use_tqdm=False
        )
    assert "pipeline_args is for pipelines served through the diffusers adapter" in output.error


async def test_worker_process_and_async_engine_serve_the_adapter(qwen_dir):
    pipe = diffusers.QwenImagePipeline.from_pretrained(str(qwen_dir))
    pipe.set_progress_bar_config(disable=True)
    cases = [
        (
            {"prompt": "a red fox", "negative_prompt": "blur"},
            SamplingParams(num_inference_steps=3, seed=4, output_type="np"),
        ),
        (
            {"prompt": "a blue door"},
            SamplingParams(num_inference_steps=4, seed=5, height=32, width=32, output_type="np"),
        ),
    ]
    async with AsyncEngine(model=str(qwen_dir), executor="mp", diffusers_adapter=True) as engine:

        async def run(prompt, params):
            steps = []
            async for out in engine.generate(prompt, params):
                steps.append(out.step)
            return out, steps

        async def cancelled():
            async for out in engine.generate("a long walk", SamplingParams(num_inference_steps=50, seed=6)):
                assert not out.finished
                break  # the consumer leaves: the engine aborts the request and its thread ends

        *results, _ = await asyncio.gather(*(run(p, s) for p, s in cases), cancelled())
        assert await engine.worker_state_ids() == []
    for (prompt, params), (output, steps) in zip(cases, results, strict=True):
        assert output.error is None, output.error
        assert steps[-1] == params.num_inference_steps and steps == sorted(steps)
        expected = reference(pipe, prompt, params, (64, 64))
        assert float(np.abs(output.images - expected).max()) < TOL
