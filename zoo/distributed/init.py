"""Initialization of sharded weights, one module at a time, with a single process's random numbers.

The model is built on ``meta`` and sharded, so no rank ever holds it whole. Then, for each step of
``ZooModel.init_steps`` in order, the weights of that step's module are gathered (the values already
set survive), the step runs on them as it would in one process, drawing the same numbers from the
same seeded generator, and each rank keeps its shard. Every rank ends with its part of exactly the
weights a single-process build of the same seed makes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard


def _sharded_rows(like: DTensor) -> bool:
    """Whether ``like`` is split by rows over a 1-D mesh (plain FSDP2), where gathering and slicing need no copies
    beyond the whole tensor itself."""
    return like.device_mesh.ndim == 1 and type(like.placements[0]) is Shard and like.placements[0].dim == 0


def gather(like: DTensor) -> torch.Tensor:
    """The whole tensor of ``like``, gathered straight into one buffer where it is split by rows."""
    if not _sharded_rows(like):
        return like.full_tensor()
    mesh, local = like.device_mesh, like.to_local()
    size = mesh.size()
    rows = -(-like.shape[0] // size)
    padded = local.new_empty(rows * size, *like.shape[1:])
    mine = local
    if local.shape[0] != rows or not local.is_contiguous():  # the last ranks' shorter chunks
        mine = local.new_zeros(rows, *like.shape[1:])
        mine[:local.shape[0]].copy_(local)
    dist.all_gather_into_tensor(padded, mine, group=mesh.get_group())
    return padded[:like.shape[0]]


def local_part(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's shard of ``full`` in ``like``'s layout (no communication: every rank has ``full``)."""
    mesh = like.device_mesh
    if _sharded_rows(like):
        chunks = torch.chunk(full, mesh.size(), dim=0)  # FSDP2's split: torch.chunk's
        rank = mesh.get_local_rank()
        return chunks[rank] if rank < len(chunks) else full[:0]
    whole = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return whole.redistribute(mesh, like.placements).to_local()


@torch.no_grad()
def init_sharded(model: nn.Module) -> None:
    """Run ``model.init_steps()`` on gathered copies of each module's sharded weights."""
    for module, step in model.init_steps():  # type: ignore[operator]
        swapped: list[tuple[nn.Module, str, DTensor]] = []
        for owner in module.modules():
            for name, p in owner._parameters.items():
                if isinstance(p, DTensor):
                    swapped.append((owner, name, p))
                    full = gather(p)  # initialized in fp32, as build_model does before any cast
                    full = full.float() if full.is_floating_point() else full
                    owner._parameters[name] = nn.Parameter(full, requires_grad=p.requires_grad)
        try:
            step()
        finally:
            for owner, name, p in swapped:
                p.to_local().copy_(local_part(owner._parameters[name].data, p))
                owner._parameters[name] = p
