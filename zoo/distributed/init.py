"""Initialization of sharded weights, one module at a time, with a single process's random numbers.

The model is built on ``meta`` and sharded, so no rank ever holds it whole. Then, for each step of
``ZooModel.init_steps`` in order, the weights of that step's module are gathered (the values already
set survive), the step runs on them as it would in one process, drawing the same numbers from the
same seeded generator, and each rank keeps its shard. Every rank ends with its part of exactly the
weights a single-process build of the same seed makes.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate


def local_part(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's shard of ``full`` in ``like``'s layout (no communication: every rank has ``full``)."""
    mesh = like.device_mesh
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
                    full = p.full_tensor()  # initialized in fp32, as build_model does before any cast
                    full = full.float() if full.is_floating_point() else full
                    owner._parameters[name] = nn.Parameter(full, requires_grad=p.requires_grad)
        try:
            step()
        finally:
            for owner, name, p in swapped:
                p.to_local().copy_(local_part(owner._parameters[name].data, p))
                owner._parameters[name] = p
