"""Multi-process runs with ``torch.distributed`` (``torchrun``), MONAI's multi-GPU convention.

Subjects are sharded across ranks for encoding, every rank receives all tokens (they are small), scoring
is sharded by subject, and rank 0 writes the cohort files. Without an initialised process group all of
this degrades to a single process.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["init_process_group", "rank_and_world", "all_gather"]


def init_process_group() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on GPUs, gloo on CPUs)."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
