"""The device, rank and number of processes of a training script, under ``torchrun`` or alone.

    device, rank, world = init_processes("auto", dist_timeout=1800.0, threads=0, batch_size=100)
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["init_processes"]


def init_processes(device_name: str, *, dist_timeout: float, threads: int, batch_size: int
                   ) -> tuple[torch.device, int, int]:
    """Device, rank and number of processes (torchrun sets WORLD_SIZE / RANK / LOCAL_RANK);
    joins the process group (gloo on CPU, nccl on CUDA, ``dist_timeout`` seconds per
    collective) and sets the number of CPU threads (``threads``; 0: the cores split evenly
    among this machine's processes).  ``device_name`` is ``auto``, ``cpu`` or ``cuda``.

    Raises:
        ValueError: ``cuda`` without a CUDA device, or ``batch_size`` not divisible by the
            number of processes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but this machine has no CUDA device (torch.cuda.is_available() is False)")
    device = torch.device(f"cuda:{local_rank}" if device_name == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=dist_timeout))
    if threads > 0:
        torch.set_num_threads(threads)
    elif world > 1 and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the number of processes ({world})")
    return device, rank, world
