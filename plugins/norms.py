"""Built-in norm layers (rmsnorm, layernorm, dyt) and norm strategies (where the norms sit).

Equations follow shared/reference/variants.md (section A) and hybridnorm.md (sections 1.1, 1.3).
``N`` is the configured norm layer; ``A`` attention; ``F`` the FFN; ``x`` the block input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import zoo
from zoo import Init, NormStrategy
from zoo.errors import ConfigError


# ---------------------------------------------------------------------------------------------
# Norm layers
# ---------------------------------------------------------------------------------------------
class _RMSNormFn(torch.autograd.Function):
    """``x * r * g`` with ``r = 1 / sqrt(mean(x^2) + eps)``, with a hand-written backward.

    Autograd's backward of the composite ``F.rms_norm`` on CPU runs about a dozen elementwise kernels,
    one per op of the forward; this one needs five and saves only ``x`` and ``r`` (one value per
    row), recomputing ``x * r``: ``dg = sum(dy * x * r)``, ``dx = r * (dy * g - x * r * mean(dy * g * x * r))``.
    Statistics and products are in fp32 (fp64 for fp64 inputs); ``x``'s dtype comes back.
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


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * g`` (Zhang & Sennrich 2019), computed in fp32, gain only."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm over {self.dim} features got an input of shape {tuple(x.shape)}")
        return _RMSNormFn.apply(x, self.weight, self.eps)


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


# ---------------------------------------------------------------------------------------------
# Norm strategies
# ---------------------------------------------------------------------------------------------
class PreNorm(NormStrategy):
    """Pre-LN (Xiong et al. 2020): ``h = x + A(N(x)); x' = h + F(N(h))``, final norm."""

    def __init__(self, cfg, layer, make_norm, options=None):
        super().__init__(cfg, layer, make_norm, options)
        self.attn_norm = make_norm(cfg.d_model)
        self.ffn_norm = make_norm(cfg.d_model)

    def forward(self, x, attn, ffn):
        h = x + attn(self.attn_norm(x))
        return h + ffn(self.ffn_norm(h))


class PostNorm(NormStrategy):
    """Post-LN (Vaswani et al. 2017): ``h = N(x + A(x)); x' = N(h + F(h))``, no final norm."""

    final_norm = False

    def __init__(self, cfg, layer, make_norm, options=None):
        super().__init__(cfg, layer, make_norm, options)
        self.attn_norm = make_norm(cfg.d_model)
        self.ffn_norm = make_norm(cfg.d_model)

    def forward(self, x, attn, ffn):
        h = self.attn_norm(x + attn(x))
        return self.ffn_norm(h + ffn(h))


class HybridNorm(NormStrategy):
    """HybridNorm (Zhuo et al. 2025): per-head RMSNorm on Q, K, V; no attention input norm;
    ``h = x + A(x); z = N(h); x' = z + F(z)`` (the FFN residual is taken after the norm)."""

    qkv_norm = ("q", "k", "v")

    def __init__(self, cfg, layer, make_norm, options=None):
        super().__init__(cfg, layer, make_norm, options)
        self.ffn_norm = make_norm(cfg.d_model)

    def forward(self, x, attn, ffn):
        z = self.ffn_norm(x + attn(x))
        return z + ffn(z)


class HybridNormStar(NormStrategy):
    """HybridNorm*: block 0 is Pre-Norm in both sublayers with QKV-Norm kept,
    ``h = x + A(N(x)); x' = h + F(N(h))``; later blocks are HybridNorm, ``z = N(x + A(x)); x' = z + F(z)``."""

    qkv_norm = ("q", "k", "v")

    def __init__(self, cfg, layer, make_norm, options=None):
        super().__init__(cfg, layer, make_norm, options)
        self.attn_norm = make_norm(cfg.d_model) if layer == 0 else None
        self.ffn_norm = make_norm(cfg.d_model)

    def forward(self, x, attn, ffn):
        if self.attn_norm is not None:
            h = x + attn(self.attn_norm(x))
            return h + ffn(self.ffn_norm(h))
        z = self.ffn_norm(x + attn(x))
        return z + ffn(z)


class MixLN(NormStrategy):
    """Mix-LN (Li et al. 2024): Post-LN in layers ``l < floor(alpha * L)``, Pre-LN after; final norm."""

    @dataclass
    class Options:
        alpha: float = 0.25

    def __init__(self, cfg, layer, make_norm, options):
        super().__init__(cfg, layer, make_norm, options)
        if not 0.0 <= options.alpha <= 1.0:
            raise ConfigError(f"norm_options.alpha must lie in [0, 1] for mixln, got {options.alpha}")
        self.post = layer < math.floor(options.alpha * cfg.n_layers)
        self.attn_norm = make_norm(cfg.d_model)
        self.ffn_norm = make_norm(cfg.d_model)

    def forward(self, x, attn, ffn):
        if self.post:
            h = self.attn_norm(x + attn(x))
            return self.ffn_norm(h + ffn(h))
        h = x + attn(self.attn_norm(x))
        return h + ffn(self.ffn_norm(h))


