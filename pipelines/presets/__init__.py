"""Presets: complete diffusers pipelines with seeded random weights, written as model directories.

No model hub is reachable, so every model stepweave serves in tests and benchmarks is built here
from configs: real diffusers/transformers classes, tiny sizes, fixed seeds. The result is an
ordinary diffusers directory that `DiffusionPipeline.from_pretrained` loads as the real pipeline
class, so the engine exercises the same loading and inference code a downloaded model would.

This package holds the preset table and the export/cache logic; each family's builder lives in
its own module (`qwen_image`, `digits`, `dit`, `flux`, `sd3`, `z_image`, `wan`), the parts several families share
in `components`, the seeding helpers in `common`, and the tokenizers in `tokenizer_training`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from pipelines.presets.common import PresetSpec
from pipelines.presets.digits import digits_qwen_image
from pipelines.presets.dit import tiny_dit
from pipelines.presets.flux import tiny_flux
from pipelines.presets.qwen_image import qwen_image
from pipelines.presets.sd3 import tiny_sd3
from pipelines.presets.wan import tiny_wan
from pipelines.presets.z_image import tiny_z_image

# Bump when any builder changes output (retrained digits weights included), so stale caches are never reused.
CACHE_VERSION = "v1"

PRESETS: dict[str, PresetSpec] = {
    # The one preset with trained weights (committed in presets/digits/): it draws the
    # handwritten digit its prompt names. The embedded default of `stepweave generate`.
    "digits-qwen-image": PresetSpec(
        "qwen-image",
        32,
        32,
        digits_qwen_image,
        "QwenImagePipeline trained on scikit-learn's handwritten digits; 32x32 (4 image tokens)",
    ),
    "tiny-qwen-image": PresetSpec(
        "qwen-image",
        64,
        64,
        lambda: qwen_image(layers=2, heads=2, head_dim=16, axes=(4, 6, 6)),
        "QwenImagePipeline, 2-layer 32-wide transformer; 64x64 (16 image tokens); for tests",
    ),
    "small-qwen-image": PresetSpec(
        "qwen-image",
        128,
        128,
        lambda: qwen_image(layers=4, heads=4, head_dim=32, axes=(8, 12, 12)),
        "QwenImagePipeline, ~2.5M-parameter transformer; 128x128 (64 image tokens)",
    ),
    # 160x160 = 100 image tokens: with ~75M parameters a batch-8 forward then costs ~0.6 s on
    # one CPU thread, enough compute that scheduling overhead is small beside it.
    "medium-qwen-image": PresetSpec(
        "qwen-image",
        160,
        160,
        lambda: qwen_image(layers=8, heads=8, head_dim=64, axes=(16, 24, 24)),
        "QwenImagePipeline, ~75M-parameter transformer (compute-bound on CPU); 160x160",
    ),
    # Qwen-Image's real transformer widths (3072 = 24 heads x 128, rope axes 16/56/56) and real
    # VAE, with 2 of its 60 blocks and a tiny text encoder, random weights saved in bf16 (~1.5 GB):
    # a step at 1024x1024 costs what two blocks of the real model cost. For GPUs
    # (benchmarks/gpu_check.sh); far too slow for a CPU.
    "gpu-qwen-image": PresetSpec(
        "qwen-image",
        1024,
        1024,
        lambda: qwen_image(layers=2, heads=24, head_dim=128, axes=(16, 56, 56), real_vae=True, dtype=torch.bfloat16),
        "QwenImagePipeline at the real model's widths (2 of 60 blocks, ~0.7B transformer parameters), real VAE, bf16",
    ),
    "tiny-dit": PresetSpec(
        "dit",
        64,
        64,
        tiny_dit,
        "DiTPipeline, 2-layer DiT with learned sigma + tiny AutoencoderKL; 64x64, 1000 classes",
    ),
    # Families without a dedicated stepweave module, served through the generic diffusers adapter.
    "tiny-flux": PresetSpec(
        "diffusers",
        64,
        64,
        tiny_flux,
        "FluxPipeline, 2+2-block 32-wide transformer with guidance embedding, CLIP + T5; 64x64 (16 image tokens)",
    ),
    # FLUX's image-input pipelines on tiny-flux's components (the same weights).
    "tiny-flux-img2img": PresetSpec(
        "diffusers",
        64,
        64,
        lambda: tiny_flux("FluxImg2ImgPipeline"),
        "FluxImg2ImgPipeline on tiny-flux's components: image-to-image with strength; 64x64",
    ),
    "tiny-flux-kontext": PresetSpec(
        "diffusers",
        64,
        64,
        lambda: tiny_flux("FluxKontextPipeline"),
        "FluxKontextPipeline on tiny-flux's components: image editing (the input image's tokens join the "
        "sequence); 64x64",
    ),
    "tiny-flux-inpaint": PresetSpec(
        "diffusers",
        64,
        64,
        lambda: tiny_flux("FluxInpaintPipeline"),
        "FluxInpaintPipeline on tiny-flux's components: inpainting with image, mask_image and strength; 64x64",
    ),
    "tiny-sd3": PresetSpec(
        "diffusers",
        64,
        64,
        tiny_sd3,
        "StableDiffusion3Pipeline, 2-block 32-wide MMDiT, two CLIPs + T5; 64x64 (16 image tokens)",
    ),
    "tiny-z-image": PresetSpec(
        "diffusers",
        64,
        64,
        tiny_z_image,
        "ZImagePipeline, 2-layer 32-wide single-stream transformer, Qwen3 text model; 64x64 (16 image tokens)",
    ),
    # Text-to-video: 9 frames (3 latent frames) of 32x32, 12 video tokens.
    "tiny-wan21": PresetSpec(
        "diffusers",
        32,
        32,
        lambda: tiny_wan(two_experts=False),
        "WanPipeline (Wan 2.1: one 2-layer 32-wide transformer), UMT5, causal video VAE; 9 frames of 32x32",
        default_num_frames=9,
    ),
    "tiny-wan22": PresetSpec(
        "diffusers",
        32,
        32,
        lambda: tiny_wan(two_experts=True),
        "WanPipeline (Wan 2.2: transformer and transformer_2 split at boundary_ratio 0.875); 9 frames of 32x32",
        default_num_frames=9,
    ),
}


def _spec(name: str) -> PresetSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def export_preset(name: str, directory: str | os.PathLike, preset_size: bool = False) -> Path:
    """Build preset `name` and write it as a diffusers directory (same bytes every time).

    An exported directory defaults to the image size diffusers gives it, so that "same
    directory, same seed" matches diffusers without explicit sizes (Qwen-Image and FLUX fix
    theirs at 128 latents, 1024x1024, whatever the config says). Only the preset's own cache
    (`preset_size=True`, what `model="tiny-qwen-image"` loads) records its small test size."""
    spec = _spec(name)
    directory = Path(directory)
    pipe = spec.builder()
    with _quiet_saving():
        pipe.save_pretrained(str(directory), safe_serialization=True)
    meta: dict = {"preset": name, "family": spec.family}
    if preset_size:
        meta.update(default_height=spec.default_height, default_width=spec.default_width)
        if spec.default_num_frames is not None:
            meta.update(default_num_frames=spec.default_num_frames)
    (directory / "stepweave.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


@contextlib.contextmanager
def _quiet_saving():
    """transformers shows a "Writing model shards" bar per text encoder: noise in the middle of
    a user's first `stepweave generate`, which builds the preset it asks for."""
    import transformers

    shown = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers.utils.logging.enable_progress_bar()


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
        export_preset(name, scratch, preset_size=True)
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
