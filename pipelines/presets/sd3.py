"""The SD3 preset: `StableDiffusion3Pipeline` with a tiny MMDiT, two CLIP text towers with
projections (CLIP-L and CLIP-G in the real model; here two widths), a T5 encoder, a 16-channel KL
VAE and SD3's fixed-shift flow-matching schedule.

SD3 joins the two CLIPs' token states along the channels, zero-pads them to the T5 width and
stacks them before the T5 tokens, so the T5 width must be at least the two CLIP widths together;
the pooled prompt is both CLIPs' projections side by side.
"""

from __future__ import annotations

from pipelines.presets.common import init_linears_, seeded
from pipelines.presets.components import LATENT_CHANNELS, clip_text_encoder, kl_vae, t5_encoder

_CLIP_L_HIDDEN = 32
_CLIP_G_HIDDEN = 48
_T5_HIDDEN = 96  # the transformer's joint_attention_dim
# diffusers' default max_sequence_length for SD3's T5 prompt is 256.
_T5_MAX_LENGTH = 256
_INNER = 32  # 2 heads of 16


def _scheduler():
    """SD3's schedule: flow matching with a fixed shift of 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def _transformer():
    """Two joint blocks; sample_size 8 latents is 64 pixels, the pipeline's default size, and
    positional embeddings cover up to 32x32 patches (512 pixels)."""
    from diffusers import SD3Transformer2DModel

    assert _CLIP_L_HIDDEN + _CLIP_G_HIDDEN <= _T5_HIDDEN, "CLIP states are padded to the T5 width"
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=_INNER // 2,
        num_attention_heads=2,
        joint_attention_dim=_T5_HIDDEN,
        caption_projection_dim=_INNER,
        pooled_projection_dim=_CLIP_L_HIDDEN + _CLIP_G_HIDDEN,
        pos_embed_max_size=32,
    )
    init_linears_(model, {"norm": 2.0, "proj_out": 0.5})
    return model


def tiny_sd3():
    """A StableDiffusion3Pipeline whose every component is tiny and seeded; both CLIP towers
    share one trained tokenizer (the real CLIP-L and CLIP-G vocabularies are the same too)."""
    from diffusers import StableDiffusion3Pipeline

    from pipelines.presets.tokenizer_training import build_clip_tokenizer, build_t5_tokenizer

    tokenizer = build_clip_tokenizer()
    tokenizer_3 = build_t5_tokenizer(_T5_MAX_LENGTH)
    return StableDiffusion3Pipeline(
        transformer=seeded(1, _transformer),
        scheduler=_scheduler(),
        vae=seeded(2, lambda: kl_vae(scaling_factor=1.5305, shift_factor=0.0609)),
        text_encoder=seeded(3, lambda: clip_text_encoder(tokenizer, hidden=_CLIP_L_HIDDEN, projection=_CLIP_L_HIDDEN)),
        tokenizer=tokenizer,
        text_encoder_2=seeded(
            4, lambda: clip_text_encoder(tokenizer, hidden=_CLIP_G_HIDDEN, projection=_CLIP_G_HIDDEN)
        ),
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=seeded(5, lambda: t5_encoder(tokenizer_3, d_model=_T5_HIDDEN)),
        tokenizer_3=tokenizer_3,
    )
