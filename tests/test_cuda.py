"""On a CUDA GPU (skipped elsewhere; `benchmarks/gpu_check.sh` runs them): outputs equal diffusers
on the same device in fp32, bf16 runs, worker processes stream and abort, torch.compile runs and
matches, and every rank-count layout that fits the visible GPUs starts."""

from __future__ import annotations

import asyncio

import diffusers
import numpy as np
import pytest
import torch

from engine import AsyncEngine, Omni, ParallelConfig, SamplingParams
from tests.test_diffusers_adapter import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
# fp32 on a GPU: TF32 is off by default for matmuls in torch, but reduction orders differ with
# batch shapes; the CPU suite holds 1e-4, a GPU gets a little room.
CUDA_TOL = 5e-4


@pytest.fixture(scope="module")
def qwen_cuda(qwen_dir):
    pipe = diffusers.QwenImagePipeline.from_pretrained(str(qwen_dir)).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("adapter", [False, True], ids=["hand-split", "adapter"])
def test_cuda_fp32_co_batched_matches_diffusers_on_cuda(qwen_dir, qwen_cuda, adapter):
    cases = [
        ({"prompt": "a red fox", "negative_prompt": "blurry"}, SamplingParams(num_inference_steps=4, seed=1)),
        ({"prompt": "an old harbour with boats"}, SamplingParams(num_inference_steps=3, seed=2)),
        ({"prompt": "a tower", "negative_prompt": "fog"}, SamplingParams(num_inference_steps=5, seed=3, height=32)),
    ]
    cases = [(p, SamplingParams(**{**_fields(s), "output_type": "np"})) for p, s in cases]
    with Omni(model=str(qwen_dir), executor="inproc", device="cuda", diffusers_adapter=adapter) as omni:
        outputs = omni.generate([p for p, _ in cases], [s for _, s in cases], use_tqdm=False)
    for (prompt, params), output in zip(cases, outputs, strict=True):
        assert output.error is None, output.error
        expected = reference(qwen_cuda, prompt, params, (64, 64))
        assert float(np.abs(output.images - expected).max()) < CUDA_TOL


def test_cuda_bfloat16_and_compile_run(qwen_dir):
    params = SamplingParams(num_inference_steps=4, seed=1, output_type="np")
    prompts = [{"prompt": "a red fox", "negative_prompt": "blur"}, {"prompt": "a cat"}]
    with Omni(model=str(qwen_dir), executor="inproc", device="cuda", dtype="bfloat16") as omni:
        plain = omni.generate(prompts, params, use_tqdm=False)
    with Omni(model=str(qwen_dir), executor="inproc", device="cuda", dtype="bfloat16", compile=True) as omni:
        compiled = omni.generate(prompts, params, use_tqdm=False)
    for a, b in zip(plain, compiled, strict=True):
        assert a.error is None and b.error is None, (a.error, b.error)
        assert np.isfinite(a.images).all() and float(np.abs(a.images - b.images).mean()) < 0.03


async def test_cuda_worker_process_streams_and_aborts(qwen_dir):
    async with AsyncEngine(model=str(qwen_dir), executor="mp", device="cuda") as engine:

        async def run(prompt, steps):
            async for out in engine.generate(prompt, SamplingParams(num_inference_steps=steps, seed=4)):
                pass
            return out

        async def cancelled():
            async for _ in engine.generate("a long walk", SamplingParams(num_inference_steps=200)):
                break

        *done, _ = await asyncio.gather(run("a red fox", 4), run("a blue door", 6), cancelled())
        assert all(o.error is None and len(o.images) == 1 for o in done)
        assert await engine.worker_state_ids() == []


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_cfg_parallel_uses_one_gpu_per_rank(qwen_dir):
    prompt = {"prompt": "a red fox", "negative_prompt": "blur"}
    params = SamplingParams(num_inference_steps=3, seed=1, output_type="np")
    with Omni(model=str(qwen_dir), executor="inproc", device="cuda") as one:
        (expected,) = one.generate([prompt], params, use_tqdm=False)
    layout = ParallelConfig(cfg_parallel_size=2)
    with Omni(model=str(qwen_dir), executor="mp", device="cuda", parallel_config=layout) as two:
        (output,) = two.generate([prompt], params, use_tqdm=False)
    assert float(np.abs(output.images - expected.images).max()) < CUDA_TOL


def _fields(params: SamplingParams) -> dict:
    return {f: getattr(params, f) for f in params.__struct_fields__}
