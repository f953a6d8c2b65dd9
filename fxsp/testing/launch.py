"""The examples' start under torchrun: one GPU per rank over NCCL where there are enough, else
CPU over gloo."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_torchrun() -> tuple[int, int, torch.device, str]:
    """Initialise the default process group torchrun describes; returns (rank, world size, this
    rank's device, what to say about it)."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= ranks_here:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
        where = "CUDA over NCCL"
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        why = f"{gpus} GPU{'s' if gpus != 1 else ''} for {ranks_here} ranks" if gpus else "no GPU"
        where = f"CPU over gloo ({why})"
    return dist.get_rank(), dist.get_world_size(), device, where
