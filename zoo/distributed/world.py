"""The processes of a run: torchrun's process group (gloo on CPU, NCCL on CUDA), and the means and
maxima of values over its ranks."""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist


def init_distributed(timeout: Optional[float] = None) -> bool:
    """Join the process group that torchrun describes; False if there is none to join.

    ``timeout`` (seconds) bounds every collective: a rank that stops answering (hung, stopped, dead)
    makes the others fail after that long instead of waiting forever."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    kwargs = {"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", **kwargs)
    return True


def ensure_process_group(device_type: str) -> None:
    """A process group of one, in memory, where none was started (DeviceMeshes need one): FSDP2 at world size
    1 without torchrun."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def close_process_group() -> None:
    """Leave the process group once every rank is done: a rank that tears gloo down while another still
    talks to it can abort ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    _, world = rank_and_world()
    if world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world
    return value


def max_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over every rank (a copy; ``value`` itself where there is one process)."""
    if rank_and_world()[1] > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
    return value
