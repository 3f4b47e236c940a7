"""Text-to-video with Wan 2.1 (one transformer) and Wan 2.2 (two, split at a boundary) through the
generic diffusers adapter: the presets load in diffusers, each request's frames equal
`WanPipeline.from_pretrained` on the same directory and seed, alone and co-batched with requests
joining at different steps (for Wan 2.2, requests on both sides of the boundary in one step
batch, whose forwards must go to different transformers), and bad video requests are refused
at submission with the field named."""

from __future__ import annotations

import json

import diffusers
import msgspec
import numpy as np
import pytest
import torch

from engine import Omni, SamplingParams
from pipelines import diffusers_adapter
from pipelines.diffusers_adapter import DiffusersAdapterPipeline
from pipelines.forward_batching import ForwardCall, group_calls
from tests.conftest import run_staggered
from tests.test_diffusers_adapter import adapter_threads

TOL = 1e-4
WAN = ("tiny-wan21", "tiny-wan22")


def wan_reference(pipe, prompt: dict, params: SamplingParams, output_type: str = "np"):
    """What WanPipeline returns for one request, called as a diffusers user would (the preset's
    size and 9 frames unless the request names others): frames (F, H, W, 3), or F PIL images."""
    kwargs = {
        "prompt": prompt["prompt"],
        "num_inference_steps": params.num_inference_steps,
        "height": params.height or 32,
        "width": params.width or 32,
        "num_frames": params.num_frames or 9,
        "generator": torch.Generator().manual_seed(params.seed),
        "output_type": output_type,
    }
    if prompt.get("negative_prompt") is not None:
        kwargs["negative_prompt"] = prompt["negative_prompt"]
    if params.guidance_scale is not None:
        kwargs["guidance_scale"] = params.guidance_scale
    kwargs.update(params.pipeline_args or {})
    frames = pipe(**kwargs).frames[0]
    return np.asarray(frames, dtype=np.float32) if output_type == "np" else frames


def check_frames(pipe, output, prompt, params):
    assert output.error is None, output.error
    assert output.images is None
    expected = wan_reference(pipe, prompt, params)
    assert output.frames.shape == expected.shape
    diff = float(np.abs(output.frames - expected).max())
    assert diff < TOL, f"max abs diff {diff} for {prompt} {params}"


def _np(**options) -> SamplingParams:
    return SamplingParams(output_type="np", **options)


@pytest.fixture(scope="module", params=WAN)
def wan(request, _preset_cache, tmp_path_factory):
    name = request.param
    path = export_preset_dir(name, tmp_path_factory)
    with Omni(model=str(path), max_num_seqs=8, executor="inproc") as omni:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(path))
        pipe.set_progress_bar_config(disable=True)
        yield name, path, omni, pipe


def export_preset_dir(name, tmp_path_factory):
    from pipelines.presets import export_preset

    return export_preset(name, tmp_path_factory.mktemp(name) / name, preset_size=True)


def test_wan_preset_is_a_loadable_wan_pipeline(wan):
    name, path, _, pipe = wan
    index = json.loads((path / "model_index.json").read_text())
    assert type(pipe) is diffusers.WanPipeline and index["_class_name"] == "WanPipeline"
    if name == "tiny-wan22":
        assert index["boundary_ratio"] == 0.875 and index["transformer_2"][1] == "WanTransformer3DModel"
        assert isinstance(pipe.transformer_2, diffusers.WanTransformer3DModel)
    else:
        assert index["boundary_ratio"] is None and pipe.transformer_2 is None
    assert json.loads((path / "stepweave.json").read_text())["default_num_frames"] == 9
    video = wan_reference(pipe, {"prompt": "a lighthouse at dusk"}, _np(num_inference_steps=3, seed=0))
    assert video.shape == (9, 32, 32, 3) and np.isfinite(video).all() and video.std() > 0.05
    # frames differ (the VAE decodes a moving video) and the prompt reaches the output
    assert np.abs(video[0] - video[-1]).mean() > 1e-2
    other = wan_reference(pipe, {"prompt": "a red cat asleep"}, _np(num_inference_steps=3, seed=0))
    assert np.abs(other - video).mean() > 1e-3


def test_wan_alone_matches_diffusers_as_np_and_pil_frames(wan):
    _, _, omni, pipe = wan
    assert omni.core.model_info.family is DiffusersAdapterPipeline
    prompt = {"prompt": "a red fox running through snow", "negative_prompt": "blurry"}
    params = _np(num_inference_steps=4, seed=3, num_frames=5, guidance_scale=4.0)
    pil_params = msgspec.structs.replace(params, output_type="pil")
    output, pil = omni.generate([prompt, prompt], [params, pil_params], use_tqdm=False)
    check_frames(pipe, output, prompt, params)
    assert output.metrics.num_steps == 4
    expected = wan_reference(pipe, prompt, params, output_type="pil")
    assert len(pil.frames) == len(expected) == 5
    assert pil.frames[4].info["seed"] == "3" and pil.frames[4].info["num_frames"] == "5"  # its settings
    for got, want in zip(pil.frames, expected, strict=True):
        assert got.size == want.size == (32, 32)
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1


