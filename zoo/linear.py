"""Linear layers that run each CPU's fastest GEMM at the model's precision.

Two CPU cases differ from plain ``F.linear``:

- fp32: PyTorch's ``mm`` calls MKL's sgemm, which on some CPUs (AMD EPYC with AVX-512, measured
  here at 200-213 GFLOP/s on 2 cores) takes a far slower path than oneDNN's fp32 matmul (420-490).
  ``linear`` calls oneDNN (``torch.ops.mkldnn._linear_pointwise``), forward and backward: fp32
  operands, fp32 accumulation, as sgemm. ``ZOO_CPU_MATMUL=aten`` turns it off.
- bf16/fp16 on CPUs without reduced-precision matrix units (AVX2, no AVX512-BF16/AMX): a native
  bf16 GEMM runs at a few GFLOP/s there, so ``linear`` multiplies in fp32 on upcast operands:
  exact products with fp32 accumulation, which is what bf16 hardware computes, so results match
  a native bf16 GEMM to its rounding. Inputs, outputs, weights and gradients keep the model's dtype.

Elsewhere (CUDA, bf16 on CPUs with bf16 units, other dtypes) it is ``F.linear``.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

CPU_MATMUL_ENV = "ZOO_CPU_MATMUL"


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


def cpu_matmul() -> str:
    """``onednn`` or ``aten``: which library runs fp32 GEMMs on CPU (``$ZOO_CPU_MATMUL``, default ``onednn``
    where this torch has oneDNN's matmul op)."""
    choice = os.environ.get(CPU_MATMUL_ENV, "").strip().lower() or "auto"
    return _cpu_matmul(choice)


def cpu_matmul_libraries() -> tuple[str, ...]:
    """The libraries this torch can run fp32 CPU GEMMs on: ``aten`` (MKL's or OpenBLAS's sgemm), ``onednn``."""
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return ("aten", "onednn") if onednn else ("aten",)


@functools.lru_cache(maxsize=None)
def _cpu_matmul(choice: str) -> str:
    available = "onednn" in cpu_matmul_libraries()
    if choice == "auto":
        return "onednn" if available else "aten"
    if choice not in ("onednn", "aten"):
        raise ConfigError(f"{CPU_MATMUL_ENV}={choice!r}: use onednn, aten or leave it unset")
    if choice == "onednn" and not available:
        raise ConfigError(f"{CPU_MATMUL_ENV}=onednn: this torch ({torch.__version__}) has no oneDNN matmul; "
                          f"unset it or use aten")
    return choice


def uses_onednn(*tensors: Tensor, library: Optional[str] = None) -> bool:
    """Whether GEMMs on ``tensors`` run on oneDNN: all fp32 on CPU, ``library`` (default ``cpu_matmul()``) is
    ``onednn``, and no torch.compile trace is running (inductor picks its own GEMMs, and cannot lower oneDNN's op)."""
    return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and (library or cpu_matmul()) == "onednn" and not torch.compiler.is_compiling())


def onednn_matmul_t(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight.T (+ bias)`` on oneDNN with no checks, for loops that made them once (``uses_onednn``): fp32
    CPU operands, ``weight`` contiguous or a transposed view of a contiguous matrix (other strides run at about
    1 GFLOP/s)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


def matmul_t(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, library: Optional[str] = None,
             out: Optional[Tensor] = None) -> Tensor:
    """``x @ weight.T (+ bias)``, any strides and leading shape of ``x``, no autograd: fp32 CPU tensors on
    ``library`` (default ``cpu_matmul()``), anything else through ``F.linear``. With ``out`` (2-D ``x``, no
    bias) the product lands there: written directly by ``torch.mm``, copied from oneDNN's result. The building
    block of ``linear``'s forward and backward and of the MoE experts' matmuls."""
    if uses_onednn(x, library=library):
        y = onednn_matmul_t(x, weight, bias)
        return y if out is None else out.copy_(y)
    if out is not None:
        assert bias is None and x.dim() == 2, "matmul_t(out=...) takes a 2-D x and no bias"
        return torch.mm(x, weight.t(), out=out)
    return F.linear(x, weight, bias)


def weight_grad(dy: Tensor, x: Tensor, weight: Tensor, library: Optional[str] = None) -> Tensor:
    """``dy^T x``, a linear layer's weight gradient ``(out, in)`` from 2-D ``dy`` ``(n, out)`` and ``x`` ``(n, in)``
    (``weight`` gives only its shape), fp32 on CPU: on oneDNN its inner-product backward-weights primitive,
    which contracts over the rows without the transposed copies a matmul needs (12-16% faster at a 30M
    model's FFN and QKV shapes here); on aten a matmul whose transposed source is the narrower operand."""
    if uses_onednn(dy, x, library=library) and hasattr(torch.ops.aten, "mkldnn_linear_backward_weights"):
        return torch.ops.aten.mkldnn_linear_backward_weights(dy.contiguous().to_mkldnn(), x.contiguous().to_mkldnn(),
                                                             weight, False)[0]
    if dy.shape[1] > x.shape[1]:
        return matmul_t(x.t(), dy.t(), library=library).t().contiguous()
    return matmul_t(dy.t(), x.t(), library=library)


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


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear``; on CPU, through ``_CPULinear`` for fp32 on oneDNN (``cpu_matmul()``, the default) and for
    reduced precision this CPU has no units for (fp32 GEMMs on the upcast operands)."""
    if x.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and (
            compute_dtype(x) != x.dtype or uses_onednn(x, weight)):
        return _CPULinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is ``zoo.linear.linear``."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
