"""Built-in attention ``mla``: multi-head latent attention (DeepSeek-V2 / V3).

Keys and values come from one low-rank latent per token, ``c = N(x W_kva)`` of width ``kv_lora_rank``,
expanded per head by ``W_kvb`` into the non-rotary key part and the value; the rotary key part is
one ``qk_rope_head_dim`` vector per token, shared by the heads. Queries are projected directly or,
with ``q_lora_rank``, through their own normed latent. So the cache holds only ``c`` and the rotated
shared key: ``kv_lora_rank + qk_rope_head_dim`` values per token and layer, against ``2 * heads *
head_size`` for ``mha``.

The strategy's Q/K/V norms apply per head (or at full width) to the whole query and key heads, the
non-rotary and rotary parts together, after RoPE, and to the value heads, all after the
up-projection. That keeps the cache the latent alone; cached generation then expands every cached
latent at each step (this implementation never folds ``W_kvb`` into the query and output
projections, DeepSeek's weight absorption, which a norm between them would forbid anyway).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

import zoo
from zoo import ConfigError
from zoo.nn import LayerCache, Linear, Rope, allowed_keys, attention, max_logit


class MultiHeadLatentAttention(zoo.Attention):
    """``q`` (or ``q_a`` -> ``q_a_norm`` -> ``q_b``), ``kv_a`` -> (``kv_a_norm`` on the latent) -> ``kv_b``, and
    ``out``; query and key heads are ``qk_nope_head_dim + qk_rope_head_dim`` wide, value heads ``v_head_dim``.
    The logits' scale is ``(qk head size) ** -0.5``, times YaRN's ``mscale_all_dim`` factor squared where
    ``attention.yarn`` sets one (as DeepSeek-V3 does)."""

    supports_cache = True
    # transformers' DeepseekV3 names for its modules (zoo convert)
    hf_names = {"q": ("q_proj",), "q_a": ("q_a_proj",), "q_a_norm": ("q_a_layernorm",), "q_b": ("q_b_proj",),
                "kv_a": ("kv_a_proj_with_mqa",), "kv_a_norm": ("kv_a_layernorm",), "kv_b": ("kv_b_proj",),
                "out": ("o_proj",)}

    @dataclass
    class Options:
        kv_lora_rank: Optional[int] = None  # the cached latent's width; None: d_model // 2
        q_lora_rank: Optional[int] = None  # the query latent's width; None: queries projected directly
        qk_nope_head_dim: Optional[int] = None  # the non-rotary part of a query/key head; None: the head size
        qk_rope_head_dim: Optional[int] = None  # the rotary part, shared by the key heads; None: head size / 2
        v_head_dim: Optional[int] = None  # a value head; None: the head size

    def __init__(self, cfg, layer, make_norm, *, qkv_norm=(), qkv_norm_width="head", options=None):
        super().__init__(cfg, layer, make_norm, qkv_norm=qkv_norm, qkv_norm_width=qkv_norm_width, options=options)
        o = options if options is not None else self.Options()
        d, h = cfg.d_model, cfg.head_size
        self.n_heads = cfg.n_heads
        self.kv_rank = o.kv_lora_rank if o.kv_lora_rank is not None else d // 2
        self.q_rank = o.q_lora_rank
        self.nope = o.qk_nope_head_dim if o.qk_nope_head_dim is not None else h
        self.rope_dim = o.qk_rope_head_dim if o.qk_rope_head_dim is not None else h // 2
        self.v_dim = o.v_head_dim if o.v_head_dim is not None else h
        sizes = {"kv_lora_rank": self.kv_rank, "qk_nope_head_dim": self.nope, "qk_rope_head_dim": self.rope_dim,
                 "v_head_dim": self.v_dim, **({"q_lora_rank": self.q_rank} if self.q_rank is not None else {})}
        bad = [f"{k}={v}" for k, v in sizes.items() if v <= 0] + (
            [f"qk_rope_head_dim={self.rope_dim} (must be even)"] if self.rope_dim % 2 else [])
        if bad:
            raise ConfigError(f"attention 'mla' needs positive sizes: attention.options {', '.join(bad)}")
        if cfg.n_kv_heads is not None and cfg.n_kv_heads != cfg.n_heads:
            raise ConfigError(f"attention 'mla' shares one latent among all heads and has no KV head groups; "
                              f"unset n_kv_heads (got {cfg.n_kv_heads} for {cfg.n_heads} heads)")
        self.qk_dim = self.nope + self.rope_dim
        self.rope = Rope.of(cfg, self.rope_dim)
        self.scale = self.qk_dim ** -0.5 * self.rope.yarn.softmax_scale
        self.window = cfg.attention.sliding_window
        q_width = self.n_heads * self.qk_dim
        if self.q_rank is None:
            self.q = Linear(d, q_width, bias=False)
        else:
            self.q_a = Linear(d, self.q_rank, bias=False)
            self.q_a_norm = make_norm(self.q_rank)
            self.q_b = Linear(self.q_rank, q_width, bias=False)
        self.kv_a = Linear(d, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_norm = make_norm(self.kv_rank)
        self.kv_b = Linear(self.kv_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.out = Linear(self.n_heads * self.v_dim, d, bias=False)
        self.add_qkv_norms((self.qk_dim, self.qk_dim, self.v_dim),
                           (q_width, q_width, self.n_heads * self.v_dim))

    def init_weights(self, init: zoo.Init) -> None:
        for w in ([self.q.weight] if self.q_rank is None else [self.q_a.weight, self.q_b.weight]):
            init(w, "q")
        init(self.kv_a.weight, "k")
        per_head = self.nope + self.v_dim
        for head in range(self.n_heads):  # kv_b's rows: each head's key part, then its value part
            start = head * per_head
            init(self.kv_b.weight[start:start + self.nope], "k")
            init(self.kv_b.weight[start + self.nope:start + per_head], "v")
        init(self.out.weight, "o")

    def cache_values_per_token(self) -> int:
        return self.kv_rank + self.rope_dim

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None, positions: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q(x) if self.q_rank is None else self.q_b(self.q_a_norm(self.q_a(x)))
        q_nope, q_rope = q.view(B, T, H, self.qk_dim).split((self.nope, self.rope_dim), dim=-1)
        latent, k_rope = self.kv_a(x).split((self.kv_rank, self.rope_dim), dim=-1)
        latent = self.kv_a_norm(latent)
        cos, sin = self.rope.tables(T, x.device, q.dtype) if positions is None else self.rope.tables_at(positions, q.dtype)
        q_rope = self.rope.apply(q_rope, cos, sin)
        k_rope = self.rope.apply(k_rope[:, :, None], cos, sin)[:, :, 0]
        if cache is not None:  # the latent and the rotated shared key, (B, S, width) each
            latent, k_rope = cache.update(latent, k_rope, dim=1)
        S = latent.shape[1]
        k_nope, v = self.kv_b(latent).view(B, S, H, self.nope + self.v_dim).split((self.nope, self.v_dim), dim=-1)
        k = torch.cat((k_nope, k_rope[:, :, None].expand(B, S, H, self.rope_dim)), dim=-1)
        q, k, v = self.normalize_qkv(torch.cat((q_nope, q_rope), dim=-1), k, v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        allowed = allowed_keys(mask, T, S, x.device, self.window)
        if self.record_max_logit:
            self.last_max_logit = max_logit(q, k, allowed, self.scale, causal=allowed is None)
        y = attention(q, k, v, allowed, scale=self.scale)
        return self.out(y.transpose(1, 2).reshape(B, T, H * self.v_dim))
