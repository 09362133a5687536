"""Weight initialization by role, as the HybridNorm paper does it (OLMo's ``full_megatron``).

Modules call ``init(weight, role)`` for each weight they own. Roles: ``"embed"``, ``"head"``, the
attention's ``"q"``, ``"k"``, ``"v"``, ``"o"``, the FFN's ``"ffn_in"`` and ``"ffn_out"``, and
``"router"``. Residual-output roles (``"o"``, ``"ffn_out"``) get sigma / sqrt(2 L); the untied head
gets 1 / sqrt(d). A norm strategy may hand its block a changed scheme (``NormStrategy.init_scheme``),
for example ``dataclasses.replace(init, out_std=init.out_std / 2)`` or an ``Init`` subclass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig

OUTPUT_ROLES = frozenset({"o", "ffn_out"})


@dataclass(frozen=True)
class Init:
    """Truncated normal at ``cutoff`` sigmas: ``std`` for most roles, ``out_std`` for residual outputs,
    ``head_std`` for an untied LM head."""

    std: float
    out_std: float
    head_std: float
    cutoff: float = 3.0

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "Init":
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers) if cfg.init.scale_residual else std
        head_std = cfg.init.head_std if cfg.init.head_std is not None else 1.0 / math.sqrt(cfg.d_model)
        return cls(std=std, out_std=out_std, head_std=head_std, cutoff=cfg.init.cutoff_factor)

    def std_for(self, role: str) -> float:
        return self.out_std if role in OUTPUT_ROLES else self.head_std if role == "head" else self.std

    @torch.no_grad()
    def __call__(self, weight: torch.Tensor, role: str) -> None:
        std = self.std_for(role)
        trunc_normal_(weight, std, -self.cutoff * std, self.cutoff * std)


def trunc_normal_(tensor: torch.Tensor, std: float, a: float, b: float) -> torch.Tensor:
    """``nn.init.trunc_normal_(tensor, 0, std, a, b)``: the same numbers from the same generator (its rejection
    sampling: draw the whole tensor again while any value lies outside [a, b], each value taking its first draw
    inside), with one buffer the size of ``tensor`` beside it where torch's holds three. Falls back to torch's
    for a non-contiguous tensor or bounds narrow enough that torch samples otherwise."""
    if not tensor.is_contiguous() or inside_probability(std, a, b) <= 0.3:
        return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=a, b=b)
    lo, hi = tensor.new_tensor(a, device="cpu").item(), tensor.new_tensor(b, device="cpu").item()
    tensor.normal_(0.0, std)
    buffer: list[torch.Tensor] = []

    def draw() -> torch.Tensor:
        if not buffer:
            buffer.append(torch.empty_like(tensor))
        return buffer[0].normal_(0.0, std)

    index, values = redraw_outside(tensor, draw, lo, hi)
    tensor.view(-1)[index] = values
    return tensor


def inside_probability(std: float, a: float, b: float) -> float:
    """The share of N(0, std) inside [a, b]; above 0.3 torch's trunc_normal_ samples by rejection."""
    def cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0
    return cdf(b / std) - cdf(a / std)


def redraw_outside(first: torch.Tensor, draw: Callable[[], torch.Tensor], lo: float, hi: float,
                   chunk: int = 1 << 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated-normal rejection sampling after the first draw ``first``: while any value so far lies outside
    [lo, hi], ``draw()`` the whole tensor again (a tensor of ``first``'s size, which may be ``first`` itself once
    its values are no longer needed). Returns the flat indices of the values that were outside in ``first`` and
    the first value inside that each got; nothing but those few is kept."""
    flat = first.view(-1)
    outside = [start + torch.nonzero((part < lo).logical_or_(part > hi)).view(-1)
               for start, part in zip(range(0, flat.numel(), chunk), flat.split(chunk))]
    pending = torch.cat(outside) if outside else flat.new_zeros(0, dtype=torch.long)
    index, values = [], []
    while pending.numel():
        drawn = draw().view(-1)[pending]
        inside = (drawn >= lo) & (drawn <= hi)
        index.append(pending[inside])
        values.append(drawn[inside])
        pending = pending[~inside]
    if not index:
        return pending, flat.new_zeros(0)
    return torch.cat(index), torch.cat(values)
