"""Initialization of sharded weights, one step at a time, with a single process's random numbers.

The model is built on ``meta`` and sharded, so no rank ever holds it whole. Then, for each step of
``ZooModel.init_steps`` in order, every rank draws the numbers a single process draws, from the same
seeded generator, and keeps its part. A step holds at most one weight, or one piece of one, whole:

- the embedding and an untied head: drawn whole into one buffer, which is reused for the truncated
  normal's redraws; nothing is gathered;
- ``init_weights(init)`` of an attention or FFN: first run on meta stand-ins with ``init`` recording its
  calls; if it did nothing else, each call is replayed on a buffer the size of its piece (a projection,
  one expert's matrix) and each rank keeps the rows it holds;
- PyTorch's default initializers of a linear or an embedding: on an empty whole weight (they write
  every value);
- any other step (a module's own ``reset_parameters``, an ``init_weights`` that writes more than its
  ``init`` calls, weights split otherwise than by rows): on its module's weights gathered whole.

Every rank ends with its part of exactly the weights a single-process build of the same seed makes.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.utils._python_dispatch import TorchDispatchMode

from ..model.init import inside_probability, redraw_outside

CHUNK = 1 << 16  # elements of a weight looked at at once when patching a shard


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
        if step.through is not None and replay_per_weight(step.module, step.through):
            continue
        run_gathered(step)


def run_gathered(step: Any) -> None:
    """Run ``step`` on whole copies of its module's sharded weights (gathered, or empty where the step writes
    every value), then keep each rank's part; the copies go when this returns."""
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


class _Recorder:
    """Stands in for an ``Init`` while ``init_weights`` runs on meta weights: records each call, draws nothing."""

    def __init__(self, init: Any):
        self.init, self.calls = init, []

    def __call__(self, weight: torch.Tensor, role: str) -> None:
        self.calls.append((weight, role))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.init, name)


class _Mutations(TorchDispatchMode):
    """Notes whether any operation that writes a tensor ran."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.seen = self.seen or func._schema.is_mutable
        return func(*args, **(kwargs or {}))


def _rows(p: DTensor) -> Optional[tuple[int, int]]:
    """The rows [start, end) of dim 0 this rank holds, where ``p`` is split on dim 0 over one mesh axis and
    replicated over the others; None for any other layout."""
    shards = [axis for axis, pl in enumerate(p.placements) if not pl.is_replicate()]
    if len(shards) != 1 or type(p.placements[shards[0]]) is not Shard or p.placements[shards[0]].dim != 0:
        return None
    axis = shards[0]
    n, parts, at = p.shape[0], p.device_mesh.size(axis), p.device_mesh.get_coordinate()[axis]
    size = -(-n // parts)  # torch.chunk's: equal pieces of ceil(n / parts) rows, the last ones short or empty
    return min(at * size, n), min((at + 1) * size, n)


def replay_per_weight(module: nn.Module, init: Any) -> bool:
    """``module.init_weights(init)`` one weight at a time, without gathering any: it is first run on meta
    stand-ins of its (sharded) weights with ``init`` recording its calls; if it did nothing but call ``init`` on
    contiguous pieces of them (no other write), each call is replayed in order on a buffer the size of its
    piece, drawing the same numbers, and each rank keeps what falls in its rows. False (nothing done) for a
    module that does more, or weights split otherwise than by rows; the caller gathers them then."""
    params = [(owner, name, p) for owner in module.modules() for name, p in owner._parameters.items() if p is not None]
    if not params or not all(isinstance(p, DTensor) and _rows(p) is not None for _, _, p in params):
        return False
    stand_ins = {}
    for owner, name, p in params:
        stand_ins[owner, name] = nn.Parameter(torch.empty(p.shape, dtype=torch.float32, device="meta"),
                                              requires_grad=p.requires_grad)
        owner._parameters[name] = stand_ins[owner, name]
    recorder, writes = _Recorder(init), _Mutations()
    try:
        with writes:
            module.init_weights(recorder)  # type: ignore[operator]
    finally:
        for owner, name, p in params:
            owner._parameters[name] = p
    targets = {id(t): params[i][2] for i, t in enumerate(stand_ins.values())}
    plan = []
    for piece, role in recorder.calls:
        base = piece if piece._base is None else piece._base
        if id(base) not in targets or not piece.is_contiguous():
            return False
        plan.append((targets[id(base)], piece.storage_offset(), piece.shape, role))
    if writes.seen:
        return False
    for p, offset, shape, role in plan:
        buffer = torch.empty(shape, dtype=torch.float32, device=p.to_local().device)
        init(buffer, role)
        start, end = _rows(p)
        row = math.prod(p.shape[1:])
        lo, hi = max(offset, start * row), min(offset + buffer.numel(), end * row)
        if lo < hi:
            local = p.to_local().view(-1)
            local[lo - start * row:hi - start * row].copy_(buffer.view(-1)[lo - offset:hi - offset])
        del buffer  # before the next piece's is made
    return True
