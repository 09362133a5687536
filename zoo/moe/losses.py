"""MoE auxiliary losses, unweighted; the layer multiplies them by ``moe.lb_weight`` / ``moe.z_weight``."""
from __future__ import annotations

from typing import Optional

from torch import Tensor


def load_balancing_loss(probs: Tensor, selected: Tensor, top_k: int, tokens: Optional[int] = None) -> Tensor:
    """Switch/GShard balance loss, Megatron/MegaBlocks normalization: ``E * sum_i f_i P_i`` with
    ``f_i = selected_i / (T k)`` and ``P_i = mean_t probs[t, i]``. It equals 1 whenever the
    assignments are perfectly balanced (HF's OLMoE/Mixtral form equals k there).

    ``selected`` may count the assignments of more tokens than ``probs`` holds (``tokens`` of them, say
    summed over ranks): the mean over ranks of each rank's loss is then the loss of all their tokens."""
    T, E = probs.shape
    f = selected.to(probs.dtype) / ((T if tokens is None else tokens) * top_k)
    return E * (f * probs.mean(dim=0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): ``mean_t (logsumexp_j logits[t, j])^2``."""
    return logits.logsumexp(dim=-1).square().mean()
