"""The optimizer and its schedule: AdamW with decoupled weight decay on matrices, linear warmup then
cosine decay."""
from __future__ import annotations

import math
from typing import Protocol

import torch


class Schedule(Protocol):
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    steps: int


class AdamWSettings(Protocol):
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    decay_norm_and_bias: bool


def lr_at(step: int, tc: Schedule) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, tc: AdamWSettings) -> torch.optim.AdamW:
    """Weight decay on matrices except the embedding; gains, biases and scalars too with
    ``decay_norm_and_bias`` (the HybridNorm code's setting, OLMo's option of that name), else undecayed.

    The fused AdamW kernel (one pass over each tensor) where the parameters' device has it, as
    transformers' Trainer defaults to."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        decayed = (p.ndim >= 2 or tc.decay_norm_and_bias) and not name.startswith("embed.")
        (decay if decayed else no_decay).append(p)
    fused = all(p.device.type in ("cpu", "cuda") for p in (*decay, *no_decay))
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=tc.lr, betas=(tc.beta1, tc.beta2), **({"fused": True} if fused else {"foreach": True}))
