"""Test pipelines for CFG-parallel semantics on real diffusers modules, run at several world sizes.

`ThreeBranchPipeline` has three CFG branches (positive, null class, a second negative class) and
drops DiT's learned-variance channels with `output_slice`. `TupleOutputPipeline` predicts a
(video, audio) pair, applies CFG to the video only, and steps a composite scheduler. Each rank
runs the same requests; rank 0 saves the final latents so the test can compare world sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel

from engine.contract.messages import NewRequest
from engine.contract.sampling_params import SamplingParams
from pipelines.parallel.cfg import CFGParallelMixin
from pipelines.request_state import RequestState
from pipelines.schedulers import step_request_scheduler

SIDE, CHANNELS, AUDIO = 8, 4, 16


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=CHANNELS,
        out_channels=2 * CHANNELS,
        num_layers=1,
        sample_size=SIDE,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()


class ThreeBranchPipeline(CFGParallelMixin):
    output_slice = CHANNELS

    def __init__(self):
        self.transformer = tiny_dit()
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def forward_rows(self, rows):
        latents = torch.cat([s.latents for s, _ in rows])
        t = torch.stack([s.timestep.float() for s, _ in rows])
        labels = torch.tensor([s.branch_inputs[b]["label"] for s, b in rows])
        return self.transformer(latents, timestep=t, class_labels=labels).sample

    def prediction_shapes(self, state):
        return (1, 2 * CHANNELS, SIDE, SIDE)

    def combine_multi_branch_cfg_noise(self, branches, state):
        positive, null, other = branches
        return positive + state.cfg_scale * (positive - null) + 0.5 * state.cfg_scale * (positive - other)


class CompositeScheduler:
    """Steps (video, audio) with one diffusers scheduler each."""

    def __init__(self, steps: int):
        self.video, self.audio = DDPMScheduler(), DDIMScheduler()
        self.video.set_timesteps(steps)
        self.audio.set_timesteps(steps)
        self.timesteps = self.video.timesteps

    def step(self, noise, timestep, sample, generator=None, return_dict=False):
        video = self.video.step(noise[0], timestep, sample[0], generator=generator, return_dict=False)[0]
        audio = self.audio.step(noise[1], timestep, sample[1], return_dict=False)[0]
        return ((video, audio),)


class TupleOutputPipeline(CFGParallelMixin):
    def __init__(self):
        self.transformer = tiny_dit()
        torch.manual_seed(1)
        self.audio_head = torch.nn.Linear(AUDIO + 1, AUDIO)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def forward_rows(self, rows):
        video = torch.cat([s.latents[0] for s, _ in rows])
        audio = torch.cat([s.latents[1] for s, _ in rows])
        t = torch.stack([s.timestep.float() for s, _ in rows])
        labels = torch.tensor([s.branch_inputs[b]["label"] for s, b in rows])
        video_pred = self.transformer(video, timestep=t, class_labels=labels).sample[:, :CHANNELS]
        audio_pred = self.audio_head(torch.cat([audio, t[:, None] / 1000], dim=1))
        return video_pred, audio_pred

    def prediction_shapes(self, state):
        return [(1, CHANNELS, SIDE, SIDE), (1, AUDIO)]

    def combine_cfg_noise(self, positive, negative, scale, normalize):
        """CFG on the video only; the audio follows the positive branch."""
        return (negative[0] + scale * (positive[0] - negative[0]), positive[1])


def make_states(kind: str, steps: int = 3) -> list[RequestState]:
    states = []
    for i, branches in enumerate(([1, 0, 2], [3, 0], [5]) if kind == "three" else ([1, 0], [4])):
        generator = torch.Generator().manual_seed(100 + i)
        if kind == "three":
            scheduler = DDPMScheduler()
            scheduler.set_timesteps(steps)
            latents = torch.randn(1, CHANNELS, SIDE, SIDE, generator=generator)
        else:
            scheduler = CompositeScheduler(steps)
            latents = (
                torch.randn(1, CHANNELS, SIDE, SIDE, generator=generator),
                torch.randn(1, AUDIO, generator=generator),
            )
        request = NewRequest(request_id=f"r{i}", params=SamplingParams(num_inference_steps=steps), seed=100 + i)
        states.append(
            RequestState(
                request=request,
                generator=generator,
                scheduler=scheduler,
                timesteps=scheduler.timesteps,
                latents=latents,
                branch_inputs=[{"label": b} for b in branches],
                cfg_scale=2.0 + i,
            )
        )
    return states


def run(kind: str, rank: int = 0, world: int = 1) -> list:
    pipeline = ThreeBranchPipeline() if kind == "three" else TupleOutputPipeline()
    if world > 1:
        pipeline.cfg_group, pipeline.cfg_rank, pipeline.cfg_world_size = dist.group.WORLD, rank, world
    states = make_states(kind)
    with torch.inference_mode():
        for _ in range(len(states[0].timesteps)):
            for state, noise in zip(states, pipeline.predict_noise(states), strict=True):
                state.latents = step_request_scheduler(
                    state.scheduler, noise, state.timestep, state.latents, generator=state.generator
                )
                state.step_index += 1
    return [s.latents for s in states]


def reference(kind: str) -> list:
    """The same requests without the CFG mixin: each branch alone through the transformer, the
    guidance formulas written out here, the schedulers stepped directly. What every world size
    must reproduce, so a bug in the mixin's shared path cannot hide behind a world-1 run."""
    pipeline = ThreeBranchPipeline() if kind == "three" else TupleOutputPipeline()
    states = make_states(kind)
    with torch.inference_mode():
        for _ in range(len(states[0].timesteps)):
            for state in states:
                branches = [pipeline.forward_rows([(state, b)]) for b in range(state.num_branches)]
                scale = state.cfg_scale
                if kind == "three":
                    branches = [b[:, :CHANNELS] for b in branches]  # drop the learned variance
                    if len(branches) == 3:
                        positive, null, other = branches
                        noise = positive + scale * (positive - null) + 0.5 * scale * (positive - other)
                    elif len(branches) == 2:
                        positive, negative = branches
                        noise = negative + scale * (positive - negative)
                    else:
                        noise = branches[0]
                    step = state.scheduler.step(noise, state.timestep, state.latents, generator=state.generator)
                    state.latents = step.prev_sample
                else:
                    if len(branches) == 2:
                        (video, audio), (negative_video, _) = branches
                        noise = (negative_video + scale * (video - negative_video), audio)
                    else:
                        noise = branches[0]
                    state.latents = state.scheduler.step(
                        noise, state.timestep, state.latents, generator=state.generator
                    )[0]
                state.step_index += 1
    return [s.latents for s in states]


def rank_main(rank: int, world: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {kind: run(kind, rank, world) for kind in ("three", "tuple")}
    torch.save(results, f"{out_path}.rank{rank}")
    dist.destroy_process_group()
