"""The FLUX preset: `FluxPipeline` with a tiny dual-stream/single-stream transformer, a CLIP text
tower (pooled prompt), a T5 encoder (prompt sequence), a 16-channel KL VAE and FLUX's
resolution-shifted flow-matching schedule.

The transformer embeds a guidance scale, as FLUX.1-dev does (distilled guidance: one forward per
step); true CFG with a negative prompt (`true_cfg_scale`) still runs as a second forward.
"""

from __future__ import annotations

from pipelines.presets.common import init_linears_, seeded
from pipelines.presets.components import LATENT_CHANNELS, clip_text_encoder, kl_vae, t5_encoder

_CLIP_HIDDEN = 32  # the transformer's pooled_projection_dim
_T5_HIDDEN = 32  # the transformer's joint_attention_dim
# The prompt sequence is padded to this many T5 tokens (diffusers' default is 512).
_T5_MAX_LENGTH = 512


def _scheduler():
    """FLUX.1's schedule: flow matching with a shift that grows with the image token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _transformer():
    """Two dual-stream and two single-stream blocks, 2 heads of 16; 2x2 latent patches are packed
    into channels by the pipeline, so 4 * 16 input channels with patch_size 1."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_HIDDEN,
        pooled_projection_dim=_CLIP_HIDDEN,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    init_linears_(model, {"norm": 2.0, "proj_out": 0.5})
    return model


def tiny_flux(pipeline_class: str = "FluxPipeline"):
    """A FLUX pipeline whose every component is tiny and seeded. Image-to-image
    (`FluxImg2ImgPipeline`), editing (`FluxKontextPipeline`) and inpainting (`FluxInpaintPipeline`)
    take the same components as `FluxPipeline`: the class only changes what model_index.json
    names, so `from_pretrained` loads the directory as that pipeline."""
    import diffusers

    from pipelines.presets.tokenizer_training import build_clip_tokenizer, build_t5_tokenizer

    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer(_T5_MAX_LENGTH)
    return getattr(diffusers, pipeline_class)(
        scheduler=_scheduler(),
        vae=seeded(2, lambda: kl_vae(scaling_factor=0.3611, shift_factor=0.1159)),
        text_encoder=seeded(3, lambda: clip_text_encoder(tokenizer, hidden=_CLIP_HIDDEN)),
        tokenizer=tokenizer,
        text_encoder_2=seeded(4, lambda: t5_encoder(tokenizer_2, d_model=_T5_HIDDEN)),
        tokenizer_2=tokenizer_2,
        transformer=seeded(1, _transformer),
    )
