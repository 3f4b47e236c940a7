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

A video counts its frames twice over: its transformer tokens are every latent frame's (a video
VAE compresses time too: Wan's 4x, so 81 frames are 21 latent frames), and its decode holds one
latent frame's worth of output frames of feature maps at a time (Wan's causal VAE decodes frame
by frame) plus the whole decoded video, OUTPUT_COPIES times (the decoder's output, its clamped
copy, the postprocessed float array and its numpy copy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HIDDEN_COPIES = 12  # live copies of the hidden states during one transformer block
FEATURE_COPIES = 24  # peak decode memory / largest VAE feature map, measured (see above), rounded up
MAX_TEXT_TOKENS = 1024  # Qwen-Image's text limit; prompts are shorter, this is an upper bound
OUTPUT_COPIES = 4  # float32 copies of the decoded pixels alive at once (see above)


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


def temporal_factor(vae: dict[str, Any]) -> int:
    """Frames per latent frame of a video VAE (Wan: 4; the first latent frame holds one frame)."""
    return int(vae.get("scale_factor_temporal") or 4)


def latent_frames(frames: int, vae: dict[str, Any]) -> int:
    return (frames - 1) // temporal_factor(vae) + 1


def request_bytes(
    height: int,
    width: int,
    transformer: dict[str, Any],
    vae: dict[str, Any],
    element_bytes: int = 4,
    rows: int = 2,
    input_pixels: tuple[int, ...] = (),
    frames: int | None = None,
) -> int:
    """Upper estimate of the activation bytes one request of this size (and, for a video, this
    many frames) needs at its peak. `input_pixels`: the input images as the pipeline encodes
    them (pixels each); their latent tokens are counted beside the output's (editing pipelines
    append them; image-to-image ones do not, so this bounds them from above), and each one's VAE
    encode like a decode."""
    stages = vae_stages(vae)
    scale = 2 ** (len(stages) - 1)
    latent_pixels = (height // scale) * (width // scale) + sum(p // scale**2 for p in input_pixels)
    patch = transformer.get("patch_size", 2)
    # Video transformers patch (time, height, width), e.g. Wan's (1, 2, 2).
    time_patch, patch_h, patch_w = patch if isinstance(patch, list) else (1, patch, patch)
    heads = int(transformer.get("num_attention_heads", 16))
    inner = heads * int(transformer.get("attention_head_dim", 64)) or int(transformer.get("hidden_size", 1024))
    depth = 1 if frames is None else -(-latent_frames(frames, vae) // int(time_patch))
    tokens = depth * (latent_pixels // (int(patch_h) * int(patch_w))) + MAX_TEXT_TOKENS
    forward = rows * (tokens * inner * HIDDEN_COPIES + heads * tokens * tokens) * element_bytes
    largest = max([height * width, *input_pixels])
    feature_maps = max(channels * largest // 4**i for i, channels in enumerate(stages))
    chunk = 1 if frames is None else min(frames, temporal_factor(vae))
    decode = feature_maps * chunk * FEATURE_COPIES * element_bytes
    output = (frames or 1) * height * width * 3 * 4 * OUTPUT_COPIES
    return max(forward, decode + output)
