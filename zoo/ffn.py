"""The dense FFN: SwiGLU, ``down(silu(gate(x)) * up(x))``, with gate and up fused in one matmul."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .init import Init
from .linear import Linear


class _SwiGLUAct(torch.autograd.Function):
    """``silu(gate) * up`` of the fused ``[gate | up]`` projection, whose backward writes both halves of
    the gradient into one ``[d_gate | d_up]`` tensor: the gate/up matmul's backward takes it as is, with
    no concatenation of two separate gradients (autograd's backward of ``chunk``)."""

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


def swiglu(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` where ``gate_up`` is ``[gate | up]`` along the last dimension."""
    return _SwiGLUAct.apply(gate_up)


class SwiGLU(nn.Module):
    """``gate_up.weight`` is ``[gate; up]`` stacked, ``(2F, d)``; ``down.weight`` is ``(d, F)``."""

    def __init__(self, d_model: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.gate_up = Linear(d_model, 2 * hidden_size, bias=False)
        self.down = Linear(hidden_size, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(swiglu(self.gate_up(x)))

    def init_weights(self, init: Init) -> None:
        init(self.gate_up.weight[: self.hidden_size], "ffn_in")  # gate and up separately: fan-based
        init(self.gate_up.weight[self.hidden_size:], "ffn_in")   # inits must see one projection
        init(self.down.weight, "ffn_out")
