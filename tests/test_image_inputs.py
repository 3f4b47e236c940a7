"""Input images through the engine: image-to-image (FluxImg2ImgPipeline, with strength), editing
(FluxKontextPipeline) and inpainting (FluxInpaintPipeline), each equal to the diffusers pipeline
class loaded from the same directory for the same inputs and seed, alone and co-batched with
requests that join at different steps; progress counts the steps a request really runs."""

from __future__ import annotations

import inspect

import diffusers
import msgspec
import numpy as np
import pytest
import torch
from PIL import Image

from engine import Omni, SamplingParams
from engine.contract.input_images import MAX_INPUT_BYTES, check_input_images
from pipelines.diffusers_adapter import DiffusersAdapterPipeline, steps_after_strength
from pipelines.model_info import ModelInfo
from tests.test_diffusers_adapter import adapter_threads

TOL = 1e-4


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth uint8 test picture (gradients plus a disc), different for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(rng.uniform(2, 6) * x + rng.uniform(2, 6) * y + rng.uniform(0, 3)) for _ in range(3)]
    image = (np.stack(channels, axis=-1) + 1) / 2
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    image[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = rng.uniform(0, 1, 3)
    return (image * 255).round().astype(np.uint8)


def as_diffusers_input(value):
    """What a user would pass diffusers for an input stepweave took: uint8 arrays are images."""
    if isinstance(value, list):
        return [as_diffusers_input(item) for item in value]
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return Image.fromarray(value)
    if isinstance(value, np.ndarray):  # diffusers reads numpy images as (N, H, W, C)
        return value[None] if value.ndim == 3 else value[None, :, :, None]
    return value


def reference(pipe, prompt: dict, params: SamplingParams) -> np.ndarray:
    kwargs = dict(
        prompt=prompt["prompt"],
        num_inference_steps=params.num_inference_steps,
        height=params.height or 64,
        width=params.width or 64,
        generator=torch.Generator().manual_seed(params.seed),
        output_type="np",
    )
    for key in ("image", "mask_image"):
        if prompt.get(key) is not None:
            kwargs[key] = as_diffusers_input(prompt[key])
    for key in ("strength", "guidance_scale"):
        if getattr(params, key) is not None:
            kwargs[key] = getattr(params, key)
    kwargs.update(params.pipeline_args or {})
    return np.asarray(pipe(**kwargs).images, dtype=np.float32)


def np_params(**options) -> SamplingParams:
    return SamplingParams(output_type="np", **options)


def kontext_args(height: int, width: int) -> dict:
    """Kontext sizes its output from max_area (default 1024^2) and resizes input images to a
    preferred resolution unless told not to: keep both tiny."""
    return {"max_area": height * width, "_auto_resize": False}


# preset -> (diffusers class, [(join at step, prompt, params)]): four or more requests each, with
# PIL, uint8 and float inputs, different sizes, step counts, strengths and guidance scales.
CASES = {
    "tiny-flux-img2img": (
        diffusers.FluxImg2ImgPipeline,
        [
            (
                0,
                {"prompt": "a red fox in the snow", "image": Image.fromarray(picture(64, 64, 1))},
                np_params(num_inference_steps=6, strength=0.8, seed=1),
            ),
            (
                1,
                {"prompt": "an old harbour town with many small boats", "image": picture(64, 64, 2)},
                np_params(num_inference_steps=5, strength=0.5, guidance_scale=5.0, seed=2),
            ),
            (
                1,
                {"prompt": "a cat", "image": picture(32, 48, 3).astype(np.float32) / 255},
                np_params(num_inference_steps=4, seed=3, height=32, width=48),  # the pipeline's strength: 0.6
            ),
            (
                2,
                {"prompt": "a tower", "image": Image.fromarray(picture(32, 32, 4))},  # resized to 64x64
                np_params(num_inference_steps=3, strength=1.0, seed=4),
            ),
            (
                3,
                {"prompt": "a ship", "image": picture(64, 64, 5)},
                np_params(num_inference_steps=7, strength=0.3, seed=5),
            ),
        ],
    ),
    "tiny-flux-kontext": (
        diffusers.FluxKontextPipeline,
        [
            (
                0,
                {"prompt": "make the fox blue", "image": Image.fromarray(picture(64, 64, 6))},
                np_params(num_inference_steps=4, guidance_scale=2.5, seed=6, pipeline_args=kontext_args(64, 64)),
            ),
            (
                1,
                {"prompt": "add a boat to the harbour", "image": picture(32, 48, 7)},
                np_params(num_inference_steps=3, seed=7, height=32, width=48, pipeline_args=kontext_args(32, 48)),
            ),
            (
                1,
                {"prompt": "a cat"},  # no input image: Kontext generates from text
                np_params(num_inference_steps=3, seed=8, pipeline_args=kontext_args(64, 64)),
            ),
            (
                2,
                {"prompt": "turn it into a painting", "image": picture(64, 64, 9).astype(np.float32) / 255},
                np_params(num_inference_steps=3, seed=9, pipeline_args=kontext_args(64, 64)),
            ),
            (
                3,
                {"prompt": "night time", "image": Image.fromarray(picture(64, 64, 10))},
                np_params(num_inference_steps=2, guidance_scale=4.0, seed=10, pipeline_args=kontext_args(64, 64)),
            ),
        ],
    ),
}


def _circle_mask(height: int, width: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(((y - height / 2) ** 2 + (x - width / 2) ** 2 < (height / 3) ** 2).astype(np.uint8) * 255)


@pytest.fixture(scope="module", params=sorted(CASES))
def family(request, _preset_cache, tmp_path_factory):
    from pipelines.presets import export_preset

    name = request.param
    path = export_preset(name, tmp_path_factory.mktemp(name) / name, preset_size=True)
    with Omni(model=str(path), max_num_seqs=8, executor="inproc", max_input_pixels=96 * 96) as omni:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(path))
        pipe.set_progress_bar_config(disable=True)
        yield name, omni, pipe


def expected_steps(pipe, params: SamplingParams) -> int:
    if "strength" not in inspect.signature(pipe.__call__).parameters:
        return params.num_inference_steps
    return steps_after_strength(params.num_inference_steps, 0.6 if params.strength is None else params.strength)


def check(pipe, output, prompt, params) -> None:
    assert output.error is None, output.error
    expected = reference(pipe, prompt, params)
    assert output.images.shape == expected.shape
    diff = float(np.abs(output.images - expected).max())
    assert diff < TOL, f"max abs diff {diff} for {prompt['prompt']!r} {params}"


def test_alone_matches_diffusers(family):
    name, omni, pipe = family
    diffusers_class, cases = CASES[name]
    assert type(pipe) is diffusers_class and omni.core.model_info.family is DiffusersAdapterPipeline
    _, prompt, params = cases[0]
    (output,) = omni.generate([prompt], params, use_tqdm=False)
    check(pipe, output, prompt, params)
    assert output.num_steps == output.metrics.num_steps == expected_steps(pipe, params)


def test_co_batched_with_staggered_joins_matches_diffusers(family):
    """Requests join at steps 0-3 with different inputs; each equals diffusers, and every
    output of a request (progress and final) reports the steps it really runs."""
    name, omni, pipe = family
    core, adapter = omni.core, omni.core.executor.runner.pipeline
    cases = CASES[name][1]
    calls, forwards = adapter.forward_calls, adapter.forwards_run
    requests = [core.make_request(prompt, params) for _, prompt, params in cases]
    by_id = {r.request_id: (prompt, params) for r, (_, prompt, params) in zip(requests, cases)}
    plan = sorted(((join, r) for (join, _, _), r in zip(cases, requests)), key=lambda item: item[0])
    seen: dict[str, list] = {r.request_id: [] for r in requests}
    step = 0
    while plan or core.has_work():
        while plan and plan[0][0] <= step:
            core.add_request(plan.pop(0)[1])
        for output in core.step():
            seen[output.request_id].append(output)
        step += 1
    for request in requests:
        prompt, params = by_id[request.request_id]
        outputs = seen[request.request_id]
        steps = expected_steps(pipe, params)
        assert [o.num_steps for o in outputs] == [steps] * len(outputs) and len(outputs) == steps
        assert [o.step for o in outputs] == list(range(1, steps + 1)) and outputs[-1].finished
        check(pipe, outputs[-1], prompt, params)
    calls, forwards = adapter.forward_calls - calls, adapter.forwards_run - forwards
    assert forwards < 0.8 * calls, (calls, forwards)  # the same-size requests' forwards were joined
    assert core.executor.state_ids() == [] and adapter_threads() == []


def test_bad_input_images_fail_alone(family):
    """Each bad input fails with a line naming the field and the limit; the good request in the
    same call still matches diffusers."""
    name, omni, pipe = family
    _, good_prompt, good_params = CASES[name][1][0]
    bad = [
        ({"prompt": "x", "image": "photo.png"}, "prompt['image'] must be a PIL image, a uint8 array or a float array"),
        ({"prompt": "x", "image": np.zeros((0, 5, 3), np.uint8)}, "prompt['image'] has zero size (5x0)"),
        ({"prompt": "x", "image": np.zeros((8, 8), np.uint8)}, "prompt['image'] must be an array of shape (H, W, 3)"),
        ({"prompt": "x", "image": np.full((8, 8, 3), 2.0)}, "its values must lie in [0, 1]; got [2, 2]"),
        ({"prompt": "x", "image": np.zeros((8, 8, 3), np.int32)}, "must be uint8 (0-255) or float in [0, 1]"),
        ({"prompt": "x", "image": [picture(8, 8, 0)] * 5}, "prompt['image'] must hold 1 to 4 images, got 5"),
        (
            {"prompt": "x", "image": picture(128, 128, 0)},
            "prompt['image'] is 128x128 = 16384 pixels; this engine accepts at most 9216 pixels per input image "
            "(max_input_pixels)",
        ),
        (
            {"prompt": "x", "image": picture(64, 64, 0), "mask_image": _circle_mask(32, 64)},
            "prompt['mask_image'] is 64x32 but prompt['image'] is 64x64",
        ),
    ]
    outputs = omni.generate([prompt for prompt, _ in bad] + [good_prompt], good_params, use_tqdm=False)
    for output, (_, message) in zip(outputs, bad):
        assert output.error is not None and message in output.error, (message, output.error)
    check(pipe, outputs[-1], good_prompt, good_params)


def test_inpainting_with_a_mask_matches_diffusers(_preset_cache, tmp_path_factory):
    """FluxInpaintPipeline: image, mask_image and strength all reach diffusers' own __call__."""
    from pipelines.presets import export_preset

    path = export_preset("tiny-flux-inpaint", tmp_path_factory.mktemp("inpaint") / "inpaint", preset_size=True)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is diffusers.FluxInpaintPipeline
    image = Image.fromarray(picture(64, 64, 11))
    cases = [
        ({"prompt": "a round window", "image": image, "mask_image": _circle_mask(64, 64)}, 0.9, 12),
        ({"prompt": "a door", "image": picture(64, 64, 12), "mask_image": np.asarray(_circle_mask(64, 64))}, 0.7, 13),
        (
            {
                "prompt": "a lamp",
                "image": picture(64, 64, 13).astype(np.float32) / 255,
                "mask_image": np.asarray(_circle_mask(64, 64), dtype=np.float32) / 255,
            },
            0.8,
            14,
        ),
    ]
    with Omni(model=str(path), executor="inproc") as omni:
        params = [np_params(num_inference_steps=5, strength=s, seed=seed) for _, s, seed in cases]
        outputs = omni.generate([prompt for prompt, _, _ in cases], params, use_tqdm=False)
        (missing,) = omni.generate([{"prompt": "x", "image": image}], use_tqdm=False)
    for output, (prompt, _, _), p in zip(outputs, cases, params):
        check(pipe, output, prompt, p)
        assert output.num_steps == steps_after_strength(5, p.strength)
    assert "prompt['mask_image'] is required: FluxInpaintPipeline" in missing.error


def test_models_without_image_inputs_refuse_them(_preset_cache):
    """Checked from the model's configs at submission: no weights, no worker."""
    from engine.contract.request_fields import request_fields

    def error(model, prompt, params=SamplingParams()):
        params, fields = request_fields(prompt, params)
        with pytest.raises(ValueError) as excinfo:
            ModelInfo.load(model).validate(params, fields)
        return str(excinfo.value)

    image = picture(16, 16, 0)
    assert "prompt['image'] is not an input of FluxPipeline" in error("tiny-flux", {"prompt": "x", "image": image})
    assert "image is not an input of qwen-image models" in error("tiny-qwen-image", {"prompt": "x", "image": image})
    assert "SamplingParams.strength is not an input of FluxPipeline" in error(
        "tiny-flux", "x", SamplingParams(strength=0.5)
    )
    assert "prompt['mask_image'] is not an input of FluxImg2ImgPipeline" in error(
        "tiny-flux-img2img", {"prompt": "x", "image": image, "mask_image": image[:, :, 0]}
    )
    assert "prompt['image'] is required: FluxImg2ImgPipeline starts from an input image" in error(
        "tiny-flux-img2img", "x"
    )
    assert "prompt['image'] is a list of 2 images; FluxKontextPipeline takes one" in error(
        "tiny-flux-kontext", {"prompt": "x", "image": [image, image]}
    )
    ModelInfo.load("tiny-flux-kontext").validate(*request_fields({"prompt": "x", "image": [image]}, SamplingParams()))
    info = ModelInfo.load("tiny-flux-img2img")
    assert info.num_steps(SamplingParams(num_inference_steps=10, strength=0.55)) == 6  # 5.5 steps round up
    assert info.num_steps(SamplingParams(num_inference_steps=10)) == 6  # the pipeline's default strength, 0.6
    with pytest.raises(ValueError, match="strength x num_inference_steps = 1e-17 x 4 leaves no denoising step"):
        info.num_steps(SamplingParams(num_inference_steps=4, strength=1e-17))
    for strength in (0, -0.5, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"SamplingParams.strength must be a number in \(0, 1\]"):
            msgspec.structs.replace(SamplingParams(), strength=strength).validate()


def test_memory_estimate_counts_the_sizes_the_pipeline_works_at(_preset_cache):
    """Kontext generates at max_area (1024x1024 by default, whatever height and width say) and,
    with _auto_resize, encodes its input at about 1024x1024: the admission estimate and the
    token limit see those sizes, not the request's height and width."""
    from pipelines.diffusers_adapter import AUTO_RESIZE_PIXELS
    from pipelines.memory_estimate import read_vae_config, request_bytes

    info = ModelInfo.load("tiny-flux-kontext")
    image = picture(32, 48, 0)

    def size(params, prompt):
        from engine.contract.request_fields import request_fields

        params, fields = request_fields(prompt, params)
        info.validate(params, fields)
        return info.family.working_size(info, params, fields)

    assert size(SamplingParams(height=64, width=64), {"prompt": "x", "image": image}) == (
        1024,
        1024,
        (AUTO_RESIZE_PIXELS,),
    )
    small = SamplingParams(height=32, width=48, pipeline_args=kontext_args(32, 48))
    assert size(small, {"prompt": "x", "image": image}) == (32, 48, (32 * 48,))
    assert size(small, "x") == (32, 48, ())
    with pytest.raises(ValueError, match=r"pipeline_args\['max_area'\] must be an integer in \[256, 16777216\]"):
        size(SamplingParams(pipeline_args={"max_area": "big"}), "x")
    with pytest.raises(ValueError, match=r"2048x2048 \(the output's area is max_area.*16384 image tokens"):
        size(SamplingParams(pipeline_args={"max_area": 2048 * 2048}), "x")
    vae = read_vae_config(info.path)
    alone = request_bytes(1024, 1024, info.transformer_config, vae)
    assert request_bytes(1024, 1024, info.transformer_config, vae, input_pixels=(AUTO_RESIZE_PIXELS,)) > 2 * alone


def test_input_bytes_are_capped_per_request():
    """All input images of one request together stay within MAX_INPUT_BYTES (checked on views
    that allocate nothing)."""
    big = np.broadcast_to(np.zeros(1, np.uint8), (3000, 3000, 3))  # 27 MB each, within the pixel cap
    check_input_images({"image": [big, big], "mask_image": None})
    with pytest.raises(ValueError, match=f"at most {MAX_INPUT_BYTES} bytes"):
        check_input_images({"image": [big, big, big], "mask_image": None})
