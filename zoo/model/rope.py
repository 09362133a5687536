"""Rotary position embedding (RoPE).

Two pairings: rotate-half (dimension i with i + d/2, as HF, GPT-NeoX and OLMo pair them, so their
checkpoints load without permuting weights) and interleaved (dimension 2i with 2i + 1, as DeepSeek
lays its rotary part out). Inverse frequencies ``theta^(-2i/d)``, optionally stretched by YaRN
(Peng et al. 2023) as DeepSeek-V3's configs use it: low frequencies interpolated by ``factor``, high
ones kept, a linear ramp between, and cos/sin scaled by the attention factor.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import ConfigError
from ..kernels.rope import rope

LAYOUTS = ("rotate-half", "interleaved")


@dataclass(frozen=True)
class Yarn:
    """YaRN's settings (``attention.yarn`` in the config); ``factor == 1`` is plain RoPE."""

    factor: float = 1.0
    original_max_seq_len: Optional[int] = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @staticmethod
    def mscale_of(factor: float, mscale: float = 1.0) -> float:
        """YaRN's ``0.1 * mscale * ln(factor) + 1`` (1 for ``factor <= 1``)."""
        return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0

    @property
    def attention_factor(self) -> float:
        """The scale of cos and sin."""
        if self.mscale and self.mscale_all_dim:
            return self.mscale_of(self.factor, self.mscale) / self.mscale_of(self.factor, self.mscale_all_dim)
        return self.mscale_of(self.factor)

    @property
    def softmax_scale(self) -> float:
        """The extra factor of the attention logits' scale that DeepSeek's MLA applies (``mscale_all_dim``)."""
        return self.mscale_of(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0

    def inv_freq(self, dim: int, theta: float, device: Optional[torch.device] = None) -> Tensor:
        base = theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        if self.factor == 1:
            return 1.0 / base
        original = self.original_max_seq_len

        def correction(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = max(math.floor(correction(self.beta_fast)), 0), min(math.ceil(correction(self.beta_slow)), dim - 1)
        high = high + 0.001 if low == high else high
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate (divided by factor)
        return (1.0 / (self.factor * base)) * (1 - keep) + (1.0 / base) * keep


@dataclass(frozen=True)
class Rope:
    """RoPE over ``dim`` dimensions: its tables and its rotation. ``Rope.of(cfg, dim)`` reads the config's
    ``attention.rope_theta``, ``attention.rope_layout`` and ``attention.yarn``."""

    dim: int
    theta: float = 10000.0
    layout: str = "rotate-half"
    yarn: Yarn = Yarn()

    @classmethod
    def of(cls, cfg: ModelConfig, dim: int) -> "Rope":
        a = cfg.attention
        if a.rope_layout not in LAYOUTS:
            raise ConfigError(f"attention.rope_layout must be one of {', '.join(LAYOUTS)}; got {a.rope_layout!r}")
        return cls(dim, a.rope_theta, a.rope_layout, Yarn(**vars(a.yarn)))

    def tables(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin ``(seq_len, dim)`` for positions ``0..seq_len-1``, computed in fp32; cached, as every layer
        of a forward asks for the same ones (not under inference mode, whose tensors autograd refuses, nor while
        torch.compile traces)."""
        if torch.is_inference_mode_enabled() or torch.compiler.is_compiling():
            return _tables(self, seq_len, device, dtype)
        return _cached_tables(self, seq_len, device, dtype)

    def tables_at(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin ``(batch, seq, dim)`` at each token's own position (generation: rows count from their
        first real token); the same fp32 products as ``tables``, so the values agree exactly."""
        return self._cos_sin(positions.to(torch.float32)[..., None] * self.yarn.inv_freq(self.dim, self.theta, positions.device), dtype)

    def _cos_sin(self, freqs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.yarn.attention_factor
        cos, sin = emb.cos(), emb.sin()
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        return cos.to(dtype), sin.to(dtype)

    def apply(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate ``x`` (batch, seq, heads, dim) by position, with tables from ``tables`` or ``tables_at``.
        Interleaved pairs come out in rotate-half order (evens, then odds): the same for queries and keys,
        so their products are those of the interleaved rotation."""
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        if self.layout == "interleaved":
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return rope(x, cos, sin)


def _tables(r: Rope, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    return r._cos_sin(torch.outer(positions, r.yarn.inv_freq(r.dim, r.theta, device)), dtype)


_cached_tables = functools.lru_cache(maxsize=16)(_tables)


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Plain rotate-half tables ``(seq_len, head_dim)``: ``Rope(head_dim, theta).tables``."""
    return Rope(head_dim, theta).tables(seq_len, device, dtype)


def rope_tables_at(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Plain rotate-half tables at ``positions`` ``(batch, seq, head_dim)``: ``Rope(head_dim, theta).tables_at``."""
    return Rope(head_dim, theta).tables_at(positions, dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (batch, seq, heads, d_h) in rotate-half pairing by tables ``(seq, d_h)`` or ``(batch, seq, d_h)``."""
    return rope(x, cos.unsqueeze(-2), sin.unsqueeze(-2))
