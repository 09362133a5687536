"""Which GEMM a CPU runs fastest at the model's precision, and the plain products built on it.

Two CPU cases differ from plain ``F.linear``:

- fp32: PyTorch's ``mm`` calls MKL's sgemm, which on some CPUs (AMD EPYC with AVX-512) takes a far
  slower path than oneDNN's fp32 matmul (``benchmarks/results`` has the figures). The fast paths call
  oneDNN (``torch.ops.mkldnn._linear_pointwise``): fp32 operands, fp32 accumulation, as sgemm.
  ``ZOO_CPU_MATMUL=aten`` keeps them on ``mm``.
- bf16/fp16 on CPUs without reduced-precision matrix units (AVX2, no AVX512-BF16/AMX): a native bf16
  GEMM runs at a few GFLOP/s there, so the fast paths multiply in fp32 on upcast operands: exact
  products with fp32 accumulation, which is what bf16 hardware computes.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

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
    """The dtype GEMMs on ``x`` run in on a fast path: fp32 for reduced precision on CPUs that lack its units."""
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
    CPU operands, ``weight`` contiguous or a transposed view of a contiguous matrix (other strides are slow)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


def matmul_t(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, library: Optional[str] = None,
             out: Optional[Tensor] = None) -> Tensor:
    """``x @ weight.T (+ bias)``, any strides and leading shape of ``x``, no autograd: fp32 CPU tensors on
    ``library`` (default ``cpu_matmul()``), anything else through ``F.linear``. With ``out`` (2-D ``x``, no
    bias) the product lands there: written directly by ``torch.mm``, copied from oneDNN's result. The building
    block of the fast linear's forward and backward and of the fused MoE experts' matmuls."""
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
    which contracts over the rows without the transposed copies a matmul needs; on aten a matmul whose
    transposed source is the narrower operand."""
    if uses_onednn(dy, x, library=library) and hasattr(torch.ops.aten, "mkldnn_linear_backward_weights"):
        return torch.ops.aten.mkldnn_linear_backward_weights(dy.contiguous().to_mkldnn(), x.contiguous().to_mkldnn(),
                                                             weight, False)[0]
    if dy.shape[1] > x.shape[1]:
        return matmul_t(x.t(), dy.t(), library=library).t().contiguous()
    return matmul_t(dy.t(), x.t(), library=library)
