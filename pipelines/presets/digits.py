"""The `digits-qwen-image` preset: a Qwen-Image-family pipeline with trained weights that draws
handwritten digits named by the prompt.

Every other preset has random weights, so its images are noise; this one's VAE and transformer
were trained on scikit-learn's digits (`digits_training.py`, which says how) and their weights
ship in `digits/`. The tokenizer and text encoder are the seeded tiny ones of `tiny-qwen-image`,
frozen during training, so they are rebuilt here, not stored. The architecture is written once,
here, for both the trainer and the loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines.presets.qwen_image import qwen_scheduler, qwen_text_parts, qwen_transformer, qwen_vae

WEIGHTS_DIR = Path(__file__).parent / "digits"
VAE_FILE = "vae.safetensors"
TRANSFORMER_FILE = "transformer.safetensors"
# The VAE's latent statistics (measured on the training set after the VAE was trained) and how
# the weights were made; the pipeline normalises latents with the former.
INFO_FILE = "training.json"

VAE_BASE_DIM = 8
TRANSFORMER_SIZE = dict(layers=4, heads=3, head_dim=32, axes=(8, 12, 12))


def digits_vae(latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4):
    return qwen_vae(base_dim=VAE_BASE_DIM, latents_mean=latents_mean, latents_std=latents_std)


def digits_transformer():
    return qwen_transformer(**TRANSFORMER_SIZE)


def _load_weights(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the digits-qwen-image weights ship with the package "
            "(python -m pipelines.presets.digits_training --out DIR makes them)"
        )
    state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    module.load_state_dict(state, strict=True)
    return module.eval()


def digits_qwen_image(weights_dir: Path = WEIGHTS_DIR):
    """QwenImagePipeline with the trained digits VAE and transformer from `weights_dir`."""
    from diffusers import QwenImagePipeline

    info = json.loads((weights_dir / INFO_FILE).read_text())
    tokenizer, text_encoder = qwen_text_parts()
    vae = digits_vae(info["latents_mean"], info["latents_std"])
    return QwenImagePipeline(
        scheduler=qwen_scheduler(),
        vae=_load_weights(vae, weights_dir / VAE_FILE),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=_load_weights(digits_transformer(), weights_dir / TRANSFORMER_FILE),
    )
