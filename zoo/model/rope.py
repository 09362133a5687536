"""Rotary position embedding (RoPE), rotate-half pairing: dimension i with i + d_h/2, as HF, GPT-NeoX
and OLMo pair them, with inverse frequencies ``theta^(-2i/d_h)``, so their checkpoints load without
permuting weights."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..kernels.rope import rope


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin tables ``(seq_len, head_dim)`` for positions ``0..seq_len-1``, computed in fp32; cached,
    as every layer of a forward asks for the same ones (not under inference mode, whose tensors autograd
    refuses, nor while torch.compile traces)."""
    if torch.is_inference_mode_enabled() or torch.compiler.is_compiling():
        return _tables(seq_len, head_dim, theta, device, dtype)
    return _cached_tables(seq_len, head_dim, theta, device, dtype)


def _tables(seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


_cached_tables = functools.lru_cache(maxsize=16)(_tables)


def rope_tables_at(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin ``(batch, seq, head_dim)`` at each token's own position (generation: rows count from
    their first real token); the same fp32 products as ``rope_tables``, so the values agree exactly."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (batch, seq, heads, d_h) by position: tables ``(seq, d_h)`` from ``rope_tables``, or
    per row ``(batch, seq, d_h)`` from ``rope_tables_at``."""
    heads = -2
    return rope(x, cos.unsqueeze(heads), sin.unsqueeze(heads))
