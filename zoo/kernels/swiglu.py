"""The SwiGLU activation ``silu(gate) * up`` of a fused ``[gate | up]`` projection."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .switch import Kernel, fast, register


def swiglu_reference(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """A backward that writes both halves of the gradient into one ``[d_gate | d_up]`` tensor: the gate/up
    matmul's backward takes it as is, with no concatenation of two separate gradients (autograd's
    backward of ``chunk``)."""

    @staticmethod
    def forward(ctx: Any, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx: Any, dh: Tensor) -> Tensor:
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        d = torch.empty_like(gate_up)
        d_gate, d_up = d.chunk(2, dim=-1)
        torch.mul(dh, act, out=d_up)
        torch.ops.aten.silu_backward.grad_input(dh * up, gate, grad_input=d_gate)
        return d


def fused_swiglu(gate_up: Tensor) -> Tensor:
    return _SwiGLU.apply(gate_up)


def swiglu(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` where ``gate_up`` is ``[gate | up]`` along the last dimension."""
    return fused_swiglu(gate_up) if fast() else swiglu_reference(gate_up)


def _example(dtype: torch.dtype) -> tuple[Any, ...]:
    gen = torch.Generator().manual_seed(0)
    return ((2 * torch.randn(3, 5, 64, generator=gen)).to(dtype).requires_grad_(),)


register(Kernel("swiglu", fused_swiglu, swiglu_reference, _example))