def test_wan_co_batched_with_staggered_joins_matches_diffusers(wan, monkeypatch):
    """Five requests joining at steps 0-3 with different step counts, frame counts, sizes and
    guidance; for Wan 2.2 (boundary at t >= 875: the first two of four steps on `transformer`)
    early and late requests meet in one step batch, so one round of forwards holds calls to both
    transformers, which must run as separate forwards."""
    name, _, omni, pipe = wan
    core = omni.core
    adapter = core.executor.runner.pipeline
    cases = [
        (0, {"prompt": "a red fox in the snow", "negative_prompt": "blurry"}, _np(num_inference_steps=4, seed=1)),
        (1, {"prompt": "a harbour town with small boats at dawn"}, _np(num_inference_steps=4, seed=2)),
        (2, {"prompt": "a cat"}, _np(num_inference_steps=4, seed=3, guidance_scale=1.0)),
        (2, {"prompt": "a tower", "negative_prompt": "fog"}, _np(num_inference_steps=5, seed=4, num_frames=5)),
        (3, {"prompt": "a ship at sea"}, _np(num_inference_steps=3, seed=5, height=48, guidance_scale=3.0)),
    ]
    rounds: list[list[tuple[set, int]]] = []  # per round of forwards: each group's modules and size

    def spy(calls):
        groups = group_calls(calls)
        rounds.append([({id(call.module) for call in group}, len(group)) for group in groups])
        return groups

    monkeypatch.setattr(diffusers_adapter, "group_calls", spy)
    calls, forwards = adapter.forward_calls, adapter.forwards_run
    requests = [(join, core.make_request(prompt, params)) for join, prompt, params in cases]
    finished = run_staggered(core, requests)
    assert len(finished) == len(cases)
    for (_, request), (_, prompt, params) in zip(requests, cases, strict=True):
        check_frames(pipe, finished[request.request_id], prompt, params)
    calls, forwards = adapter.forward_calls - calls, adapter.forwards_run - forwards
    # Same-shape forwards of different requests joined; frame counts, sizes and, for Wan 2.2, the
    # two experts keep the others apart (alone, every call would be a forward of its own).
    assert forwards < 0.9 * calls and max(size for groups in rounds for _, size in groups) >= 2, (calls, forwards)
    assert all(len(modules) == 1 for groups in rounds for modules, _ in groups)  # no forward mixes modules
    if name == "tiny-wan22":
        experts = {id(adapter.pipe.transformer), id(adapter.pipe.transformer_2)}
        both = [groups for groups in rounds if experts <= set().union(*(modules for modules, _ in groups))]
        assert both, "no round held forwards of both transformers"
    assert core.executor.state_ids() == [] and adapter_threads() == []


def test_forwards_of_different_modules_never_join():
    """Identical inputs to two transformers (Wan 2.2's experts at one step batch) stay apart."""
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    x = torch.ones(1, 4)
    calls = [ForwardCall(first, (x,), {}), ForwardCall(second, (x,), {}), ForwardCall(first, (x,), {})]
    groups = group_calls(calls)
    assert [[calls.index(c) for c in group] for group in groups] == [[0, 2], [1]]


def test_bad_video_requests_are_refused_with_the_field_named(wan, qwen_dir):
    _, _, omni, _ = wan
    for params, message in [
        (SamplingParams(num_frames=8), "SamplingParams.num_frames must be 4k + 1 (1, 5, 9, ...) for WanPipeline"),
        (SamplingParams(num_frames=0), "SamplingParams.num_frames must be an integer in [1, 1025]"),
        (SamplingParams(num_frames=5, num_images_per_prompt=2), "num_images_per_prompt must be 1 for WanPipeline"),
        (
            SamplingParams(num_frames=1025, height=720, width=1280),
            "num_frames x height x width = 1025x720x1280 gives 925200 video tokens; at most 75600",
        ),
    ]:
        with pytest.raises(ValueError) as excinfo:
            omni.core.make_request("a fox", params)
        assert message in str(excinfo.value)
    with Omni(model=str(qwen_dir), executor="inproc") as qwen:
        with pytest.raises(ValueError, match="SamplingParams.num_frames is for video pipelines; QwenImagePipeline"):
            qwen.core.make_request("a fox", SamplingParams(num_frames=5))
