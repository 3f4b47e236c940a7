"""Presets: complete diffusers pipelines with seeded random weights, written as model directories.

No model hub is reachable, so every model stepweave serves in tests and benchmarks is built here
from configs: real diffusers/transformers classes, tiny sizes, fixed seeds. The result is an
ordinary diffusers directory that `DiffusionPipeline.from_pretrained` loads as the real pipeline
class, so the engine exercises the same loading and inference code a downloaded model would.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

# Bump when any builder changes output, so stale caches are never reused.
CACHE_VERSION = "v1"

# Latent channels of the qwen-image presets' VAE (the real model has 16).
_QWEN_Z_DIM = 4
# The tiny text encoder's width; the transformer's joint_attention_dim must equal it.
_TEXT_HIDDEN = 32


@dataclass(frozen=True)
class PresetSpec:
    """What a preset is, without building it (the engine reads defaults before loading)."""

    family: str  # "qwen-image" or "dit"
    default_height: int
    default_width: int
    builder: Callable[[], Any]  # () -> a diffusers pipeline with seeded random weights
    description: str


def _seeded(seed: int, make: Callable[[], Any]) -> Any:
    """Build one component under its own seed, in float32, without disturbing the caller's RNG
    stream or default dtype (so exports are identical whatever ran before)."""
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            module = make()
        finally:
            torch.set_default_dtype(dtype)
    if isinstance(module, torch.nn.Module):
        module.eval()
    return module


def _init_linears_(model: torch.nn.Module, gain: dict[str, float]) -> None:
    """Re-draw every Linear as N(0, g^2 / fan_in) with zero bias (g=1 unless a name fragment in
    `gain` matches). torch's default draws ~1/sqrt(3) smaller, which makes attention (the only
    path the prompt takes into the image stream) so weak that prompts barely change the output;
    unit-variance weights keep the prompt visible while the output projection stays modest."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                g = next((v for k, v in gain.items() if k in name), 1.0)
                module.weight.normal_(0.0, g / module.in_features**0.5)
                if module.bias is not None:
                    module.bias.zero_()


# -- qwen-image ------------------------------------------------------------------------------


def _qwen_text_encoder(vocab_size: int, special_ids: dict[str, int]):
    """A tiny Qwen2.5-VL: the pipeline only reads the last hidden state of the text tower, but
    the class (and its vision tower) must be the real one for diffusers to load it."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = 2
    head_dim = _TEXT_HIDDEN // heads
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=_TEXT_HIDDEN,
            intermediate_size=2 * _TEXT_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            # mrope splits the rotary half-dim into (temporal, height, width) sections.
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            rope_theta=1000000.0,
            bos_token_id=special_ids["<|endoftext|>"],
            eos_token_id=special_ids["<|im_end|>"],
            pad_token_id=special_ids["<|endoftext|>"],
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=_TEXT_HIDDEN,
            intermediate_size=2 * _TEXT_HIDDEN,
            num_heads=heads,
            out_hidden_size=_TEXT_HIDDEN,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[0],
        ),
        image_token_id=special_ids["<|image_pad|>"],
        video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"],
        vision_end_token_id=special_ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) * 2 == head_dim
    return Qwen2_5_VLForConditionalGeneration(config)


def _qwen_vae():
    """A tiny Qwen-Image VAE; three spatial halvings keep vae_scale_factor at 8."""
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=_QWEN_Z_DIM,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=[0.05, -0.05, 0.1, -0.1],
        latents_std=[1.0, 0.9, 1.1, 1.2],
    )
    # Default init decodes to a narrow grey band; more contrast makes differences visible.
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(2.0)
    return vae


def _qwen_scheduler():
    """Qwen-Image's own flow-matching schedule (resolution-dependent exponential shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )


