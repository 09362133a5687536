"""Token dispatch: a router's flat assignments sorted by expert, which is what every expert backend takes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from .router import Routing


@dataclass
class Dispatch:
    """The assignments in expert order: token ``token_N[n]`` goes to its expert with gate ``weight_N[n]``,
    and expert e takes ``counts_E[e]`` consecutive assignments (a list at perfect balance on ``meta``)."""

    token_N: Tensor
    weight_N: Tensor
    counts_E: Union[Tensor, list[int]]


def sort_by_expert(routing: Routing, num_experts: int) -> Dispatch:
    """Sort ``routing``'s assignments by expert (stably, so each expert sees its tokens in order)."""
    expert = routing.expert
    if expert.is_meta:  # FLOP counting: shapes only, at perfect balance
        n = expert.numel()
        counts: Union[Tensor, list[int]] = [n // num_experts + (e < n % num_experts) for e in range(num_experts)]
        order = torch.empty(n, dtype=torch.long, device=expert.device)
    else:
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=num_experts)
    return Dispatch(routing.token[order], routing.weight[order], counts)
