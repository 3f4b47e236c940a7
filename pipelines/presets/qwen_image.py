"""The qwen-image presets: `QwenImagePipeline` with a tiny Qwen2.5-VL text encoder, a trained
Qwen2-style BPE tokenizer, Qwen-Image's own VAE and flow-matching schedule; only the transformer's
size differs between the tiny, small and medium presets.
"""

from __future__ import annotations

import torch

from pipelines.presets.common import init_linears_, seeded

# Latent channels of the qwen-image presets' VAE (the real model has 16).
QWEN_Z_DIM = 4
# The tiny text encoder's width; the transformer's joint_attention_dim must equal it.
_TEXT_HIDDEN = 32


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


def qwen_vae(*, base_dim: int = 8, latents_mean=(0.05, -0.05, 0.1, -0.1), latents_std=(1.0, 0.9, 1.1, 1.2)):
    """A small Qwen-Image VAE (4 latent channels); three spatial halvings keep vae_scale_factor at 8.
    Unseeded and untrained: the caller seeds it (`seeded`) or loads weights into it."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=base_dim,
        z_dim=QWEN_Z_DIM,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=list(latents_mean),
        latents_std=list(latents_std),
    )


def _qwen_vae():
    """The random-weight presets' VAE."""
    vae = qwen_vae()
    # Default init decodes to a narrow grey band; more contrast makes differences visible.
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(2.0)
    return vae


def _real_qwen_vae():
    """Qwen-Image's own VAE architecture (diffusers' defaults: 16 latent channels, base width 96),
    seeded random weights: decoding costs what the real model's decode costs."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage()


def qwen_scheduler():
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


def qwen_text_parts():
    """The tokenizer and the tiny, seeded Qwen2.5-VL text encoder every qwen-image preset shares."""
    from pipelines.presets.tokenizer_training import SPECIAL_TOKENS, build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer()
    special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # round up: room for every token id
    return tokenizer, seeded(3, lambda: _qwen_text_encoder(vocab_size, special_ids))


def qwen_transformer(*, layers: int, heads: int, head_dim: int, axes: tuple[int, int, int], z_dim: int = QWEN_Z_DIM):
    """A QwenImageTransformer2DModel of the given size reading the tiny text encoder, with
    diffusers' default init (unseeded: the caller seeds it or loads weights into it)."""
    from diffusers import QwenImageTransformer2DModel

    assert sum(axes) == head_dim and all(a % 2 == 0 for a in axes), "rope axes must tile the head dim"
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,  # 2x2 latent patches are packed into channels
        out_channels=z_dim,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=_TEXT_HIDDEN,
        axes_dims_rope=axes,
    )


def qwen_image(
    *, layers: int, heads: int, head_dim: int, axes: tuple[int, int, int], real_vae: bool = False, dtype=None
):
    """A QwenImagePipeline whose transformer has the given size; the text encoder is tiny, the VAE
    tiny or (`real_vae`) the real architecture; saved in `dtype` (float32 when None)."""
    from diffusers import QwenImagePipeline

    tokenizer, text_encoder = qwen_text_parts()
    z_dim = 16 if real_vae else QWEN_Z_DIM

    def transformer():
        model = qwen_transformer(layers=layers, heads=heads, head_dim=head_dim, axes=axes, z_dim=z_dim)
        # Stronger AdaLN modulation (gates) lets attention output through; a smaller output
        # projection keeps velocity predictions around unit scale.
        init_linears_(model, {"_mod": 2.0, "proj_out": 0.5})
        return model

    pipe = QwenImagePipeline(
        scheduler=qwen_scheduler(),
        vae=seeded(2, _real_qwen_vae if real_vae else _qwen_vae),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=seeded(1, transformer),
    )
    return pipe if dtype is None else pipe.to(dtype)
