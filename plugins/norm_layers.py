"""Built-in norm layers: rmsnorm, layernorm, dyt.

Each is a plain ``nn.Module`` made as ``cls(dim, eps=..., **norm_layer_options)``; strategies and
attention make them through ``make_norm(dim)``, so each runs in every placement.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import zoo


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * g`` (Zhang & Sennrich 2019), computed in fp32, gain only."""

    hf_rms_norm = True  # transformers' RMSNorm, gain only (zoo convert)

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm over {self.dim} features got an input of shape {tuple(x.shape)}")
        return zoo.nn.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps) * g + b`` (Ba et al. 2016); ``bias=False`` drops b."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (self.dim,), self.weight.float(), bias, self.eps).to(x.dtype)


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al. 2025): ``g * tanh(a x) + b`` with a scalar ``a``; ``eps`` is unused."""

    def __init__(self, dim: int, eps: Optional[float] = None, alpha_init: float = 0.5):
        super().__init__()
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.full((1,), alpha_init))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias


@zoo.hookimpl
def register_norm_layers(register):
    register("rmsnorm", RMSNorm)
    register("layernorm", LayerNorm)
    register("dyt", DyT)