def _qwen_image(*, layers: int, heads: int, head_dim: int, axes: tuple[int, int, int]):
    """A QwenImagePipeline whose transformer has the given size; the rest is shared and tiny."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from pipelines.tokenizer_training import SPECIAL_TOKENS, build_qwen_tokenizer

    assert sum(axes) == head_dim and all(a % 2 == 0 for a in axes), "rope axes must tile the head dim"
    tokenizer = build_qwen_tokenizer()
    special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # round up: room for every token id

    def transformer():
        model = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * _QWEN_Z_DIM,  # 2x2 latent patches are packed into channels
            out_channels=_QWEN_Z_DIM,
            num_layers=layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=_TEXT_HIDDEN,
            axes_dims_rope=axes,
        )
        # Stronger AdaLN modulation (gates) lets attention output through; a smaller output
        # projection keeps velocity predictions around unit scale.
        _init_linears_(model, {"_mod": 2.0, "proj_out": 0.5})
        return model

    return QwenImagePipeline(
        scheduler=_qwen_scheduler(),
        vae=_seeded(2, _qwen_vae),
        text_encoder=_seeded(3, lambda: _qwen_text_encoder(vocab_size, special_ids)),
        tokenizer=tokenizer,
        transformer=_seeded(1, transformer),
    )


# -- DiT -------------------------------------------------------------------------------------


def _tiny_dit():
    """A class-conditional DiT: learned sigma (8 output channels), class 1000 = the null class."""
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    def transformer():
        return DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_zero",
        )

    def vae():
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
            sample_size=64,
        )

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="epsilon",
    )
    return DiTPipeline(transformer=_seeded(1, transformer), vae=_seeded(2, vae), scheduler=scheduler)


PRESETS: dict[str, PresetSpec] = {
    "tiny-qwen-image": PresetSpec(
        "qwen-image",
        64,
        64,
        lambda: _qwen_image(layers=2, heads=2, head_dim=16, axes=(4, 6, 6)),
        "QwenImagePipeline, 2-layer 32-wide transformer; 64x64 (16 image tokens); for tests",
    ),
    "small-qwen-image": PresetSpec(
        "qwen-image",
        128,
        128,
        lambda: _qwen_image(layers=4, heads=4, head_dim=32, axes=(8, 12, 12)),
        "QwenImagePipeline, ~2.5M-parameter transformer; 128x128 (64 image tokens)",
    ),
    # 160x160 = 100 image tokens: with ~75M parameters a batch-8 forward then costs ~0.6 s on
    # one CPU thread, enough compute that scheduling overhead is small beside it.
    "medium-qwen-image": PresetSpec(
        "qwen-image",
        160,
        160,
        lambda: _qwen_image(layers=8, heads=8, head_dim=64, axes=(16, 24, 24)),
        "QwenImagePipeline, ~75M-parameter transformer (compute-bound on CPU); 160x160",
    ),
    "tiny-dit": PresetSpec(
        "dit",
        64,
        64,
        _tiny_dit,
        "DiTPipeline, 2-layer DiT with learned sigma + tiny AutoencoderKL; 64x64, 1000 classes",
    ),
}


def _spec(name: str) -> PresetSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def export_preset(name: str, directory: str | os.PathLike) -> Path:
    """Build preset `name` and write it as a diffusers directory (same bytes every time)."""
    spec = _spec(name)
    directory = Path(directory)
    pipe = spec.builder()
    pipe.save_pretrained(str(directory), safe_serialization=True)
    meta = {
        "preset": name,
        "family": spec.family,
        "default_height": spec.default_height,
        "default_width": spec.default_width,
    }
    (directory / "stepweave.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def cache_root() -> Path:
    return Path(os.environ.get("STEPWEAVE_CACHE_DIR") or Path.home() / ".cache" / "stepweave" / "presets")


def preset_dir(name: str) -> Path:
    """The cached export of `name`, built on first use.

    Several processes may ask at once: each builds into its own temporary sibling and renames
    it into place; a rename onto a directory another process already installed fails, and the
    loser throws its copy away. A directory at the target is therefore always complete.
    """
    _spec(name)
    root = cache_root()
    target = root / f"{name}-{CACHE_VERSION}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    try:
        export_preset(name, scratch)
        os.chmod(scratch, 0o755)  # mkdtemp makes it private; the cache is shared
        try:
            os.rename(scratch, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return target
