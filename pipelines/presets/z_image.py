"""The Z-Image preset: `ZImagePipeline` with a tiny single-stream transformer, a Qwen3 text
model (the pipeline reads its second-to-last hidden state), the trained Qwen2 BPE with Qwen3's
chat template, a 16-channel KL VAE (FLUX's scale and shift) and a fixed-shift flow schedule.

ZImageTransformer2DModel takes per-sample lists (one latent and one unpadded caption per image),
so it is the family that exercises variable-length prompts inside one batch.
"""

from __future__ import annotations

from pipelines.presets.common import init_linears_, seeded
from pipelines.presets.components import LATENT_CHANNELS, kl_vae, vocab_rows

_TEXT_HIDDEN = 32  # the transformer's cap_feat_dim


def _scheduler():
    """Z-Image-Turbo's schedule: flow matching with a fixed shift of 3 (the pipeline passes a
    resolution-dependent `mu`, which only dynamic shifting would use)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def _text_encoder(tokenizer):
    """A tiny Qwen3 decoder stack without the LM head (ZImagePipeline loads a Qwen3Model)."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=vocab_rows(tokenizer),
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=2 * _TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=_TEXT_HIDDEN // 2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return Qwen3Model(config)


def _transformer():
    """Two main blocks and one noise/context refiner each, dim 32 in 2 heads of 16 (rope axes
    4 + 6 + 6: caption/frame index, row, column)."""
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=LATENT_CHANNELS,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=_TEXT_HIDDEN,
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 512, 512],
    )
    init_linears_(model, {"adaLN": 2.0, "final_layer": 0.5})
    return model


def tiny_z_image():
    """A ZImagePipeline whose every component is tiny and seeded."""
    from diffusers import ZImagePipeline

    from pipelines.presets.tokenizer_training import build_qwen3_tokenizer

    tokenizer = build_qwen3_tokenizer()
    return ZImagePipeline(
        scheduler=_scheduler(),
        vae=seeded(2, lambda: kl_vae(scaling_factor=0.3611, shift_factor=0.1159)),
        text_encoder=seeded(3, lambda: _text_encoder(tokenizer)),
        tokenizer=tokenizer,
        transformer=seeded(1, _transformer),
    )
