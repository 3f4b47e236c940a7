"""How much activation memory one running request may need, from the model's configs alone.

The engine admits requests against a memory budget with this estimate, so that eight requests
at the largest size do not all start and then all fail with an allocator error. It is an upper
bound by design, computed from shapes (no weights loaded): per request the larger of

- one transformer forward over its rows (two with CFG): every token's hidden state held about a
  dozen times over (attention projections, MLP), plus one layer's attention score matrix as if
  materialised (no memory-efficient kernel assumed);
- its VAE decode: the largest feature map of the decoder (channels x pixels at some stage) times
  FEATURE_COPIES. That factor is measured, not derived: the Qwen-Image VAE decodes frame-causally
  with cached features, and tiny-qwen-image's decode peaked at 708 MB over its idle footprint at
  1024x1024 and 1169 MB at 4096x512 (~21x and ~17x its largest feature map; see
  `benchmarks/chaos.py --memory`). Attention inside the VAE runs through SDPA's memory-efficient
  kernels and adds no pixels-squared term.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HIDDEN_COPIES = 12  # live copies of the hidden states during one transformer block
FEATURE_COPIES = 24  # peak decode memory / largest VAE feature map, measured (see above), rounded up
MAX_TEXT_TOKENS = 1024  # Qwen-Image's text limit; prompts are shorter, this is an upper bound


def read_vae_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "vae" / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def vae_stages(vae: dict[str, Any]) -> list[int]:
    """Decoder channels per resolution stage, full resolution first."""
    if "base_dim" in vae:  # AutoencoderKLQwenImage / Wan: base_dim x dim_mult
        return [vae["base_dim"] * m for m in vae.get("dim_mult", [1, 2, 4, 4])]
    return list(vae.get("block_out_channels", [128, 256, 512, 512]))


def request_bytes(
    height: int,
    width: int,
    transformer: dict[str, Any],
    vae: dict[str, Any],
    element_bytes: int = 4,
    rows: int = 2,
    input_pixels: tuple[int, ...] = (),
) -> int:
    """Upper estimate of the activation bytes one request of this size needs at its peak.
    `input_pixels`: the input images as the pipeline encodes them (pixels each); their latent
    tokens are counted beside the output's (editing pipelines append them; image-to-image ones
    do not, so this bounds them from above), and each one's VAE encode like a decode."""
    stages = vae_stages(vae)
    scale = 2 ** (len(stages) - 1)
    latent_pixels = (height // scale) * (width // scale) + sum(p // scale**2 for p in input_pixels)
    patch = int(transformer.get("patch_size", 2))
    heads = int(transformer.get("num_attention_heads", 16))
    inner = heads * int(transformer.get("attention_head_dim", 64)) or int(transformer.get("hidden_size", 1024))
    tokens = latent_pixels // (patch * patch) + MAX_TEXT_TOKENS
    forward = rows * (tokens * inner * HIDDEN_COPIES + heads * tokens * tokens) * element_bytes
    largest = max([height * width, *input_pixels])
    feature_maps = max(channels * largest // 4**i for i, channels in enumerate(stages))
    decode = feature_maps * FEATURE_COPIES * element_bytes
    return max(forward, decode)
