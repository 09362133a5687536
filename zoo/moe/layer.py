"""The MoE FFN: router -> dropless experts (+ shared experts), aux losses and router statistics.

Its aux losses come back with its output (``MoEAux``) and the model sums them into
``ModelOutput.aux_loss``; the caller adds that to the training loss. Nothing is kept in globals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..kernels.linear import Linear
from ..model import Init, SwiGLU
from .experts import Experts
from .losses import load_balancing_loss, z_loss
from .router import Router


@dataclass
class MoEAux:
    """``loss``: ``lb_weight * LB + z_weight * Z`` for this layer; ``stats``: detached statistics."""

    loss: Tensor
    stats: dict[str, Any]


class MoEFFN(nn.Module):
    """``router.layer.weight (E, H)``, ``experts.mlp.{w1,v1,w2} (E*F, H)``; optional ``shared`` SwiGLU
    (``moe.shared_hidden_size`` wide, default ``shared_experts * hidden_size``), optionally gated by
    ``sigmoid(shared_gate(x))`` with ``shared_gate.weight (1, H)`` (``moe.shared_gate``). ``router`` is the
    router plugin built for this layer (zoo/builder.py makes it from ``moe.router``)."""

    def __init__(self, cfg: ModelConfig, layer: int, router: Router):
        super().__init__()
        moe = cfg.moe
        self.layer_idx, self.top_k = layer, moe.top_k
        self.lb_weight, self.z_weight = moe.lb_weight, moe.z_weight
        self.lb_scope = moe.lb_scope
        # For lb_scope "global" a parallel layout sets this to a sum over its ranks (zoo.distributed).
        self.sum_over_ranks: Optional[Callable[[Tensor], Tensor]] = None
        self.router = router
        self.experts = Experts(moe.num_experts, cfg.d_model, moe.hidden_size, moe.backend)
        shared_width = moe.shared_hidden_size if moe.shared_hidden_size is not None else moe.shared_experts * moe.hidden_size
        self.shared = SwiGLU(cfg.d_model, shared_width) if moe.shared_experts else None
        # Qwen2-MoE's shared-expert gate: the shared output is scaled by sigmoid(shared_gate(x))
        self.shared_gate = Linear(cfg.d_model, 1, bias=False) if moe.shared_experts and moe.shared_gate else None

    def init_weights(self, init: Init) -> None:
        self.router.init_weights(init)
        self.experts.init_weights(init)
        if self.shared is not None:
            self.shared.init_weights(init)
        if self.shared_gate is not None:
            init(self.shared_gate.weight, "router")

    def inactive_params(self) -> int:
        """Expert parameters a token does not use: all but k of the E experts."""
        w = self.experts.mlp
        per_expert = 3 * w.ffn * w.hidden
        return per_expert * (w.num_experts - self.top_k)

    takes_token_ids = True  # the block passes the model's token ids on, for the router's context

    def forward(self, x: Tensor, token_ids: Optional[Tensor] = None) -> tuple[Tensor, MoEAux]:
        """``x`` (..., H); ``token_ids`` (...) the ids of the tokens at those positions, or None."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = self.router(tokens, None if token_ids is None else token_ids.reshape(-1))
        y = self.experts(tokens, routing)
        if self.shared is not None:
            shared = self.shared(tokens)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(tokens)) * shared
            y = y + shared
        selected, load, counted = self._counts(routing, tokens.shape[0])
        lb = load_balancing_loss(routing.probs, selected, routing.top_k, counted) if self.router.balancing_loss \
            else routing.logits.new_zeros(())
        z = z_loss(routing.logits)
        loss = self.lb_weight * lb + self.z_weight * z
        return y.view(shape), MoEAux(loss, self._stats(routing, load, lb, z) if not x.is_meta else {})

    @torch.no_grad()
    def _counts(self, routing: Any, tokens: int) -> tuple[Tensor, Optional[Tensor], int]:
        """Assignments chosen per expert, assignments kept per expert and the tokens behind them: this
        micro-batch's, or with ``lb_scope: global`` those of all ranks (one collective)."""
        if routing.expert.is_meta:
            return routing.selected, None, tokens
        E = self.experts.mlp.num_experts
        load = torch.bincount(routing.expert, minlength=E)
        if self.lb_scope != "global" or self.sum_over_ranks is None:
            return routing.selected, load, tokens
        summed = self.sum_over_ranks(torch.cat([routing.selected, load, load.new_tensor([tokens])]))
        return summed[:E], summed[E:2 * E], int(summed[-1])

    @torch.no_grad()
    def _stats(self, routing: Any, load: Tensor, lb: Tensor, z: Tensor) -> dict[str, Any]:
        load = load.float()
        mean = load.mean().clamp_min(1e-9)
        return {"layer": self.layer_idx, "tokens_per_expert": load.long(), "load_cv": load.std(unbiased=False) / mean,
                "max_over_mean": load.max() / mean, "dropped": routing.dropped,
                "router_logsumexp": routing.logits.logsumexp(-1).mean(), "lb_loss": lb.detach(), "z_loss": z.detach()}


@torch.no_grad()
def after_optimizer_step(model: nn.Module) -> None:
    """Call after each optimizer step: routers with per-step state (sigmoid-bias) update it."""
    for m in model.modules():
        hook = getattr(m, "after_optimizer_step", None)
        if hook is not None and m is not model:
            hook()
