"""RMSNorm, ``x / sqrt(mean(x^2) + eps) * g`` in fp32 (fp64 for fp64 inputs), in ``x``'s dtype."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .switch import Kernel, fast, register


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)
    return (xa * torch.rsqrt(xa.square().mean(-1, keepdim=True) + eps) * weight.to(acc)).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """The reference's forward with a hand-written backward.

    Autograd's backward of the composite runs about a dozen elementwise kernels, one per op of the
    forward; this one needs five and saves only ``x`` and ``r = 1 / sqrt(mean(x^2) + eps)`` (one value
    per row), recomputing ``x * r``: ``dg = sum(dy * x * r)``, ``dx = r * (dy * g - x * r * mean(dy * g * x * r))``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        xa = x.to(acc)
        r = torch.rsqrt(xa.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, r)
        return (xa * r).mul_(weight.to(acc)).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None]:
        x, weight, r = ctx.saved_tensors
        x_hat, dy = x.to(r.dtype) * r, dy.to(r.dtype)
        dweight = (dy * x_hat).flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dy_g = dy * weight.to(r.dtype)
            dot = (dy_g * x_hat).mean(-1, keepdim=True)
            dx = dy_g.sub_(x_hat.mul_(dot)).mul_(r).to(x.dtype)
        return dx, dweight, None


def fused_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _RMSNorm.apply(x, weight, eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of ``x`` over its last dimension with gain ``weight``."""
    return fused_rms_norm(x, weight, eps) if fast() else rms_norm_reference(x, weight, eps)


def _example(dtype: torch.dtype) -> tuple[Any, ...]:
    gen = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(3, 7, 48, generator=gen)).to(dtype).requires_grad_()
    w = (1 + torch.randn(48, generator=gen) / 4).to(dtype).requires_grad_()
    return x, w, 1e-5


register(Kernel("rms_norm", fused_rms_norm, rms_norm_reference, _example))
