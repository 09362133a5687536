"""Linear layers: ``F.linear``, or on CPU every GEMM in fp32 through ``gemm.matmul_t`` (see zoo/kernels/gemm.py)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gemm import compute_dtype, matmul_t, uses_onednn, weight_grad
from .switch import Kernel, fast, register


def linear_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return F.linear(x, weight, bias)


class _CPULinear(torch.autograd.Function):
    """``x @ w.T + b`` on CPU with every GEMM in fp32 through ``matmul_t``: for fp32 models, and for
    bf16/fp16 ones on CPUs without their units (upcast operands; the low-precision ones are saved, not
    fp32 copies, and outputs and gradients come back in the model's dtypes)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = matmul_t(x.float(), weight.float(), None if bias is None else bias.float())
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight = ctx.saved_tensors
        dy32 = dy.float().reshape(-1, dy.shape[-1])
        dx = wgrad = bgrad = None
        if ctx.needs_input_grad[0]:
            dx = matmul_t(dy32, weight.float().t()).view(*x.shape[:-1], weight.shape[1]).to(x.dtype)
        if ctx.needs_input_grad[1]:
            wgrad = weight_grad(dy32, x.float().reshape(-1, x.shape[-1]), weight.float()).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            bgrad = dy32.sum(0).to(weight.dtype)
        return dx, wgrad, bgrad


def cpu_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return _CPULinear.apply(x, weight, bias)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear``; on CPU, fp32 GEMMs on oneDNN (``cpu_matmul()``, the default) and fp32 GEMMs on upcast
    operands for a reduced precision this CPU has no units for."""
    if fast() and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and (
            compute_dtype(x) != x.dtype or uses_onednn(x, weight)):
        return cpu_linear(x, weight, bias)
    return linear_reference(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is ``zoo.kernels.linear``."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def _example(dtype: torch.dtype) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(40, 24, generator=gen) / 5).to(dtype).requires_grad_()
    b = torch.randn(40, generator=gen).to(dtype).requires_grad_()
    return x, w, b


register(Kernel("linear", cpu_linear, linear_reference, _example))
