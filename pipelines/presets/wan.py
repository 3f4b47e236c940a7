"""The Wan presets: `WanPipeline` text-to-video with a tiny 3D transformer, a UMT5 text encoder, the
trained T5 Unigram tokenizer, a tiny causal video VAE (`AutoencoderKLWan`: 8x spatial and 4x
temporal compression, so a video has 4k + 1 frames) and Wan's flow-matching UniPC schedule.

Two configurations, as Wan ships them:

- Wan 2.1: one transformer for the whole schedule;
- Wan 2.2: two transformers of the same shape, `transformer` for the high-noise steps (timestep
  >= boundary_ratio * 1000) and `transformer_2` for the rest. `boundary_ratio` is a pipeline
  config value (model_index.json), where diffusers 0.42 reads it.
"""

from __future__ import annotations

from pipelines.presets.common import init_linears_, seeded
from pipelines.presets.components import LATENT_CHANNELS, t5_encoder

_TEXT_HIDDEN = 32  # the transformer's text_dim
# Wan pads every prompt to max_sequence_length tokens (diffusers' default: 512).
_TEXT_MAX_LENGTH = 512
# Wan 2.2 A14B's switch point: the high-noise expert takes timesteps >= 875.
WAN22_BOUNDARY_RATIO = 0.875


def _scheduler(flow_shift: float):
    """Wan's schedule: UniPC integrating the flow velocity, with a fixed sigma shift."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
    )


def _transformer():
    """Two blocks, 2 heads of 16, 1x2x2 patches over 16 latent channels."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        text_dim=_TEXT_HIDDEN,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    init_linears_(model, {"proj_out": 0.5})
    return model


def _vae():
    """A causal 3D VAE with Wan's layout (three spatial halvings, the last two also temporal) at
    a width of 8 channels; Wan 2.1's per-channel latent statistics (the config's defaults)."""
    import torch
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    with torch.no_grad():  # default init decodes to a narrow grey band; more contrast shows differences
        vae.decoder.conv_out.weight.mul_(2.0)
    return vae


def tiny_wan(two_experts: bool):
    """A WanPipeline whose every component is tiny and seeded: Wan 2.1 style (one transformer), or
    Wan 2.2 style (`two_experts`: a second transformer below the boundary)."""
    from diffusers import WanPipeline

    from pipelines.presets.tokenizer_training import build_t5_tokenizer

    tokenizer = build_t5_tokenizer(_TEXT_MAX_LENGTH)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=seeded(3, lambda: t5_encoder(tokenizer, d_model=_TEXT_HIDDEN, umt5=True)),
        vae=seeded(2, _vae),
        scheduler=_scheduler(flow_shift=3.0),
        transformer=seeded(1, _transformer),
        transformer_2=seeded(5, _transformer) if two_experts else None,
        boundary_ratio=WAN22_BOUNDARY_RATIO if two_experts else None,
    )
