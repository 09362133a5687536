"""Built-in MoE routers, as shared/reference/variants.md section C states them.

``T`` tokens, ``E`` experts, ``k`` = moe.top_k, ``logits = x W_r^T`` (fp32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import zoo
from zoo import ConfigError
from zoo.moe import Router, RouterContext, Routing, softmax_topk


class TopKRouter(Router):
    """Softmax token choice: ``p = softmax(logits)``, the top-k of p as gates; ``renormalize``
    divides them by their sum (Mixtral), otherwise they stay raw probabilities (OLMoE)."""

    hf_renormalize_option = "renormalize"  # transformers' softmax top-k routing, norm_topk_prob (zoo convert)

    @dataclass
    class Options:
        renormalize: bool = False

    def route(self, logits: Tensor) -> Routing:
        probs, weights, indices = softmax_topk(logits, self.top_k)
        if self.options.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.token_choice(logits, probs, weights, indices)


class SwitchRouter(Router):
    """Switch (Fedus et al. 2021): top-1, gate ``p_{i*}``; with ``capacity_factor`` each expert keeps
    its first ``C = ceil(T / E * cf)`` tokens in order and the rest are dropped (output 0)."""

    check_overrides = ("moe.top_k=1",)  # what zoo.testing builds it with

    @dataclass
    class Options:
        capacity_factor: Optional[float] = None

    def __init__(self, cfg, layer_idx, options):
        super().__init__(cfg, layer_idx, options)
        if self.top_k != 1:
            raise ConfigError(f"the switch router is top-1: set moe.top_k=1 (got {self.top_k})")
        if options.capacity_factor is not None and options.capacity_factor <= 0:
            raise ConfigError(f"moe.router_options.capacity_factor must be positive, got {options.capacity_factor}")

    def route(self, logits: Tensor) -> Routing:
        probs, weights, indices = softmax_topk(logits, 1)
        routing = self.token_choice(logits, probs, weights, indices)
        cf = self.options.capacity_factor
        if cf is None:
            return routing
        T = logits.shape[0]
        capacity = math.ceil(T / self.num_experts * cf)
        one_hot = F.one_hot(routing.expert, self.num_experts)
        position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # place of each token in its expert's queue
        keep = position < capacity
        routing.dropped = int((~keep).sum())
        routing.token, routing.expert, routing.weight = routing.token[keep], routing.expert[keep], routing.weight[keep]
        return routing


class SigmoidBiasRouter(Router):
    """DeepSeek-V3 routing with auxiliary-loss-free balancing: ``s = sigmoid(logits)``; experts chosen by
    the top-k of ``s + b``, gated by ``s`` (divided by its selected sum when ``renormalize``, times
    ``route_scale``). With ``n_group > 1`` the choice is group-limited: the E experts form ``n_group``
    groups, each scored by the sum of its two best ``s + b``, and only the ``topk_group`` best groups'
    experts may be chosen. After each optimizer step ``b_i += update_rate * sign(mean_load - load_i)``.
    ``b`` is an fp32 buffer: in checkpoints, never in the optimizer. The bias does the balancing, so
    the load-balancing loss does not apply (``balancing_loss = False``)."""

    balancing_loss = False
    hf_bias_name = "e_score_correction_bias"  # transformers' DeepseekV3 name of expert_bias (zoo convert)

    @dataclass
    class Options:
        update_rate: float = 1e-3
        renormalize: bool = True
        route_scale: float = 1.0
        n_group: int = 1
        topk_group: int = 1

    def __init__(self, cfg, layer_idx, options):
        super().__init__(cfg, layer_idx, options)
        E, groups, best = self.num_experts, options.n_group, options.topk_group
        if groups < 1 or E % groups or not 1 <= best <= groups or self.top_k > best * (E // groups):
            raise ConfigError(f"moe.router_options.n_group ({groups}) must divide moe.num_experts ({E}), "
                              f"topk_group ({best}) must lie in [1, n_group], and the chosen groups must hold at "
                              f"least moe.top_k ({self.top_k}) experts")
        self.register_buffer("expert_bias", torch.zeros(self.num_experts))
        self.pending_load: Optional[Tensor] = None  # assignments per expert since the last update

    def reset_parameters(self) -> None:
        self.expert_bias.zero_()
        self.pending_load = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.expert_bias = self.expert_bias.float()  # the balancing state stays fp32 whatever the model dtype
        return self

    def route(self, logits: Tensor) -> Routing:
        scores = torch.sigmoid(logits)
        choice = scores + self.expert_bias
        groups = self.options.n_group
        if groups > 1:
            by_group = choice.view(-1, groups, self.num_experts // groups)
            group_scores = by_group.topk(min(2, by_group.shape[-1]), dim=-1).values.sum(dim=-1)
            kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(
                1, group_scores.topk(self.options.topk_group, dim=-1).indices, True)
            choice = by_group.masked_fill(~kept[..., None], float("-inf")).view_as(choice)
        _, indices = torch.topk(choice, self.top_k, dim=-1)
        weights = scores.gather(-1, indices)
        if self.options.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * self.options.route_scale
        probs = scores / scores.sum(dim=-1, keepdim=True)
        routing = self.token_choice(logits, probs, weights, indices)
        if self.training:
            load = routing.selected.to(torch.float32)
            self.pending_load = load if self.pending_load is None else self.pending_load + load
        return routing

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        load, self.pending_load = self.pending_load, None
        if load is None:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        self.expert_bias += self.options.update_rate * torch.sign(load.mean() - load).to(self.expert_bias.dtype)


def sinkhorn(cost: Tensor, tol: float = 1e-4, max_iters: int = 1000) -> Tensor:
    """Scale ``cost`` (T, E) towards a doubly stochastic matrix (Megatron's ``sinkhorn``)."""
    d0 = torch.ones(cost.shape[0], device=cost.device, dtype=cost.dtype)
    d1 = torch.ones(cost.shape[1], device=cost.device, dtype=cost.dtype)
    eps = 1e-8
    for _ in range(max_iters):
        d0 = (1.0 / d0.numel()) / (torch.sum(d1 * cost, 1) + eps)
        d1_new = (1.0 / d1.numel()) / (torch.sum(d0.unsqueeze(1) * cost, 0) + eps)
        done = torch.mean(torch.abs(d1_new - d1)) < tol
        d1 = d1_new
        if done:
            break
    return d1 * cost * d0.unsqueeze(1)


class SinkhornRouter(Router):
    """S-BASE (Clark et al. 2022): in training, experts are the top-k of ``sinkhorn(exp(logits))``
    (no gradient); at inference the top-k of the logits. Gates: ``sigmoid(logits)`` for k = 1,
    ``softmax(logits)`` otherwise. Balanced by construction, so the LB loss does not apply."""

    balancing_loss = False

    @dataclass
    class Options:
        tol: float = 1e-4

    def route(self, logits: Tensor) -> Routing:
        if self.training:
            with torch.no_grad():
                stable = logits - logits.max()
                _, indices = torch.topk(sinkhorn(stable.exp(), self.options.tol), self.top_k, dim=-1)
        else:
            _, indices = torch.topk(logits, self.top_k, dim=-1)
        gates = torch.sigmoid(logits) if self.top_k == 1 else F.softmax(logits, dim=-1)
        probs = F.softmax(logits, dim=-1)
        return self.token_choice(logits, probs, gates.gather(-1, indices), indices)


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): ``S = softmax(logits)``; each expert takes its top
    ``C = ceil(T * cf / E)`` tokens. A token's experts depend on the other tokens of the batch,
    later ones included, so it leaks the future in a causal LM and is refused unless forced."""

    balancing_loss = False
    causal = False
    check_overrides = ("moe.router_options.allow_causal=true",)

    @dataclass
    class Options:
        capacity_factor: float = 2.0
        allow_causal: bool = False

    def __init__(self, cfg, layer_idx, options):
        super().__init__(cfg, layer_idx, options)
        if not options.allow_causal:
            raise ConfigError(
                "expert-choice routing is refused for causal language models: each expert picks its tokens from "
                "the whole batch, so a token's output depends on tokens after it (it sees the future). Set "
                "moe.router_options.allow_causal=true to use it anyway, e.g. for a non-causal experiment.")

    def capacity(self, tokens: int) -> int:
        return min(tokens, math.ceil(tokens * self.options.capacity_factor / self.num_experts))

    def assignments(self, tokens: int) -> int:
        return self.num_experts * self.capacity(tokens)

    def route(self, logits: Tensor) -> Routing:
        T, E = logits.shape
        probs = F.softmax(logits, dim=-1)
        capacity = self.capacity(T)
        weights, token = torch.topk(probs.t(), capacity, dim=-1)  # (E, C)
        expert = torch.arange(E, device=logits.device).repeat_interleave(capacity)
        selected = torch.full((E,), capacity, device=logits.device, dtype=torch.long)
        # top_k here is the mean number of experts per token, for the LB-loss normalization
        return Routing(token.reshape(-1), expert, weights.reshape(-1), logits, probs, selected,
                       top_k=max(1, round(capacity * E / T)))


class HashRouter(Router):
    """Hash layers (Roller et al. 2021): token id ``t`` goes to expert ``h(t) mod E``, with ``h`` a fixed
    multiplicative hash (Knuth's, salted by ``seed``), so a token's expert never changes and needs no
    learning. Top-1; the gate is the softmax probability of that expert, as Switch gates its choice, so
    the router still learns how much of the expert to take. Needs the token ids of the router context."""

    balancing_loss = False
    check_overrides = ("moe.top_k=1",)

    @dataclass
    class Options:
        seed: int = 0

    def __init__(self, cfg, layer_idx, options):
        super().__init__(cfg, layer_idx, options)
        if self.top_k != 1:
            raise ConfigError(f"the hash router sends each token to one expert: set moe.top_k=1 (got {self.top_k})")

    def route(self, logits: Tensor, context: RouterContext) -> Routing:
        if context.token_ids is None:
            raise ConfigError("the hash router routes by token id, and this MoE layer was called without the "
                              "token ids (call the model, or pass token_ids to the MoE layer)")
        salt = (self.options.seed * 0x9E3779B1 + context.layer) & 0xFFFFFFFF
        hashed = (context.token_ids.long() * 2654435761 + salt) & 0xFFFFFFFF
        indices = (hashed % self.num_experts)[:, None]
        probs = F.softmax(logits, dim=-1)
        return self.token_choice(logits, probs, probs.gather(-1, indices), indices)


@zoo.hookimpl
def register_routers(register):
    register("topk", TopKRouter)
    register("switch", SwitchRouter)
    register("sigmoid-bias", SigmoidBiasRouter)
    register("sinkhorn", SinkhornRouter)
    register("expert-choice", ExpertChoiceRouter)
    register("hash", HashRouter)
