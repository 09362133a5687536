"""Parameter counts (total and active), FLOPs per token and KV-cache size of a model (built on ``meta`` by
``zoo.stats``, so nothing is allocated)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ModelStats:
    """``flops_per_token`` counts one forward pass's matmul FLOPs (2 per multiply-add) at
    ``seq_len``, causal attention counted in full as PaLM's MFU convention does; a training step
    costs about 3x that. MoE layers are counted at perfect balance (k experts per token).
    ``kv_cache_bytes_per_token`` is what generation caches per token at fp32 (the zoo's default dtype), the sum
    of each layer's attention's ``cache_values_per_token()`` (None if an attention cannot cache);
    ``kv_cache_bytes_per_token_bf16`` halves it."""

    total_params: int
    active_params: int
    flops_per_token: Optional[int]
    seq_len: Optional[int]
    kv_cache_bytes_per_token: Optional[int] = None

    @property
    def train_flops_per_token(self) -> Optional[int]:
        return None if self.flops_per_token is None else 3 * self.flops_per_token

    @property
    def kv_cache_bytes_per_token_bf16(self) -> Optional[int]:
        return None if self.kv_cache_bytes_per_token is None else self.kv_cache_bytes_per_token // 2

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "train_flops_per_token": self.train_flops_per_token,
                "kv_cache_bytes_per_token_bf16": self.kv_cache_bytes_per_token_bf16}


def kv_cache_bytes_per_token(model: nn.Module, dtype: torch.dtype = torch.float32) -> Optional[int]:
    """Bytes one token adds to the KV cache of ``model`` (a ZooModel, on meta is enough): each layer's attention
    says how many values it caches per token (``mha``: K and V, ``2 * n_kv_heads * head_size``; ``mla``: its
    latent and RoPE key); None where an attention does not support the cache."""
    values = 0
    for block in model.blocks:
        if not getattr(block.attn, "supports_cache", False):
            return None
        values += block.attn.cache_values_per_token()
    return values * torch.empty((), dtype=dtype).element_size()


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, active): a module with ``inactive_params()`` (an MoE layer) reports what a token skips."""
    total = sum(p.numel() for p in model.parameters())
    inactive = sum(m.inactive_params() for m in model.modules() if hasattr(m, "inactive_params"))
    return total, total - inactive


def forward_flops(model: nn.Module, seq_len: int) -> int:
    """Total FLOPs of one forward over a (1, seq_len) batch, on whatever device the model is."""
    device = next(model.parameters()).device
    idx = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(idx)
    return counter.get_total_flops()
