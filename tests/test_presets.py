"""Presets export as real diffusers directories that diffusers' own pipelines load and run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines.model_info import ModelInfo
from pipelines.presets import PRESETS, export_preset, preset_dir

TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
    "<|im_end|>\n<|im_start|>assistant\n"
)


# Presets of families served by the generic diffusers adapter:
# preset -> (pipeline class, call options without CFG, call options with CFG and a negative prompt)
GENERIC = {
    "tiny-flux": ("FluxPipeline", {}, {"negative_prompt": "blurry", "true_cfg_scale": 4.0}),
    "tiny-sd3": (
        "StableDiffusion3Pipeline",
        {"guidance_scale": 1.0},
        {"negative_prompt": "blurry", "guidance_scale": 4.0},
    ),
    "tiny-z-image": ("ZImagePipeline", {"guidance_scale": 0.0}, {"negative_prompt": "blurry", "guidance_scale": 4.0}),
}


@pytest.fixture(scope="module")
def qwen_export(tmp_path_factory):
    return export_preset("tiny-qwen-image", tmp_path_factory.mktemp("presets") / "tiny-qwen-image")


@pytest.fixture(scope="module")
def dit_export(tmp_path_factory):
    return export_preset("tiny-dit", tmp_path_factory.mktemp("presets") / "tiny-dit")


def _load(path):
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_image(images, side):
    assert images.shape == (1, side, side, 3)
    assert np.isfinite(images).all()
    # random weights must still give an image, not a flat or fully clipped one
    assert 0.02 < images.std() and ((images <= 0) | (images >= 1)).mean() < 0.5


def test_stepweave_json_matches_spec(qwen_export, dit_export):
    for name, path in (("tiny-qwen-image", qwen_export), ("tiny-dit", dit_export)):
        spec = PRESETS[name]
        meta = json.loads((path / "stepweave.json").read_text())
        assert meta == {"preset": name, "family": spec.family}


def test_preset_cache_records_the_preset_size(_preset_cache):
    for name in ("tiny-qwen-image", "tiny-dit"):
        info = ModelInfo.load(name)
        assert (info.default_height, info.default_width) == (PRESETS[name].default_height, PRESETS[name].default_width)


def _diffusers_default_size(pipe) -> tuple[int, int]:
    """The size a diffusers pipeline generates when the call gives none, as its __call__ computes it."""
    if hasattr(pipe, "default_sample_size"):  # Qwen-Image: a fixed 128 latents
        side = pipe.default_sample_size * pipe.vae_scale_factor
    else:  # DiT has no size argument: the transformer's sample size, through the VAE's downsampling
        side = pipe.transformer.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return side, side


def test_exported_preset_defaults_to_the_diffusers_size(qwen_export, dit_export):
    """Same directory, same seed, no sizes given: stepweave must pick the size diffusers picks."""
    for path in (qwen_export, dit_export):
        info = ModelInfo.load(path)
        assert (info.default_height, info.default_width) == _diffusers_default_size(_load(path))


def test_tiny_qwen_image_runs_in_diffusers(qwen_export):
    import diffusers

    pipe = _load(qwen_export)
    assert type(pipe) is diffusers.QwenImagePipeline
    assert pipe.vae_scale_factor == 8
    assert pipe.transformer.dtype == torch.float32
    common = dict(height=64, width=64, num_inference_steps=2, output_type="np")
    images = pipe(
        prompt="a lighthouse on a cliff at sunset",
        negative_prompt="blurry",
        true_cfg_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        **common,
    ).images
    _check_image(images, 64)
    # the prompt must reach the image, or prompt mix-ups would go unnoticed
    other = pipe(prompt="a red cat asleep on a sofa", generator=torch.Generator().manual_seed(0), **common).images
    plain = pipe(
        prompt="a lighthouse on a cliff at sunset", generator=torch.Generator().manual_seed(0), **common
    ).images
    assert np.abs(other - plain).mean() > 1e-3

    pipe.scheduler = diffusers.UniPCMultistepScheduler.from_config(
        pipe.scheduler.config, use_flow_sigmas=True, prediction_type="flow_prediction"
    )
    images = pipe(
        prompt="a lighthouse",
        negative_prompt="blurry",
        true_cfg_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        **common,
    ).images
    _check_image(images, 64)


def test_qwen_tokenizer_keeps_the_template_prefix_at_34_tokens(qwen_export):
    """QwenImagePipeline drops the first 34 tokens: exactly the template's system prefix."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(qwen_export / "tokenizer"))
    prefix = TEMPLATE.split("{}")[0]
    assert len(tokenizer(prefix).input_ids) == 34
    ids = tokenizer(TEMPLATE.format("a lighthouse")).input_ids
    assert tokenizer.decode(ids[34:], skip_special_tokens=True).startswith("a lighthouse")
    assert tokenizer.pad_token is not None
    config = json.loads((qwen_export / "text_encoder" / "config.json").read_text())
    vocab_size = config.get("text_config", config).get("vocab_size") or config["vocab_size"]
    assert len(tokenizer) <= vocab_size


