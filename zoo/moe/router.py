"""The router contract: tokens in, a flat list of (token, expert, weight) assignments out.

Token choice (top-k) yields T*k assignments; capacity dropping removes some; expert choice yields
E*C. One flat form serves them all, so the expert backends never care which router ran.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..kernels.linear import Linear
from ..model import Init


@dataclass
class Routing:
    """Assignments of tokens to experts, and what the aux losses and statistics need.

    token, expert, weight: (N,) each; an assignment sends token ``token[n]`` to expert
    ``expert[n]`` with gate weight ``weight[n]``. logits: (T, E) router logits (fp32, or fp64 in an fp64 model).
    probs: (T, E) routing probabilities P used by the load-balancing loss. selected: (E,)
    assignments each expert was chosen for before any capacity dropping (f_i of the LB loss).
    dropped: assignments removed by a capacity limit.
    """

    token: Tensor
    expert: Tensor
    weight: Tensor
    logits: Tensor
    probs: Tensor
    selected: Tensor
    top_k: int
    dropped: Any = 0


@dataclass(frozen=True)
class RouterContext:
    """What a router may read besides its logits. ``hidden``: (T, H), the tokens at the router's input;
    ``token_ids``: (T,) long, the vocabulary ids of those tokens, or None where the FFN runs without the
    model around it (a hash router then refuses); ``layer``: the MoE layer's index."""

    hidden: Tensor
    token_ids: Optional[Tensor]
    layer: int


class Router(nn.Module):
    """Base class of router plugins: ``router.layer`` is the ``(E, H)`` gate, MegaBlocks' name.

    Subclasses implement ``route(logits) -> Routing``, or ``route(logits, context)`` to also read a
    ``RouterContext`` (the token ids and hidden states), on real tensors only: on ``meta`` (``zoo.stats``
    counting FLOPs) the base returns ``assignments(T)`` assignments at perfect balance instead. Class
    attributes: ``Options`` (a dataclass filled from ``moe.router_options``), ``balancing_loss`` (False
    where the router balances by construction and the LB loss does not apply), ``causal`` (False where a
    token's routing depends on other tokens of the batch, which leaks the future in a causal LM).
    """

    Options: ClassVar[Optional[type]] = None
    balancing_loss: ClassVar[bool] = True
    causal: ClassVar[bool] = True

    takes_context: ClassVar[bool] = False  # set from route's signature: route(logits, context)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.takes_context = len(inspect.signature(cls.route).parameters) >= 3

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Any = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts, self.top_k = cfg.moe.num_experts, cfg.moe.top_k
        self.jitter = cfg.moe.jitter
        self.options = options
        self.layer = Linear(cfg.d_model, self.num_experts, bias=False)

    def init_weights(self, init: Init) -> None:
        init(self.layer.weight, "router")

    def forward(self, x: Tensor, token_ids: Optional[Tensor] = None) -> Routing:
        """``x``: (T, H); ``token_ids``: (T,) or None. Multiplicative input jitter U(1-eps, 1+eps) applies in
        training only."""
        hidden = x
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.layer(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
        if logits.is_meta:
            return self._balanced(logits)
        if self.takes_context:
            return self.route(logits, RouterContext(hidden, token_ids, self.layer_idx))
        return self.route(logits)

    def assignments(self, tokens: int) -> int:
        """How many (token, expert) assignments a batch of ``tokens`` tokens makes: ``tokens * top_k`` for
        token choice. FLOP counts (``zoo.stats``) count that many at perfect balance."""
        return tokens * self.top_k

    def _balanced(self, logits: Tensor) -> Routing:
        """A routing of the right sizes on ``meta``, where nothing can be routed: shapes for FLOP counting."""
        n, empty = self.assignments(logits.shape[0]), functools.partial(torch.empty, device=logits.device)
        return Routing(empty(n, dtype=torch.long), empty(n, dtype=torch.long), empty(n), logits, logits,
                       empty(self.num_experts, dtype=torch.long), self.top_k)

    def route(self, logits: Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError

    def token_choice(self, logits: Tensor, probs: Tensor, weights: Tensor, indices: Tensor) -> Routing:
        """Routing for k experts per token from (T, k) weights and indices."""
        T, k = indices.shape
        token = torch.arange(T, device=logits.device).repeat_interleave(k)
        expert = indices.reshape(-1)
        selected = torch.bincount(expert, minlength=self.num_experts)
        return Routing(token, expert, weights.reshape(-1), logits, probs, selected, k)


def softmax_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(probs, top-k weights, top-k indices) of a softmax over the experts."""
    probs = F.softmax(logits, dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)
    return probs, weights, indices
