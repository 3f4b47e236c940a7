"""Qwen-Image on diffusers' QwenImagePipeline components, split into the step contract.

Each piece calls the diffusers pipeline's own helpers (prompt encoding, latent preparation and
packing, the timestep schedule, unpacking and postprocessing), so a request's output equals
`QwenImagePipeline.__call__` for the same inputs. What changes is the forward: rows of many
requests (at different timesteps, with both CFG branches) share one transformer call. Prompts of
different lengths are right-padded and masked with `encoder_hidden_states_mask`, which the
transformer applies in joint attention, so padding does not change any row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from engine.contract.messages import NewRequest
from engine.contract.sampling_params import MAX_SIDE
from pipelines.parallel.cfg import Row
from pipelines.parallel.pipeline_parallel import HIDDEN_TAG
from pipelines.request_state import RequestState
from pipelines.schedulers import set_flow_timesteps
from pipelines.step_pipeline import StepPipeline, check_text

MAX_SEQUENCE_LENGTH = 512  # diffusers' QwenImagePipeline default
DEFAULT_CFG_SCALE = 4.0  # its true_cfg_scale default (and the guidance of guidance-embedding variants)
PIXELS_PER_TOKEN = 16  # the VAE's 8x times the transformer's 2x2 patches


@dataclass
class QwenImageState(RequestState):
    height: int = 0
    width: int = 0
    guidance: float = DEFAULT_CFG_SCALE  # read only by guidance-embedding transformers


class QwenImageStepPipeline(StepPipeline):
    name = "qwen-image"
    flow_matching = True
    supports_pipeline_parallel = True

    @classmethod
    def check_request(cls, info, params, fields) -> None:
        check_text("prompt", fields["prompt"], required=True)
        check_text("negative_prompt", fields["negative_prompt"], required=False)
        for side in ("height", "width"):
            value = getattr(params, side)
            if value is not None and value % PIXELS_PER_TOKEN:
                raise ValueError(
                    f"SamplingParams.{side} must be a multiple of {PIXELS_PER_TOKEN} in [16, {MAX_SIDE}], got {value}"
                )
        tokens = cls.image_seq_len(info, params)
        limit = int(info.scheduler_config.get("max_image_seq_len", 4096))  # where the shift is defined
        if tokens > limit:
            height, width = params.height or info.default_height, params.width or info.default_width
            raise ValueError(
                f"SamplingParams.height x width = {height}x{width} gives {tokens} image tokens; this model allows "
                f"at most {limit} (height/16 * width/16)"
            )

    @classmethod
    def image_seq_len(cls, info, params) -> int:
        height, width = params.height or info.default_height, params.width or info.default_width
        return (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)

    def __init__(self, pipe, info, device):
        super().__init__(pipe, info, device)
        self.vae_scale_factor = pipe.vae_scale_factor
        self._text_cache_rows: list = []  # the (state, branch) rows of the cached result
        self._text_cache: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def prepare_encode(self, request: NewRequest) -> QwenImageState:
        params = request.params
        height = params.height or self.info.default_height
        width = params.width or self.info.default_width
        pipe = self.pipe
        cfg_scale = DEFAULT_CFG_SCALE if params.true_cfg_scale is None else params.true_cfg_scale
        do_cfg = cfg_scale > 1 and request.negative_prompt is not None
        branches = [request.prompt, request.negative_prompt] if do_cfg else [request.prompt]
        branch_inputs = []
        for text in branches:
            embeds, _ = pipe.encode_prompt(prompt=text, device=self.device, max_sequence_length=MAX_SEQUENCE_LENGTH)
            branch_inputs.append({"embeds": embeds, "length": embeds.shape[1]})

        generator = self.new_generator(request)
        channels = pipe.transformer.config.in_channels // 4
        latents = pipe.prepare_latents(
            1, channels, height, width, branch_inputs[0]["embeds"].dtype, self.device, generator
        )
        scheduler = self.new_scheduler(request)
        set_flow_timesteps(scheduler, params.num_inference_steps, image_seq_len=latents.shape[1], device=self.device)
        scheduler.set_begin_index(0)
        normalize = True if params.cfg_normalize is None else params.cfg_normalize
        return QwenImageState(
            request=request,
            generator=generator,
            scheduler=scheduler,
            timesteps=scheduler.timesteps,
            latents=latents,
            branch_inputs=branch_inputs,
            cfg_scale=float(cfg_scale),
            cfg_normalize=normalize,
            batch_key=(height, width),
            height=height,
            width=width,
            guidance=DEFAULT_CFG_SCALE if params.guidance_scale is None else params.guidance_scale,
        )

    def forward_rows(self, rows: Sequence[Row]) -> torch.Tensor | None:
        if self.pp_size > 1:
            return self._stage_forward(rows)
        first = rows[0][0]
        height, width = first.height, first.width
        hidden_states = torch.cat([state.latents for state, _ in rows])
        timestep = torch.stack([state.timestep for state, _ in rows]).to(hidden_states.dtype)
        embeds, mask = self._text_inputs(rows)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.tensor([state.guidance for state, _ in rows], device=self.device, dtype=torch.float32)
        side = self.vae_scale_factor * 2
        img_shapes = [[(1, height // side, width // side)]] * len(rows)
        return self.pipe.transformer(
            hidden_states=hidden_states,
            timestep=timestep / 1000,
            guidance=guidance,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds,
            img_shapes=img_shapes,
            return_dict=False,
        )[0]

    # -- pipeline parallelism ----------------------------------------------------------------
    def transformer_blocks(self) -> torch.nn.ModuleList:
        return self.pipe.transformer.transformer_blocks

    def keep_blocks(self, start: int, end: int) -> None:
        transformer = self.pipe.transformer
        if getattr(transformer.config, "zero_cond_t", False) or getattr(
            transformer.config, "use_additional_t_cond", False
        ):
            raise ValueError(
                "pipeline parallelism does not support zero_cond_t / additional_t_cond Qwen-Image variants"
            )
        transformer.transformer_blocks = torch.nn.ModuleList(list(transformer.transformer_blocks)[start:end])

    def _stage_forward(self, rows: Sequence[Row]) -> torch.Tensor | None:
        """This stage's share of the transformer forward (the same modules, in the same order,
        as QwenImageTransformer2DModel.forward). Returns the prediction on the last stage."""
        from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask

        transformer = self.pipe.transformer
        first = rows[0][0]
        height, width = first.height, first.width
        side = self.vae_scale_factor * 2
        img_shapes = [[(1, height // side, width // side)]] * len(rows)
        embeds, mask = self._text_inputs(rows)
        text_len, _, mask = compute_text_seq_len_from_mask(embeds, mask)
        timestep = (torch.stack([state.timestep for state, _ in rows]).to(self.dtype) / 1000).to(self.dtype)
        carrier = embeds[:, :0, :0]  # time_text_embed reads only the dtype of this argument
        if transformer.config.guidance_embeds:
            guidance = torch.tensor([s.guidance for s, _ in rows], device=self.device)
            temb = transformer.time_text_embed(timestep, guidance.to(self.dtype) * 1000, carrier)
        else:
            temb = transformer.time_text_embed(timestep, carrier)
        rope = transformer.pos_embed(img_shapes, max_txt_seq_len=text_len, device=self.device)
        inner = transformer.inner_dim
        if self.is_first_stage:
            hidden = transformer.img_in(torch.cat([state.latents for state, _ in rows]))
            encoder = transformer.txt_in(transformer.txt_norm(embeds))
        else:
            image_tokens = first.latent_shape[1]
            hidden, encoder = self.receive(
                [(len(rows), image_tokens, inner), (len(rows), text_len, inner)], HIDDEN_TAG, self.pp_prev
            )
        for block in transformer.transformer_blocks:
            encoder, hidden = block(
                hidden_states=hidden,
                encoder_hidden_states=encoder,
                encoder_hidden_states_mask=mask,
                temb=temb,
                image_rotary_emb=rope,
            )
        if not self.is_last_stage:
            self.send([hidden, encoder], HIDDEN_TAG, self.pp_next)
            return None
        return transformer.proj_out(transformer.norm_out(hidden, temb))

    def _text_inputs(self, rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Right-padded prompt embeddings and their mask (None when nothing is padded). A step
        batch usually repeats the previous one's rows, so the last result is reused."""
        # Compared by identity, not by request id: a new request may reuse an id.
        cached = self._text_cache_rows
        if self._text_cache is not None and len(cached) == len(rows):
            if all(s is cs and b == cb for (s, b), (cs, cb) in zip(rows, cached)):
                return self._text_cache
        inputs = [state.branch_inputs[branch] for state, branch in rows]
        lengths = [i["length"] for i in inputs]
        longest = max(lengths)
        if min(lengths) == longest:
            result = (torch.cat([i["embeds"] for i in inputs]), None)
        else:
            first = inputs[0]["embeds"]
            embeds = first.new_zeros(len(rows), longest, first.shape[-1])
            mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=first.device)
            for row, item in enumerate(inputs):
                embeds[row, : item["length"]] = item["embeds"][0]
                mask[row, : item["length"]] = True
            result = (embeds, mask)
        self._text_cache_rows, self._text_cache = list(rows), result
        return result

    def post_decode(self, states: Sequence[QwenImageState]) -> list[np.ndarray]:
        """The tail of QwenImagePipeline.__call__, for same-size requests in one VAE call."""
        pipe = self.pipe
        vae = pipe.vae
        height, width = states[0].height, states[0].width
        latents = torch.cat([state.latents for state in states])
        latents = pipe._unpack_latents(latents, height, width, self.vae_scale_factor).to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = latents / inv_std + mean
        image = vae.decode(latents, return_dict=False)[0][:, :, 0]
        images = pipe.image_processor.postprocess(image, output_type="np").astype(np.float32, copy=False)
        return list(np.split(images, len(states)))
