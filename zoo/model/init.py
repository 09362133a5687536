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
        nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-self.cutoff * std, b=self.cutoff * std)
