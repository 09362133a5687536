"""The dense FFN: SwiGLU, ``down(silu(gate(x)) * up(x))``, with gate and up fused in one matmul."""
from __future__ import annotations

from torch import Tensor, nn

from ..kernels.linear import Linear
from ..kernels.swiglu import swiglu
from .init import Init


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
