"""Tiny text encoders and VAE that the FLUX, SD3 and Z-Image presets share.

These families reuse the same building blocks (CLIP and T5 text towers, a 16-channel KL VAE with
a scale and a shift), so each is written once here, with its size as arguments, and every preset
module picks the sizes its transformer needs. Builders only: seeding is the caller's (`seeded`).
"""

from __future__ import annotations

# Latent channels of the FLUX/SD3/Z-Image VAE, as in the real models.
LATENT_CHANNELS = 16


def vocab_rows(tokenizer) -> int:
    """Embedding rows for `tokenizer`: its length rounded up to a multiple of 64, as real models pad."""
    return -(-len(tokenizer) // 64) * 64


def clip_text_encoder(tokenizer, *, hidden: int, projection: int | None = None):
    """A tiny CLIP text tower: CLIPTextModel, or CLIPTextModelWithProjection when `projection` is
    given. Its pooled output is read at the first end token, so the ids must be the tokenizer's."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_rows(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)


def t5_encoder(tokenizer, *, d_model: int, umt5: bool = False):
    """A tiny T5 v1.1 encoder (gated GELU feed-forward, as in the T5-XXL these pipelines use), or
    with `umt5` its UMT5 variant (per-layer relative position buckets: what WanPipeline loads)."""
    import transformers

    config_class, model_class = ("UMT5Config", "UMT5EncoderModel") if umt5 else ("T5Config", "T5EncoderModel")
    config = getattr(transformers, config_class)(
        vocab_size=vocab_rows(tokenizer),
        d_model=d_model,
        d_kv=d_model // 2,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return getattr(transformers, model_class)(config)


def kl_vae(*, scaling_factor: float, shift_factor: float):
    """A tiny AutoencoderKL with 16 latent channels and no quant convs (like the FLUX and SD3
    VAEs); four levels keep vae_scale_factor at 8."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=LATENT_CHANNELS,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # Default init decodes to a narrow grey band; more contrast makes differences visible.
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(2.0)
    return vae
