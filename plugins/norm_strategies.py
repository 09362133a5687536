"""Built-in norm strategies: where the norms sit in a block and where each residual is taken.

Equations follow shared/reference/variants.md (section A) and hybridnorm.md (sections 1.1, 1.3).
``N`` is the configured norm layer; ``A`` attention; ``F`` the FFN; ``x`` the block input. Each
strategy names its norms in ``norms``; the base class makes them with ``make_norm(d_model)``.

``zoo convert`` reads what each strategy is in Hugging Face transformers' terms from it: ``hf_norms``
(its norms under transformers' per-layer names), ``hf_qk_options`` (the q/k-norm widths it can take,
with the ``norm_options`` for each), or ``hf_missing`` (why no transformers architecture wires a block so).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

import zoo
from zoo import ConfigError, Init, NormStrategy


class PreNorm(NormStrategy):
    """Pre-LN (Xiong et al. 2020): ``h = x + A(N(x)); x' = h + F(N(h))``, final norm."""

    norms = ("attn_norm", "ffn_norm")
    hf_norms = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}

    def forward(self, x, attn, ffn):
        h = x + attn(self.attn_norm(x))
        return h + ffn(self.ffn_norm(h))


class PostNorm(NormStrategy):
    """Post-LN (Vaswani et al. 2017): ``h = N(x + A(x)); x' = N(h + F(h))``, no final norm."""

    norms = ("attn_norm", "ffn_norm")
    final_norm = False
    hf_missing = ("Post-LN normalizes after each residual add (x' = N(h + F(h))) and has no final norm; no "
                  "transformers decoder with RoPE, RMSNorm and SwiGLU is wired that way")

    def forward(self, x, attn, ffn):
        h = self.attn_norm(x + attn(x))
        return self.ffn_norm(h + ffn(h))


class HybridNorm(NormStrategy):
    """HybridNorm (Zhuo et al. 2025): per-head RMSNorm on Q, K, V; no attention input norm;
    ``h = x + A(x); z = N(h); x' = z + F(z)`` (the FFN residual is taken after the norm)."""

    norms = ("ffn_norm",)
    qkv_norm = ("q", "k", "v")
    hf_missing = ("HybridNorm normalizes Q, K and V per head and takes the FFN residual after the norm "
                  "(z = N(x + A(x)); x' = z + F(z)); no transformers architecture computes that")

    def forward(self, x, attn, ffn):
        z = self.ffn_norm(x + attn(x))
        return z + ffn(z)


class HybridNormStar(HybridNorm):
    """HybridNorm*: block 0 is Pre-Norm in both sublayers with QKV-Norm kept,
    ``h = x + A(N(x)); x' = h + F(N(h))``; later blocks are HybridNorm, ``z = N(x + A(x)); x' = z + F(z)``."""

    hf_missing = ("HybridNorm* normalizes Q, K and V per head and, after a pre-norm first block, takes the FFN "
                  "residual after the norm (z = N(x + A(x)); x' = z + F(z)); no transformers architecture computes that")

    def norm_names(self):
        return ("attn_norm", "ffn_norm") if self.layer == 0 else ("ffn_norm",)

    def forward(self, x, attn, ffn):
        if self.layer == 0:
            h = x + attn(self.attn_norm(x))
            return h + ffn(self.ffn_norm(h))
        return super().forward(x, attn, ffn)


class MixLN(NormStrategy):
    """Mix-LN (Li et al. 2024): Post-LN in layers ``l < floor(alpha * L)``, Pre-LN after; final norm."""

    norms = ("attn_norm", "ffn_norm")
    hf_missing = ("Mix-LN switches from Post-LN to Pre-LN part-way through the stack; no transformers architecture "
                  "mixes the two")

    @dataclass
    class Options:
        alpha: float = 0.25

    def __init__(self, cfg, layer, make_norm, options):
        if not 0.0 <= options.alpha <= 1.0:
            raise ConfigError(f"norm_options.alpha must lie in [0, 1] for mixln, got {options.alpha}")
        super().__init__(cfg, layer, make_norm, options)
        self.post = layer < math.floor(options.alpha * cfg.n_layers)

    def forward(self, x, attn, ffn):
        if self.post:
            h = self.attn_norm(x + attn(x))
            return self.ffn_norm(h + ffn(h))
        h = x + attn(self.attn_norm(x))
        return h + ffn(self.ffn_norm(h))


class PeriLN(NormStrategy):
    """Peri-LN (Kim et al. 2025), the same graph as Sandwich-LN (Ding et al. 2021):
    ``h = x + N(A(N(x))); x' = h + N(F(N(h)))``, final norm; ``embed_norm: true`` adds ``N(embed)``."""

    norms = ("attn_in_norm", "attn_out_norm", "ffn_in_norm", "ffn_out_norm")
    hf_missing = ("Peri-LN (Sandwich-LN) normalizes both the input and the output of each sublayer; the nearest "
                  "transformers architecture (Gemma-2) also scales the embeddings by sqrt(d) and uses (1 + w) norm "
                  "gains, so it does not compute the same function")

    def forward(self, x, attn, ffn):
        h = x + self.attn_out_norm(attn(self.attn_in_norm(x)))
        return h + self.ffn_out_norm(ffn(self.ffn_in_norm(h)))


class QKNorm(PreNorm):
    """Pre-Norm plus QK-Norm (Dehghani et al. 2023): Q and K normalized before RoPE,
    per head (Qwen3, one gain of head size) or full width (OLMo-2) by ``norm_options.width``."""

    qkv_norm = ("q", "k")
    hf_qk_options = {"head": {"width": "head"}, "full": {"width": "full"}}  # Qwen3 per head, OLMoE at full width

    @dataclass
    class Options:
        width: str = "head"

    def __init__(self, cfg, layer, make_norm, options):
        if options.width not in ("head", "full"):
            raise ConfigError(f"norm_options.width must be 'head' or 'full' for qknorm, got {options.width!r}")
        super().__init__(cfg, layer, make_norm, options)
        self.qkv_norm_width = options.width


class OLMo2(NormStrategy):
    """OLMo-2 reordered norm: ``h = x + N(A(x)); x' = h + N(F(h))``, full-width QK-Norm, final norm."""

    norms = ("attn_out_norm", "ffn_out_norm")
    qkv_norm = ("q", "k")
    qkv_norm_width = "full"
    hf_norms = {"attn_out_norm": "post_attention_layernorm", "ffn_out_norm": "post_feedforward_layernorm"}
    hf_qk_options = {"full": {}}

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

    norms = ("attn_norm", "ffn_norm")
    final_norm = False
    hf_missing = ("DeepNorm is a post-norm that scales the residual by alpha = (2L)^(1/4) (x' = N(alpha x + F(x))); "
                  "no transformers architecture computes that")

    @dataclass
    class Options:
        alpha: Optional[float] = None
        beta: Optional[float] = None

    def __init__(self, cfg, layer, make_norm, options):
        super().__init__(cfg, layer, make_norm, options)
        n = cfg.n_layers
        self.alpha = options.alpha if options.alpha is not None else (2 * n) ** 0.25
        self.beta = options.beta if options.beta is not None else (8 * n) ** -0.25

    def forward(self, x, attn, ffn):
        h = self.attn_norm(self.alpha * x + attn(x))
        return self.ffn_norm(self.alpha * h + ffn(h))

    def init_scheme(self, init: Init) -> Init:
        return XavierInit(init.std, init.out_std, init.head_std, init.cutoff, beta=self.beta)


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
