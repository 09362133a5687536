"""Rotary position embedding in rotate-half layout: ``x * cos + rotate_half(x) * sin``,
``rotate_half(x) = (-x2, x1)`` for the halves ``x1``, ``x2`` of the last dimension; ``cos`` and ``sin``
broadcast to ``x`` (tables from zoo/model/rope.py)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .switch import Kernel, fast, register


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class _RotateHalf(torch.autograd.Function):
    """The rotation in three kernels each way.

    The tables are in rotate-half layout, so both halves of ``sin`` are equal and only the first is
    read: ``y1 = x1 cos1 - x2 sin1``, ``y2 = x2 cos2 + x1 sin1``. Its transpose gives the backward,
    ``dx1 = dy1 cos1 + dy2 sin1``, ``dx2 = dy2 cos2 - dy1 sin1``, without the negations, concatenations
    and gradient sums that autograd runs for the composite formula.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, -1), None, None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, sign: int) -> Tensor:
    """``x * cos + sign * rotate_half(x) * sin`` (``sign=-1``: the inverse rotation)."""
    half = x.shape[-1] // 2
    sin1 = sin[..., :half]
    y = x * cos
    y[..., :half].addcmul_(x[..., half:], sin1, value=-sign)
    y[..., half:].addcmul_(x[..., :half], sin1, value=sign)
    return y


def fused_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return _RotateHalf.apply(x, cos, sin)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` by the angles whose cos and sin tables broadcast to it."""
    return fused_rope(x, cos, sin) if fast() else rope_reference(x, cos, sin)


def _example(dtype: torch.dtype) -> tuple[Any, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 3, 16, generator=gen).to(dtype).requires_grad_()
    angles = torch.outer(torch.arange(9.0), 10000 ** (-torch.arange(0, 16, 2) / 16))
    emb = torch.cat((angles, angles), dim=-1)
    return x, emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


register(Kernel("rope", fused_rope, rope_reference, _example))
