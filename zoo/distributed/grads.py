"""Gradient norms and clipping that hold for sharded (DTensor) gradients on any mix of meshes.

``torch.nn.utils.clip_grad_norm_`` wants every DTensor on one mesh; under expert parallelism the
experts live on another. Here each gradient's norm is reduced over its own mesh, then combined.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor


def grad_norm(grad: Tensor) -> Tensor:
    """The 2-norm of a whole gradient, sharded or not: a DTensor's local sum of squares is summed over
    each mesh dimension it is split along (not those it is replicated over)."""
    if not isinstance(grad, DTensor):
        return torch.linalg.vector_norm(grad)
    squares = grad.to_local().square().sum()
    for dim, placement in enumerate(grad.placements):
        if not placement.is_replicate():
            dist.all_reduce(squares, group=grad.device_mesh.get_group(dim))
    return squares.sqrt()


def total_grad_norm(params: Iterable[torch.nn.Parameter]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([grad_norm(g) for g in grads]))


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> Tensor:
    """Scale the gradients so that their total norm is at most ``max_norm`` (torch's rule: by
    ``max_norm / (norm + 1e-6)``, clamped at 1); returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not any(isinstance(p.grad, DTensor) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = total_grad_norm(params)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        grad.mul_(coef.to(grad.dtype))
    return total
