"""DiT (class-conditional) on diffusers' DiTPipeline components, split into the step contract.

Matches `DiTPipeline.__call__` for one class label: latents drawn with the request's generator,
the null class as the unconditional branch, guidance applied to the noise channels only (the
learned-variance channels are dropped, `output_slice`), and — as diffusers' DiTPipeline does —
the scheduler steps from the scaled model input.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from engine.contract.messages import NewRequest
from pipelines.parallel.cfg import Row
from pipelines.request_state import RequestState
from pipelines.step_pipeline import StepPipeline

VAE_SCALE = 8  # DiT's VAE: latent side * 8 = image side
DEFAULT_GUIDANCE = 4.0  # DiTPipeline's guidance_scale default


class DiTStepPipeline(StepPipeline):
    name = "dit"
    inputs = ("class_label",)

    @classmethod
    def default_size(cls, transformer_config, preset) -> tuple[int, int]:
        side = int(transformer_config["sample_size"]) * VAE_SCALE
        return side, side

    @classmethod
    def check_request(cls, info, params, fields) -> None:
        label, classes = fields["class_label"], int(info.transformer_config.get("num_embeds_ada_norm") or 0)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < classes:
            raise ValueError(f"class_label must be an integer in [0, {classes - 1}], got {label!r}")
        for side, default in (("height", info.default_height), ("width", info.default_width)):
            value = getattr(params, side)
            if value is not None and value != default:
                raise ValueError(f"SamplingParams.{side} must be {default} (fixed by this DiT model), got {value}")

    def __init__(self, pipe, info, device):
        super().__init__(pipe, info, device)
        config = pipe.transformer.config
        self.latent_channels = config.in_channels
        self.latent_size = config.sample_size
        self.null_class = config.num_embeds_ada_norm
        # Guidance and the scheduler use the noise channels only.
        self.output_slice = self.latent_channels

    def prepare_encode(self, request: NewRequest) -> RequestState:
        params = request.params
        label = request.class_label
        generator = self.new_generator(request)
        shape = (1, self.latent_channels, self.latent_size, self.latent_size)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.pipe.transformer.dtype)
        scheduler = self.new_scheduler(request)
        scheduler.set_timesteps(params.num_inference_steps)
        guidance = DEFAULT_GUIDANCE if params.guidance_scale is None else params.guidance_scale
        do_cfg = guidance > 1
        labels = [label, self.null_class] if do_cfg else [label]
        branch_inputs = [{"class_label": torch.tensor([c], device=self.device)} for c in labels]
        return RequestState(
            request=request,
            generator=generator,
            scheduler=scheduler,
            timesteps=scheduler.timesteps,
            latents=latents,
            branch_inputs=branch_inputs,
            cfg_scale=float(guidance),
            cfg_normalize=bool(params.cfg_normalize),
            batch_key=(self.latent_size,),
        )

    def denoise_step(self, states: Sequence[RequestState]) -> list[Any]:
        for state in states:
            state.latents = state.scheduler.scale_model_input(state.latents, state.timestep)
        return self.predict_noise(states)

    def forward_rows(self, rows: Sequence[Row]) -> torch.Tensor:
        latents = torch.cat([state.latents for state, _ in rows])
        timesteps = torch.stack([state.timestep.to(torch.float32) for state, _ in rows]).to(self.device)
        labels = torch.cat([state.branch_inputs[branch]["class_label"] for state, branch in rows])
        return self.pipe.transformer(latents, timestep=timesteps, class_labels=labels).sample

    def prediction_shapes(self, state: RequestState) -> tuple:
        return (1, self.pipe.transformer.config.out_channels, self.latent_size, self.latent_size)

    def post_decode(self, states: Sequence[RequestState]) -> list[np.ndarray]:
        """The tail of DiTPipeline.__call__, for several requests in one VAE call."""
        vae = self.pipe.vae
        latents = torch.cat([state.latents for state in states]) / vae.config.scaling_factor
        samples = vae.decode(latents).sample
        samples = (samples / 2 + 0.5).clamp(0, 1)
        return list(np.split(samples.cpu().permute(0, 2, 3, 1).float().numpy(), len(states)))
