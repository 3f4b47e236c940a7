"""The DiT preset: a class-conditional `DiTPipeline` (no text encoder) with a tiny transformer
and a tiny `AutoencoderKL`.
"""

from __future__ import annotations

from pipelines.presets.common import seeded


def tiny_dit():
    """A class-conditional DiT: learned sigma (8 output channels), class 1000 = the null class."""
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    def transformer():
        return DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_zero",
        )

    def vae():
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
            sample_size=64,
        )

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="epsilon",
    )
    return DiTPipeline(transformer=seeded(1, transformer), vae=seeded(2, vae), scheduler=scheduler)
