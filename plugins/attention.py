"""Built-in attention: ``mha``, covering MHA, GQA and MQA by ``n_kv_heads``, on SDPA.

RoPE uses the rotate-half pairing (dimension i with i + d_h/2; HF, GPT-NeoX and OLMo) with inverse
frequencies ``theta^(-2i/d_h)``. The Q/K/V norms the norm strategy asks for are applied after the
projection and before RoPE: per head (one gain of size d_h shared by all heads) or at full width.
``attention.options.qkv_bias=true`` adds a bias to the fused q/k/v projection (Qwen2 / Qwen2-MoE).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import zoo
from zoo import Attention, Init
from zoo.linear import Linear, compute_dtype
from zoo.attention import LayerCache, max_logit
from zoo.sdpa import causal_attention
from zoo.errors import ConfigError


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin tables ``(seq_len, head_dim)`` in rotate-half layout, computed in fp32; cached, as
    every layer of a forward asks for the same ones (not under inference mode, whose tensors autograd refuses,
    nor while torch.compile traces)."""
    if torch.is_inference_mode_enabled() or torch.compiler.is_compiling():
        return _rope_tables(seq_len, head_dim, theta, device, dtype)
    return _cached_rope_tables(seq_len, head_dim, theta, device, dtype)


def _rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


_cached_rope_tables = functools.lru_cache(maxsize=16)(_rope_tables)


class _RotateHalf(torch.autograd.Function):
    """``x * cos + rotate_half(x) * sin``, ``rotate_half(x) = (-x2, x1)``, in three kernels each way.

    The tables are in rotate-half layout, so both halves of ``sin`` are equal and only the first is
    read: ``y1 = x1 cos1 - x2 sin1``, ``y2 = x2 cos2 + x1 sin1``. Its transpose gives the backward,
    ``dx1 = dy1 cos1 + dy2 sin1``, ``dx2 = dy2 cos2 - dy1 sin1``, without the negations, concatenations
    and gradient sums that autograd runs for the composite formula.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, -1), None, None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, sign: int) -> Tensor:
    """``x * cos + sign * rotate_half(x) * sin`` (``sign=-1``: the inverse rotation)."""
    half = x.shape[-1] // 2
    sin1 = sin[..., :half]
    y = x * cos
    y[..., :half].addcmul_(x[..., half:], sin1, value=-sign)
    y[..., half:].addcmul_(x[..., :half], sin1, value=sign)
    return y


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (batch, seq, heads, d_h) by position; tables ``(seq, d_h)``."""
    return _RotateHalf.apply(x, cos[:, None, :], sin[:, None, :])


def rope_at(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin ``(batch, seq, head_dim)`` at each token's own position (generation: rows count from
    their first real token); the same fp32 products as ``rope_cos_sin``, so the values agree exactly."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope_at(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (batch, seq, heads, d_h) by per-row tables ``(batch, seq, d_h)``."""
    return _RotateHalf.apply(x, cos[:, :, None, :], sin[:, :, None, :])


class MultiHeadAttention(Attention):
    """Causal self-attention with a fused ``qkv`` projection and an ``out`` projection.

    Supports the KV cache: it stores K and V after the Q/K/V norms and RoPE, ``(B, kv_heads, S, d_h)``.
    """

    supports_cache = True

    @dataclass
    class Options:
        qkv_bias: bool = False  # a bias on the fused q/k/v projection (zero at init), as Qwen2 has

    def __init__(self, cfg, layer, make_norm, *, qkv_norm=(), qkv_norm_width="head", options=None):
        super().__init__(cfg, layer, make_norm, qkv_norm=qkv_norm, qkv_norm_width=qkv_norm_width, options=options)
        unknown = set(qkv_norm) - {"q", "k", "v"}
        if unknown or qkv_norm_width not in ("head", "full"):
            raise ConfigError(f"mha can normalize q, k, v per 'head' or at 'full' width; got {qkv_norm} / {qkv_norm_width!r}")
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.rope_theta = cfg.attention.rope_theta
        self.window = cfg.attention.sliding_window
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        qkv_bias = bool(options is not None and options.qkv_bias)
        self.qkv = Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=qkv_bias)
        self.out = Linear(q_dim, cfg.d_model, bias=False)
        self.full_width = qkv_norm_width == "full"
        widths = dict(zip("qkv", self.split)) if self.full_width else dict.fromkeys("qkv", self.head_dim)
        self.q_norm = make_norm(widths["q"]) if "q" in qkv_norm else None
        self.k_norm = make_norm(widths["k"]) if "k" in qkv_norm else None
        self.v_norm = make_norm(widths["v"]) if "v" in qkv_norm else None

    def init_weights(self, init: Init) -> None:
        q_dim, kv_dim, _ = self.split
        w = self.qkv.weight
        init(w[:q_dim], "q")
        init(w[q_dim:q_dim + kv_dim], "k")
        init(w[q_dim + kv_dim:], "v")
        init(self.out.weight, "o")
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)

    def _qkv_norms(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(t if norm is None else norm(t) for norm, t in ((self.q_norm, q), (self.k_norm, k), (self.v_norm, v)))

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None, positions: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        if self.full_width:
            q, k, v = self._qkv_norms(q, k, v)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if not self.full_width:
            q, k, v = self._qkv_norms(q, k, v)
        if positions is None:
            cos, sin = rope_cos_sin(T, self.head_dim, self.rope_theta, x.device, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:
            cos, sin = rope_at(positions, self.head_dim, self.rope_theta, q.dtype)
            q, k = apply_rope_at(q, cos, sin), apply_rope_at(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, dim=2)
        gqa = self.n_kv_heads != self.n_heads
        S = k.shape[2]
        if mask is None and S != T:  # cached, unpadded: causal aligned to the last key
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)[None]
        allowed = None
        if mask is not None:
            allowed = mask[:, None]
            if self.window is not None:
                i = torch.arange(S - T, S, device=x.device)[:, None]
                allowed = allowed & (torch.arange(S, device=x.device)[None, :] > i - self.window)
        elif self.window is not None and self.window < T:
            i = torch.arange(T, device=x.device)
            allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
        if self.record_max_logit:
            kk = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) if gqa else k
            self.last_max_logit = max_logit(q, kk, allowed, self.head_dim ** -0.5, causal=allowed is None)
        dtype, cdt = q.dtype, compute_dtype(q)  # fp32 SDPA where this CPU lacks bf16/fp16 units
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
        if allowed is None:
            y = causal_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)
        return self.out(y.to(dtype).transpose(1, 2).reshape(B, T, -1))


@zoo.hookimpl
def register_attention(register):
    register("mha", MultiHeadAttention)
