"""Built-in attention: ``mha``, covering MHA, GQA and MQA by ``n_kv_heads``.

The Q/K/V norms the norm strategy asks for come from the base class's helpers (``add_qkv_norms``,
``normalize_qkv``): after the projection, before RoPE, per head or at full width. RoPE follows the
config (``zoo.nn.Rope``: rotate-half or interleaved, YaRN). ``attention.options.qkv_bias=true`` adds a
bias to the fused q/k/v projection (Qwen2 / Qwen2-MoE). Multi-head latent attention, ``mla``, is in
plugins/latent_attention.py and registered here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

import zoo
from zoo.nn import LayerCache, Linear, Rope, allowed_keys, attention, max_logit

from .latent_attention import MultiHeadLatentAttention


class MultiHeadAttention(zoo.Attention):
    """Causal self-attention with a fused ``qkv`` projection and an ``out`` projection.

    Supports the KV cache: it stores K and V after the Q/K/V norms and RoPE, ``(B, kv_heads, S, d_h)``.
    """

    supports_cache = True
    # transformers' names for its modules (zoo convert): qkv stacks q_proj, k_proj and v_proj
    hf_names = {"qkv": ("q_proj", "k_proj", "v_proj"), "out": ("o_proj",), "q_norm": ("q_norm",), "k_norm": ("k_norm",)}
    hf_bias_options = {"qkv_bias": True}  # the options that give transformers' q/k/v biases

    @dataclass
    class Options:
        qkv_bias: bool = False  # a bias on the fused q/k/v projection (zero at init), as Qwen2 has

    def __init__(self, cfg, layer, make_norm, *, qkv_norm=(), qkv_norm_width="head", options=None):
        super().__init__(cfg, layer, make_norm, qkv_norm=qkv_norm, qkv_norm_width=qkv_norm_width, options=options)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.rope = Rope.of(cfg, self.head_dim)
        self.window = cfg.attention.sliding_window
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        qkv_bias = bool(options is not None and options.qkv_bias)
        self.qkv = Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=qkv_bias)
        self.out = Linear(q_dim, cfg.d_model, bias=False)
        self.add_qkv_norms(self.head_dim, self.split)

    def init_weights(self, init: zoo.Init) -> None:
        q_dim, kv_dim, _ = self.split
        w = self.qkv.weight
        init(w[:q_dim], "q")
        init(w[q_dim:q_dim + kv_dim], "k")
        init(w[q_dim + kv_dim:], "v")
        init(self.out.weight, "o")
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)

    def cache_values_per_token(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None, positions: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = self.normalize_qkv(q, k, v)
        cos, sin = self.rope.tables(T, x.device, q.dtype) if positions is None else self.rope.tables_at(positions, q.dtype)
        q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, dim=2)
        allowed = allowed_keys(mask, T, k.shape[2], x.device, self.window)
        if self.record_max_logit:
            group = self.n_heads // self.n_kv_heads
            kk = k.repeat_interleave(group, dim=1) if group > 1 else k
            self.last_max_logit = max_logit(q, kk, allowed, self.head_dim ** -0.5, causal=allowed is None)
        y = attention(q, k, v, allowed)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


@zoo.hookimpl
def register_attention(register):
    register("mha", MultiHeadAttention)
    register("mla", MultiHeadLatentAttention)