@pytest.mark.parametrize("scheduler", [None, "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler"])
def test_tiny_dit_runs_in_diffusers(dit_export, scheduler):
    import diffusers

    pipe = _load(dit_export)
    assert type(pipe) is diffusers.DiTPipeline
    assert pipe.transformer.config.num_embeds_ada_norm == 1000
    if scheduler is None:
        assert type(pipe.scheduler) is diffusers.DPMSolverMultistepScheduler
    else:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    images = pipe(
        class_labels=[3],
        guidance_scale=4.0,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    _check_image(images, 64)


def test_export_is_bit_deterministic(qwen_export, dit_export, tmp_path):
    torch.manual_seed(1234)  # the caller's RNG state must not leak into the weights
    before = torch.random.get_rng_state()
    again_qwen = export_preset("tiny-qwen-image", tmp_path / "q")
    again_dit = export_preset("tiny-dit", tmp_path / "d")
    assert torch.equal(torch.random.get_rng_state(), before)  # nor may export disturb it
    for first, second in (
        (
            qwen_export / "transformer/diffusion_pytorch_model.safetensors",
            again_qwen / "transformer/diffusion_pytorch_model.safetensors",
        ),
        (qwen_export / "text_encoder/model.safetensors", again_qwen / "text_encoder/model.safetensors"),
        (
            qwen_export / "vae/diffusion_pytorch_model.safetensors",
            again_qwen / "vae/diffusion_pytorch_model.safetensors",
        ),
        (
            dit_export / "transformer/diffusion_pytorch_model.safetensors",
            again_dit / "transformer/diffusion_pytorch_model.safetensors",
        ),
    ):
        a, b = load_file(first), load_file(second)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert (qwen_export / "tokenizer/tokenizer.json").read_bytes() == (
        again_qwen / "tokenizer/tokenizer.json"
    ).read_bytes()


def test_unknown_preset_names_the_known_ones(tmp_path):
    for call in (lambda: export_preset("no-such-model", tmp_path), lambda: preset_dir("no-such-model")):
        with pytest.raises(ValueError) as excinfo:
            call()
        for name in PRESETS:
            assert name in str(excinfo.value)


def test_preset_dir_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPWEAVE_CACHE_DIR", str(tmp_path))
    path = preset_dir("tiny-dit")
    assert path == tmp_path / "tiny-dit-v1"
    assert (path / "model_index.json").is_file() and (path / "stepweave.json").is_file()
    stamp = (path / "model_index.json").stat().st_mtime_ns
    assert preset_dir("tiny-dit") == path
    assert (path / "model_index.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-dit-v1"]  # no scratch left behind


def test_preset_specs():
    assert set(PRESETS) >= {"tiny-qwen-image", "small-qwen-image", "medium-qwen-image", "tiny-dit", *GENERIC}
    for spec in PRESETS.values():
        assert spec.family in ("qwen-image", "dit", "diffusers")
        assert spec.default_height % 16 == 0 and spec.default_width % 16 == 0
        assert spec.description


# -- presets of families served by the generic diffusers adapter ------------------------------


@pytest.fixture(scope="module", params=sorted(GENERIC))
def generic_export(request, tmp_path_factory):
    """(name, directory): each generic-family preset exported once for this module."""
    name = request.param
    return name, export_preset(name, tmp_path_factory.mktemp("presets") / name)


def _generate(pipe, prompt, **options):
    return pipe(
        prompt=prompt,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **options,
    ).images


def test_generic_preset_runs_in_diffusers(generic_export):
    import diffusers

    name, path = generic_export
    class_name, plain, cfg = GENERIC[name]
    spec = PRESETS[name]
    assert spec.family == "diffusers" and (spec.default_height, spec.default_width) == (64, 64)
    assert json.loads((path / "stepweave.json").read_text()) == {"preset": name, "family": "diffusers"}
    pipe = _load(path)
    assert type(pipe) is getattr(diffusers, class_name)
    assert pipe.vae_scale_factor == 8 and pipe.transformer.dtype == torch.float32
    images = _generate(pipe, "a lighthouse on a cliff at sunset", **plain)
    _check_image(images, 64)
    # the prompt must reach the image, or prompt mix-ups would go unnoticed
    other = _generate(pipe, "a red cat asleep on a sofa", **plain)
    assert np.abs(other - images).mean() > 1e-3
    guided = _generate(pipe, "a lighthouse on a cliff at sunset", **cfg)
    _check_image(guided, 64)
    assert np.abs(guided - images).mean() > 1e-3  # the negative branch ran and counted


def test_generic_preset_text_encoders_cover_their_tokenizers(generic_export):
    """Every id a tokenizer can emit has an embedding row, and CLIP pools at the real end token."""
    from transformers import AutoConfig, AutoTokenizer

    _, path = generic_export
    index = json.loads((path / "model_index.json").read_text())
    for slot in (k for k, v in index.items() if k.startswith("tokenizer") and v[0] is not None):
        tokenizer = AutoTokenizer.from_pretrained(str(path / slot))
        config = AutoConfig.from_pretrained(str(path / slot.replace("tokenizer", "text_encoder")))
        assert len(tokenizer) <= config.vocab_size, slot
        assert tokenizer.pad_token is not None, slot
        if config.model_type.startswith("clip"):
            assert config.eos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id
            assert tokenizer.model_max_length == config.max_position_embeddings == 77


def test_generic_preset_export_is_bit_deterministic(generic_export, tmp_path):
    name, path = generic_export
    torch.manual_seed(1234)  # the caller's RNG state must not leak into the weights
    before = torch.random.get_rng_state()
    again = export_preset(name, tmp_path / name)
    assert torch.equal(torch.random.get_rng_state(), before)  # nor may export disturb it
    files = sorted(p.relative_to(path) for p in path.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert any(f.suffix == ".safetensors" for f in files)
    for file in files:
        assert (path / file).read_bytes() == (again / file).read_bytes(), file


def test_trained_tokenizers_are_the_same_in_every_process():
    """Tokenizer training must not depend on hash order (tokenizers' own trainers do, which is why
    the CLIP and T5 vocabularies are learnt in Python): compare with a process of another hash seed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "from pipelines.presets import tokenizer_training as t; "
        "print(repr((t._clip_merges(), t._t5_pieces(), t._trained_json())))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, check=True)
    from pipelines.presets import tokenizer_training as t

    assert run.stdout.strip() == repr((t._clip_merges(), t._t5_pieces(), t._trained_json()))
