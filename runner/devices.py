"""Which device each worker rank uses, and whether the machine has it.

Rank r of the cfg x pipeline grid uses GPU r (as CUDA_VISIBLE_DEVICES numbers them) when the
engine asks for "cuda"; "cuda:N" pins a single rank to GPU N. Both are checked before any worker
starts, so a CPU-only torch build or too few GPUs is one clear error, not a worker traceback.
"""

from __future__ import annotations

import torch

from engine.contract.config import EngineConfig


def resolve_device(requested: str | None) -> str:
    """None -> "cuda" when a GPU is visible, else "cpu"."""
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def check_devices(config: EngineConfig) -> None:
    device = resolve_device(config.device)
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        build = f"a CPU build of torch {torch.__version__}" if torch.version.cuda is None else "no visible GPU"
        raise ValueError(
            f"EngineConfig.device={config.device!r} asks for CUDA, but this machine has {build}; use device='cpu'"
        )
    visible = torch.cuda.device_count()
    needed = int(device[5:]) + 1 if device.startswith("cuda:") else config.parallel_config.world_size
    if needed > visible:
        raise ValueError(
            f"EngineConfig.device={device!r} with {config.parallel_config.world_size} worker rank(s) needs "
            f"{needed} GPU(s), but {visible} are visible (CUDA_VISIBLE_DEVICES)"
        )


def rank_device(requested: str | None, rank: int) -> str:
    """The device worker `rank` loads the model on."""
    device = resolve_device(requested)
    return f"cuda:{rank}" if device == "cuda" else device


def free_memory_bytes(device: str) -> int | None:
    """Memory a worker on `device` can still allocate: the GPU's free memory, or for the CPU the
    machine's available memory (/proc/meminfo); None where unknown."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
