"""Initialization of sharded weights, one step at a time, with a single process's random numbers.

The model is built on ``meta`` and sharded, so no rank ever holds it whole. Then, for each step of
``ZooModel.init_steps`` in order, the step runs on whole copies of its module's weights (gathered, so
the values already set survive; or left empty where the step writes every value), drawing the same
numbers from the same seeded generator as in one process, and each rank keeps its shard. A step that
only draws one weight by role (the embedding, the head) gathers nothing: every rank draws the whole
weight into one buffer, keeps its part, and reuses the buffer for the truncated normal's redraws. Every
rank ends with its part of exactly the weights a single-process build of the same seed makes.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..model.init import inside_probability, redraw_outside

CHUNK = 1 << 20  # elements of a weight looked at at once when patching a shard


def local_part(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's shard of ``full`` in ``like``'s layout (no communication: every rank has ``full``): a view of
    ``full`` where the layout is plain ``Shard``s and ``Replicate``s (as ``torch.chunk`` splits, which DTensor
    follows), else DTensor's own redistribution, a copy."""
    mesh = like.device_mesh
    coordinate = mesh.get_coordinate()
    view = full
    for axis, placement in enumerate(like.placements):
        if type(placement) is Shard:
            chunks = view.chunk(mesh.size(axis), dim=placement.dim)
            at = coordinate[axis] if coordinate is not None else 0
            view = chunks[at] if at < len(chunks) else view.narrow(placement.dim, 0, 0)
        elif not placement.is_replicate():
            whole = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
            return whole.redistribute(mesh, like.placements).to_local()
    return view


@torch.no_grad()
def init_sharded(model: nn.Module) -> None:
    """Run ``model.init_steps()`` on sharded weights, each rank keeping its part (see the module doc)."""
    for step in model.init_steps():  # type: ignore[operator]
        weight = getattr(step.module, "weight", None)
        if step.whole is not None and isinstance(weight, DTensor):
            init, role = step.whole
            std = init.std_for(role)
            draw_sharded(weight, std, -init.cutoff * std, init.cutoff * std)
            continue
        swapped: list[tuple[nn.Module, str, DTensor]] = []
        for owner in step.module.modules():
            for name, p in owner._parameters.items():
                if isinstance(p, DTensor):
                    swapped.append((owner, name, p))
                    if step.overwrites and owner is step.module:  # its values are all written anew
                        full = torch.empty(p.shape, dtype=torch.float32 if p.is_floating_point() else p.dtype,
                                           device=p.to_local().device)
                    else:
                        full = p.full_tensor()  # initialized in fp32, as build_model does before any cast
                        full = full.float() if full.is_floating_point() else full
                    owner._parameters[name] = nn.Parameter(full, requires_grad=p.requires_grad)
        try:
            step.run()
        finally:
            for owner, name, p in swapped:
                p.to_local().copy_(local_part(owner._parameters[name].data, p))
                owner._parameters[name] = p


def draw_sharded(weight: DTensor, std: float, a: float, b: float) -> None:
    """``zoo.model.init.trunc_normal_`` of a sharded weight, the same numbers: each rank draws the whole weight
    into one fp32 buffer (as a single process draws it), keeps its part, and reuses the buffer for the redraws
    of the few values outside [a, b], whose first values inside then patch its part."""
    local = weight.to_local()
    full = torch.empty(weight.shape, dtype=torch.float32, device=local.device)
    if inside_probability(std, a, b) <= 0.3:  # where trunc_normal_ leaves it to torch's own sampling
        nn.init.trunc_normal_(full, mean=0.0, std=std, a=a, b=b)
        local.copy_(local_part(full, weight))
        return
    lo, hi = full.new_tensor(a).item(), full.new_tensor(b).item()
    full.normal_(0.0, std)
    local.copy_(local_part(full, weight))
    index, values = redraw_outside(full, lambda: full.normal_(0.0, std), lo, hi)
    if index.numel():
        full.fill_(float("nan"))  # a canvas: the patched values where they go, NaN (no normal draw) elsewhere
        full.view(-1)[index] = values
        patch = local_part(full, weight)
        pairs = zip(local.view(-1).split(CHUNK), patch.reshape(-1).split(CHUNK)) if local.is_contiguous() \
            and patch.is_contiguous() else [(local, patch)]
        for mine, part in pairs:  # a piece at a time, so the masks stay small
            keep = ~part.isnan()
            mine[keep] = part[keep].to(mine.dtype)