class PeriLN(NormStrategy):
    """Peri-LN (Kim et al. 2025), the same graph as Sandwich-LN (Ding et al. 2021):
    ``h = x + N(A(N(x))); x' = h + N(F(N(h)))``, final norm; ``embed_norm: true`` adds ``N(embed)``."""

    def __init__(self, cfg, layer, make_norm, options=None):
        super().__init__(cfg, layer, make_norm, options)
        self.attn_in_norm = make_norm(cfg.d_model)
        self.attn_out_norm = make_norm(cfg.d_model)
        self.ffn_in_norm = make_norm(cfg.d_model)
        self.ffn_out_norm = make_norm(cfg.d_model)

    def forward(self, x, attn, ffn):
        h = x + self.attn_out_norm(attn(self.attn_in_norm(x)))
        return h + self.ffn_out_norm(ffn(self.ffn_in_norm(h)))


class QKNorm(PreNorm):
    """Pre-Norm plus QK-Norm (Dehghani et al. 2023): Q and K normalized before RoPE,
    per head (Qwen3, one gain of head size) or full width (OLMo-2) by ``norm_options.width``."""

    qkv_norm = ("q", "k")

    @dataclass
    class Options:
        width: str = "head"

    def __init__(self, cfg, layer, make_norm, options):
        super().__init__(cfg, layer, make_norm, options)
        if options.width not in ("head", "full"):
            raise ConfigError(f"norm_options.width must be 'head' or 'full' for qknorm, got {options.width!r}")
        self.qkv_norm_width = options.width


class OLMo2(NormStrategy):
    """OLMo-2 reordered norm: ``h = x + N(A(x)); x' = h + N(F(h))``, full-width QK-Norm, final norm."""

    qkv_norm = ("q", "k")
    qkv_norm_width = "full"

    def __init__(self, cfg, layer, make_norm, options=None):
        super().__init__(cfg, layer, make_norm, options)
        self.attn_out_norm = make_norm(cfg.d_model)
        self.ffn_out_norm = make_norm(cfg.d_model)

    def forward(self, x, attn, ffn):
        h = x + self.attn_out_norm(attn(x))
        return h + self.ffn_out_norm(ffn(h))


@dataclass(frozen=True)
class XavierInit(Init):
    """DeepNet's init: Xavier normal, gain ``beta`` on V, O and the FFN, gain 1 on Q and K."""

    beta: float = 1.0

    @torch.no_grad()
    def __call__(self, weight: Tensor, role: str) -> None:
        if role not in ("q", "k", "v", "o", "ffn_in", "ffn_out"):
            return super().__call__(weight, role)
        fan_out, fan_in = weight.shape[-2], weight.shape[-1]
        gain = 1.0 if role in ("q", "k") else self.beta
        nn.init.normal_(weight, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))


class DeepNorm(NormStrategy):
    """DeepNorm (Wang et al. 2022): ``h = N(alpha x + A(x)); x' = N(alpha h + F(h))``, no final norm,
    alpha = (2L)^(1/4) and Xavier init with gain beta = (8L)^(-1/4) on V, O and the FFN."""

    final_norm = False

    @dataclass
    class Options:
        alpha: Optional[float] = None
        beta: Optional[float] = None

    def __init__(self, cfg, layer, make_norm, options):
        super().__init__(cfg, layer, make_norm, options)
        n = cfg.n_layers
        self.alpha = options.alpha if options.alpha is not None else (2 * n) ** 0.25
        self.beta = options.beta if options.beta is not None else (8 * n) ** -0.25
        self.attn_norm = make_norm(cfg.d_model)
        self.ffn_norm = make_norm(cfg.d_model)

    def forward(self, x, attn, ffn):
        h = self.attn_norm(self.alpha * x + attn(x))
        return self.ffn_norm(self.alpha * h + ffn(h))

    def init_scheme(self, init: Init) -> Init:
        return XavierInit(std=init.std, out_std=init.out_std, head_std=init.head_std, cutoff=init.cutoff,
                          gains=init.gains, beta=self.beta)


@zoo.hookimpl
def register_norm_layers(register):
    register("rmsnorm", RMSNorm)
    register("layernorm", LayerNorm)
    register("dyt", DyT)


@zoo.hookimpl
def register_norm_strategies(register):
    register("prenorm", PreNorm)
    register("postnorm", PostNorm)
    register("hybridnorm", HybridNorm)
    register("hybridnorm-star", HybridNormStar)
    register("mixln", MixLN)
    register("periln", PeriLN)
    register("sandwich", PeriLN)
    register("qknorm", QKNorm)
    register("olmo2", OLMo2)
    register("deepnorm", DeepNorm)
