"""Devices and precision on any machine: bf16 stays close to fp32, asking for CUDA where there is
none (or for more GPUs than are visible) is one clear error, and the per-step path never reads a
tensor back to the host, so on a GPU the host can queue the next step while the device works."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from engine import EngineConfig, Omni, ParallelConfig, SamplingParams

# bf16 against fp32, in [0, 1] pixel units, on the random-weight tiny presets (measured: Qwen-Image
# mean 0.011 / max 0.17, DiT mean 0.002 / max 0.01): bf16 keeps 8 bits of mantissa, and random
# weights amplify rounding more than trained ones do.
BF16_MEAN_TOL, BF16_MAX_TOL = 0.03, 0.3
# Tensor methods that copy device memory to the host and wait for the device.
HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}


class HostReads(TorchFunctionMode):
    """Counts host reads of tensors while active."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "preset_fixture, prompt",
    [("qwen_dir", {"prompt": "a red fox", "negative_prompt": "blurry"}), ("dit_dir", {"class_label": 3})],
)
def test_bfloat16_is_close_to_float32(request, preset_fixture, prompt):
    model = str(request.getfixturevalue(preset_fixture))
    params = SamplingParams(num_inference_steps=4, seed=1, output_type="np")
    images = {}
    for dtype in ("float32", "bfloat16"):
        with Omni(model=model, executor="inproc", dtype=dtype) as omni:
            assert omni.core.executor.runner.pipeline.dtype == getattr(torch, dtype)
            (output,) = omni.generate([prompt], params, use_tqdm=False)
        assert output.error is None, output.error
        images[dtype] = output.images
    diff = np.abs(images["float32"] - images["bfloat16"])
    assert images["bfloat16"].dtype == np.float32 and np.isfinite(images["bfloat16"]).all()
    assert diff.mean() < BF16_MEAN_TOL and diff.max() < BF16_MAX_TOL, (diff.mean(), diff.max())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_without_a_gpu_is_one_clear_error(qwen_dir):
    with pytest.raises(ValueError, match="EngineConfig.device='cuda' asks for CUDA, but this machine has"):
        Omni(model=str(qwen_dir), executor="inproc", device="cuda")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"device": "gpu"}, "EngineConfig.device must be null, 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        (
            {"device": "cuda:1", "parallel_config": ParallelConfig(cfg_parallel_size=2)},
            "names one GPU, but the worker grid has 2 ranks; use device='cuda'",
        ),
        ({"dtype": "float64"}, "EngineConfig.dtype must be null or one of"),
        ({"compile": "yes"}, "EngineConfig.compile must be true or false"),
    ],
)
def test_device_options_name_the_field(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EngineConfig.of("tiny-qwen-image", **options)


@pytest.mark.parametrize("adapter", [False, True], ids=["hand-split", "adapter"])
def test_a_middle_step_reads_nothing_back_to_the_host(qwen_dir, adapter):
    with Omni(model=str(qwen_dir), executor="inproc", diffusers_adapter=adapter) as omni:
        core = omni.core
        for i, prompt in enumerate(({"prompt": "a fox", "negative_prompt": "blur"}, {"prompt": "a longer prompt"})):
            core.add_request(core.make_request(prompt, SamplingParams(num_inference_steps=6, seed=i)))
        core.step()
        core.step()  # past the first step (prompt encoding, first flags)
        with HostReads() as reads:
            outputs = core.step()
        assert [o.step for o in outputs] == [3, 3] and not any(o.finished for o in outputs)
        assert reads.calls == {}, dict(reads.calls)
