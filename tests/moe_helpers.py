"""Shared by the MoE test files: one MoE layer built from a config, seeded and initialized."""
from __future__ import annotations

import torch

import zoo
from zoo.builder import build_ffn
from zoo.moe import MoEFFN


def build_moe_layer(cfg: zoo.ModelConfig, seed: int = 0) -> MoEFFN:
    """Layer 0 of ``cfg``'s MoE FFN, with ``cfg``'s initializer run under ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    layer = build_ffn(cfg, 0)
    layer.init_weights(zoo.Init.from_config(cfg))
    return layer
