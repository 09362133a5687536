"""Linear layers that stay fast in bf16/fp16 on CPUs without reduced-precision matrix units.

On such CPUs (AVX2, no AVX512-BF16/AMX) a native bf16 GEMM runs at a few GFLOP/s, far below
fp32. ``linear`` then multiplies in fp32 on upcast operands: exact products with fp32
accumulation, which is what bf16 hardware computes, so results match a native bf16 GEMM to its
rounding. Inputs, outputs, weights and gradients keep the model's dtype; elsewhere (fp32, CUDA,
CPUs with bf16 units) it is ``F.linear``.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@functools.lru_cache(maxsize=None)
def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU has matrix instructions for ``dtype`` (AVX512-BF16/AMX, AVX512-FP16)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False
    return True


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype GEMMs on ``x`` should run in: fp32 for reduced precision on CPUs that lack its units."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not cpu_has_native(x.dtype):
        return torch.float32
    return x.dtype


class _UpcastLinear(torch.autograd.Function):
    """``x @ w.T + b`` computed in fp32, saving the low-precision operands (not fp32 copies)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight = ctx.saved_tensors
        dy32 = dy.float().reshape(-1, dy.shape[-1])
        dx = wgrad = bgrad = None
        if ctx.needs_input_grad[0]:
            dx = (dy32 @ weight.float()).view(*x.shape[:-1], weight.shape[1]).to(x.dtype)
        if ctx.needs_input_grad[1]:
            wgrad = (dy32.t() @ x.float().reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            bgrad = dy32.sum(0).to(weight.dtype)
        return dx, wgrad, bgrad


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear``, computed in fp32 where this CPU has no units for ``x``'s reduced precision."""
    if compute_dtype(x) != x.dtype:
        return _UpcastLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is ``zoo.linear.linear``."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
