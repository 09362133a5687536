"""Each built-in router against an independent reference of its equation (shared/reference/
variants.md section C): softmax top-k (OLMoE / Mixtral), Switch top-1 with capacity, DeepSeek-V3
sigmoid scores with an aux-loss-free bias, Sinkhorn (S-BASE), expert choice; and input jitter."""
from __future__ import annotations

import copy
import functools
import json
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from moe_helpers import build_moe_layer

import zoo
from zoo.moe import MoEFFN, Routing, after_optimizer_step

pytestmark = pytest.mark.usefixtures("registry_unchanged", "one_intra_op_thread")




H, FF = 32, 16


@functools.lru_cache(maxsize=None)
def _merged_config(key: str) -> zoo.ModelConfig:
    return zoo.get_config(zoo.ModelConfig(), json.loads(key))


def moe_config(router: str = "topk", options: Any = None, top_k: int = 2, num_experts: int = 8,
               **extra: Any) -> zoo.ModelConfig:
    moe = {"num_experts": num_experts, "top_k": top_k, "hidden_size": FF, "backend": "loop", "router": router,
           "router_options": dict(options or {})}
    moe.update(extra.pop("moe", {}))
    overrides = {"d_model": H, "n_heads": 4, "ffn": {"type": "moe"}, **extra, "moe": moe}
    return copy.deepcopy(_merged_config(json.dumps(overrides, sort_keys=True)))


def make_layer(seed: int = 0, **kw: Any) -> MoEFFN:
    return build_moe_layer(moe_config(**kw), seed)


def tokens(T: int, seed: int = 1, offset: float = 0.0) -> torch.Tensor:
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed))
    x[:, 0] += offset
    return x


def logits_of(layer: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    return (x.double() @ layer.router.layer.weight.double().t())


def dense_gates(routing: Routing, T: int, E: int) -> torch.Tensor:
    """(T, E) gate matrix of a flat routing; an assignment listed twice would show up as a sum."""
    G = torch.zeros(T, E, dtype=torch.float64)
    G.index_put_((routing.token, routing.expert), routing.weight.detach().double(), accumulate=True)
    return G


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, torch.topk(scores, k, dim=-1).indices, True)


def reference_moe(x: torch.Tensor, G: torch.Tensor, layer: MoEFFN) -> torch.Tensor:
    """``y_t = sum_e G[t, e] * (silu(x_t w1_e^T) * (x_t v1_e^T)) w2_e``, every expert on every token."""
    w1, v1, w2 = (w.double() for w in layer.experts.mlp.views())
    xd = x.double()
    hidden = F.silu(torch.einsum("th,efh->tef", xd, w1)) * torch.einsum("th,efh->tef", xd, v1)
    out = torch.einsum("tef,efh->teh", hidden, w2)
    return torch.einsum("te,teh->th", G, out)


# ---------------------------------------------------------------------------------------------
# C1: softmax top-k token choice
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("renormalize", [False, True], ids=["olmoe", "mixtral"])
@pytest.mark.parametrize("E,k", [(8, 2), (16, 4), (4, 1)])
def test_topk_matches_softmax_topk(E, k, renormalize):
    layer = make_layer(router="topk", options={"renormalize": renormalize}, top_k=k, num_experts=E)
    x = tokens(20)
    routing = layer.router(x)
    T = x.shape[0]
    z = logits_of(layer, x)
    p = torch.softmax(z, dim=-1)
    mask = topk_mask(p, k)
    want = torch.where(mask, p, torch.zeros_like(p))
    if renormalize:
        want = want / want.sum(-1, keepdim=True)
        # Mixtral's own form: softmax over the top-k logits (mistral-inference) is the same thing
        mistral = torch.where(mask, z, torch.full_like(z, -math.inf)).softmax(-1)
        torch.testing.assert_close(want, mistral)
    got = dense_gates(routing, T, E)
    assert routing.token.numel() == routing.expert.numel() == routing.weight.numel() == T * k
    assert torch.equal(got > 0, mask), "selected experts differ from the top-k of the softmax"
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routing.probs.double(), p, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routing.logits.double(), z, atol=1e-5, rtol=1e-5)
    assert routing.logits.dtype == torch.float32
    assert torch.equal(routing.selected, mask.sum(0))
    assert routing.top_k == k and routing.dropped == 0
    row = got.sum(-1)
    if renormalize:
        torch.testing.assert_close(row, torch.ones_like(row))
    elif k < E:
        assert (row < 1).all()  # OLMoE keeps raw probabilities: gates do not sum to 1
    # and the layer's output is that gate-weighted sum of experts
    y, _ = layer(x)
    torch.testing.assert_close(y.double(), reference_moe(x, want, layer), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# C2: Switch top-1 with capacity
# ---------------------------------------------------------------------------------------------
def test_switch_top1_gate_is_the_unnormalized_probability():
    layer = make_layer(router="switch", top_k=1)
    x = tokens(24)
    routing = layer.router(x)
    p = torch.softmax(logits_of(layer, x), -1)
    want = torch.where(topk_mask(p, 1), p, torch.zeros_like(p))
    torch.testing.assert_close(dense_gates(routing, 24, 8), want, atol=1e-6, rtol=1e-5)
    assert routing.dropped == 0 and routing.token.numel() == 24
    assert torch.equal(routing.token, torch.arange(24))


@pytest.mark.parametrize("T,cf", [(24, 1.0), (21, 1.25), (30, 2.0), (7, 0.5)])
def test_switch_capacity_keeps_each_experts_first_tokens(T, cf):
    E = 8
    layer = make_layer(router="switch", options={"capacity_factor": cf}, top_k=1, num_experts=E)
    with torch.no_grad():  # skew: most tokens prefer expert 0 or 1, so capacity bites
        layer.router.layer.weight[0, 0] = 1.0
        layer.router.layer.weight[1, 0] = 0.9
    x = tokens(T, offset=3.0)
    p = torch.softmax(logits_of(layer, x), -1)
    choice = p.argmax(-1)
    capacity = math.ceil(T / E * cf)
    kept = torch.zeros(T, dtype=torch.bool)
    seen = [0] * E
    for t in range(T):  # tokens in order; each expert keeps its first C
        e = int(choice[t])
        if seen[e] < capacity:
            kept[t] = True
        seen[e] += 1
    n_dropped = int((~kept).sum())
    assert n_dropped > 0, "the case should drop tokens"

    routing = layer.router(x)
    assert routing.dropped == n_dropped
    assert torch.equal(routing.selected, torch.bincount(choice, minlength=E))  # before dropping (f_i of the LB loss)
    want = torch.zeros(T, E, dtype=torch.float64)
    want[kept, choice[kept]] = p[kept, choice[kept]]
    torch.testing.assert_close(dense_gates(routing, T, E), want, atol=1e-6, rtol=1e-5)
    assert torch.bincount(routing.expert, minlength=E).max() <= capacity

    y, aux = layer(x)
    assert aux.stats["dropped"] == n_dropped
    assert torch.equal(aux.stats["tokens_per_expert"], torch.bincount(choice[kept], minlength=E))
    assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))  # dropped tokens: no MoE output at all
    assert (y[kept].abs().sum(-1) > 0).all()
    torch.testing.assert_close(y.double(), reference_moe(x, want, layer), atol=1e-5, rtol=1e-4)


def test_switch_refuses_bad_options():
    with pytest.raises(zoo.ConfigError, match="top_k"):
        make_layer(router="switch", top_k=2)
    with pytest.raises(zoo.ConfigError, match="capacity_factor"):
        make_layer(router="switch", top_k=1, options={"capacity_factor": 0.0})


# ---------------------------------------------------------------------------------------------
# C7: sigmoid scores, aux-loss-free bias
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("renormalize,route_scale", [(True, 1.0), (True, 2.5), (False, 1.5)])
def test_sigmoid_bias_selects_with_bias_and_gates_without(renormalize, route_scale):
    E, k, T = 8, 2, 40
    layer = make_layer(router="sigmoid-bias", options={"renormalize": renormalize, "route_scale": route_scale}, top_k=k)
    bias = torch.linspace(-0.3, 0.3, E)[torch.randperm(E, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        layer.router.expert_bias.copy_(bias)
    x = tokens(T)
    s = torch.sigmoid(logits_of(layer, x))
    mask = topk_mask(s + bias.double(), k)
    assert not torch.equal(mask, topk_mask(s, k)), "the bias should change some selections"
    gates = torch.where(mask, s, torch.zeros_like(s))
    if renormalize:
        gates = gates / gates.sum(-1, keepdim=True)
    gates = gates * route_scale
    routing = layer.router(x)
    got = dense_gates(routing, T, E)
    assert torch.equal(got > 0, mask)
    torch.testing.assert_close(got, gates, atol=1e-6, rtol=1e-5)
    y, _ = layer(x)
    torch.testing.assert_close(y.double(), reference_moe(x, gates, layer), atol=1e-5, rtol=1e-4)


def test_sigmoid_bias_is_a_buffer_in_the_checkpoint_not_a_parameter():
    torch.manual_seed(0)
    model = zoo.build(moe_config(router="sigmoid-bias", n_layers=2, vocab_size=64, max_seq_len=32))
    names = {n for n, _ in model.named_parameters()}
    assert not any("expert_bias" in n for n in names)
    buffers = dict(model.named_buffers())
    state = model.state_dict()
    for i in range(2):
        key = f"blocks.{i}.ffn.router.expert_bias"
        assert key in buffers and key in state
        assert not any(p is buffers[key] for p in model.parameters())
        assert f"blocks.{i}.ffn.router.pending_load" not in state  # per-step scratch, not checkpointed
    # an optimizer over model.parameters() never moves it, even with a gradient-carrying loss
    with torch.no_grad():
        for b in model.blocks:
            b.ffn.router.expert_bias.copy_(torch.arange(8) * 0.01)
    before = {k: v.clone() for k, v in buffers.items() if "expert_bias" in k}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 64, (2, 8))
    out = model(idx, targets=idx)
    (out.loss + out.aux_loss).backward()
    opt.step()
    for k, v in before.items():
        assert torch.equal(buffers[k], v)
    # round trip through a state_dict
    other = zoo.build(moe_config(router="sigmoid-bias", n_layers=2, vocab_size=64, max_seq_len=32))
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.blocks[1].ffn.router.expert_bias, before["blocks.1.ffn.router.expert_bias"])


def test_sigmoid_bias_update_rule():
    E, k, rate = 8, 2, 0.01
    layer = make_layer(router="sigmoid-bias", options={"update_rate": rate}, top_k=k).train()
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, E))
    b0 = layer.router.expert_bias.clone()
    xs = [tokens(16, seed=s) for s in (1, 2)]
    load = torch.zeros(E)
    for x in xs:  # two micro-batches before one step: their loads add up
        s = torch.sigmoid(logits_of(layer, x)).float()
        load += topk_mask(s + layer.router.expert_bias, k).sum(0).float()
        layer(x)
    layer.eval()
    layer(tokens(16, seed=3))  # an eval forward does not count
    after_optimizer_step(layer)
    want = b0 + rate * torch.sign(load.mean() - load)
    torch.testing.assert_close(layer.router.expert_bias, want, atol=1e-7, rtol=0)
    assert (layer.router.expert_bias != b0).any()
    # the pending load was consumed: a step without forwards changes nothing
    after_optimizer_step(layer)
    torch.testing.assert_close(layer.router.expert_bias, want, atol=0, rtol=0)


def test_sigmoid_bias_steps_balance_a_skewed_router():
    """No optimizer: only after_optimizer_step's bias updates move the load toward balance."""
    E, k = 8, 2
    layer = make_layer(router="sigmoid-bias", options={"update_rate": 0.01}, top_k=k).train()
    with torch.no_grad():
        layer.router.layer.weight[0, 0] = 2.0  # with x[:, 0] ~ 3: expert 0 is everyone's choice
    w0 = layer.router.layer.weight.clone()
    model = torch.nn.ModuleDict({"ffn": layer})  # after_optimizer_step walks a model's modules
    g = torch.Generator().manual_seed(0)

    def load_stats(training: bool) -> tuple[float, float]:
        x = torch.randn(128, H, generator=g)
        x[:, 0] += 3.0
        layer.train(training)  # a training forward counts the load for the next update; eval does not
        with torch.no_grad():
            load = torch.bincount(layer.router(x).expert, minlength=E).float()
        return (load.max() / load.mean()).item(), (load.std(unbiased=False) / load.mean()).item()

    first = load_stats(training=False)
    assert first[0] >= 3.5, first  # expert 0 takes (nearly) every token: max/mean about E/k
    for _ in range(120):
        load_stats(training=True)
        after_optimizer_step(model)
    last = load_stats(training=False)
    assert last[0] < 0.5 * first[0] and last[0] < 1.8, (first, last)
    assert last[1] < 0.3 * first[1], (first, last)
    assert torch.equal(layer.router.layer.weight, w0)  # the router weights never moved
    assert layer.router.expert_bias[0] == layer.router.expert_bias.min() < 0  # the hot expert was pushed down


def test_sigmoid_bias_update_is_exact_in_a_bf16_model():
    layer = make_layer(router="sigmoid-bias", top_k=1, num_experts=4).to(torch.bfloat16).train()
    with torch.no_grad():
        layer.router.expert_bias.fill_(0.5)
    x = tokens(16).bfloat16()
    with torch.no_grad():
        load = torch.bincount(layer.router(x).expert, minlength=4).float()
    assert (load != load.mean()).any()
    after_optimizer_step(layer)
    # the documented rule, as in fp32 (Megatron keeps the bias in fp32): 0.5 +- 1e-3 must be kept
    want = 0.5 + 1e-3 * torch.sign(load.mean() - load)
    torch.testing.assert_close(layer.router.expert_bias.float(), want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# C5: Sinkhorn (S-BASE)
# ---------------------------------------------------------------------------------------------
def sinkhorn_reference(logits: torch.Tensor, max_iters: int = 5000) -> torch.Tensor:
    """Alternate row and column normalization of exp(logits) (float64) until doubly stochastic:
    rows sum to 1/T, columns to 1/E."""
    P = torch.exp(logits.double() - logits.max())
    T, E = P.shape
    for _ in range(max_iters):
        P = P / (T * P.sum(1, keepdim=True))
        P = P / (E * P.sum(0, keepdim=True))
        if (P.sum(1) * T - 1).abs().max() < 1e-12:
            break
    return P


@pytest.mark.parametrize("k", [1, 2])
def test_sinkhorn_training_selects_topk_of_the_balanced_plan(k):
    E, T = 8, 32
    layer = make_layer(router="sinkhorn", top_k=k).train()
    x = tokens(T)
    with torch.no_grad():  # skew toward expert 0, so plain top-k and Sinkhorn disagree
        layer.router.layer.weight[0] += 2.5 * x.mean(0) / x.mean(0).norm()
    x = x + x.mean(0)
    z = logits_of(layer, x)
    plan = sinkhorn_reference(z)
    torch.testing.assert_close(plan.sum(0), torch.full((E,), 1 / E, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(1), torch.full((T,), 1 / T, dtype=torch.float64))
    mask = topk_mask(plan, k)
    assert not torch.equal(mask, topk_mask(z, k)), "the case should make Sinkhorn differ from plain top-k"
    gates_all = torch.sigmoid(z) if k == 1 else torch.softmax(z, -1)
    want = torch.where(mask, gates_all, torch.zeros_like(gates_all))

    routing = layer.router(x)
    got = dense_gates(routing, T, E)
    assert torch.equal(got > 0, mask), "training selection is not the top-k of the Sinkhorn plan"
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    counts = mask.sum(0)
    plain = topk_mask(z, k).sum(0)
    assert counts.max() - counts.min() < plain.max() - plain.min()  # more balanced than plain top-k

    # gates carry the gradient (selection itself is under no_grad)
    y, aux = layer(x)
    assert aux.stats["lb_loss"] == 0  # balanced by construction: no LB loss
    y.sum().backward()
    assert layer.router.layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 2])
def test_sinkhorn_eval_is_plain_topk(k):
    E, T = 8, 32
    layer = make_layer(router="sinkhorn", top_k=k).eval()
    x = tokens(T)
    with torch.no_grad():
        layer.router.layer.weight[0] += 2.5 * x.mean(0) / x.mean(0).norm()
    x = x + x.mean(0)
    z = logits_of(layer, x)
    mask = topk_mask(z, k)
    gates_all = torch.sigmoid(z) if k == 1 else torch.softmax(z, -1)
    got = dense_gates(layer.router(x), T, E)
    torch.testing.assert_close(got, torch.where(mask, gates_all, torch.zeros_like(gates_all)), atol=1e-6, rtol=1e-5)
    assert torch.equal(got > 0, mask)


# ---------------------------------------------------------------------------------------------
# C4: expert choice
# ---------------------------------------------------------------------------------------------
def test_expert_choice_is_refused_without_allow_causal():
    cfg = moe_config(router="expert-choice", n_layers=1, vocab_size=32)
    with pytest.raises(zoo.ConfigError) as info:
        zoo.build(cfg)
    msg = str(info.value)
    assert "causal" in msg and "future" in msg and "allow_causal" in msg
    with pytest.raises(zoo.ConfigError, match="allow_causal"):
        zoo.build(moe_config(router="expert-choice", options={"allow_causal": False}, n_layers=1, vocab_size=32))


@pytest.mark.parametrize("T,cf", [(24, 2.0), (10, 1.0), (13, 1.5), (5, 4.0)])
def test_expert_choice_each_expert_takes_exactly_capacity(T, cf):
    E = 8
    layer = make_layer(router="expert-choice", options={"allow_causal": True, "capacity_factor": cf})
    x = tokens(T)
    capacity = min(T, math.ceil(T * cf / E))
    routing = layer.router(x)
    assert torch.equal(torch.bincount(routing.expert, minlength=E), torch.full((E,), capacity))
    p = torch.softmax(logits_of(layer, x), -1)
    want_mask = topk_mask(p.t(), capacity).t()  # each expert's top-C tokens by its score
    want = torch.where(want_mask, p, torch.zeros_like(p))
    got = dense_gates(routing, T, E)
    assert torch.equal(got > 0, want_mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    y, aux = layer(x)
    assert torch.equal(aux.stats["tokens_per_expert"], torch.full((E,), capacity))
    assert aux.stats["load_cv"] == 0 and aux.stats["max_over_mean"] == 1 and aux.stats["lb_loss"] == 0
    torch.testing.assert_close(y.double(), reference_moe(x, want, layer), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# C8: jitter
# ---------------------------------------------------------------------------------------------
def test_jitter_applies_to_router_inputs_in_training_only():
    eps = 0.1
    layer = make_layer(moe={"jitter": eps})
    clean = make_layer(moe={"jitter": 0.0})
    clean.load_state_dict(layer.state_dict())
    seen = []
    layer.router.layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    x = tokens(24)

    layer.train()
    torch.manual_seed(0)
    y1, _ = layer(x)
    y2, _ = layer(x)
    r1, r2 = seen[-2], seen[-1]
    assert not torch.equal(r1, x) and not torch.equal(r1, r2)  # jittered, and freshly each call
    ratio = r1 / x
    assert ((ratio >= 1 - eps - 1e-6) & (ratio <= 1 + eps + 1e-6)).all()  # x * U(1-eps, 1+eps)
    assert (ratio - 1).abs().max() > eps / 2
    # jitter touches the routing only: the experts see the clean tokens
    routing = layer.router(x)
    torch.testing.assert_close(routing.logits, seen[-1] @ layer.router.layer.weight.t())

    layer.eval()
    clean.eval()
    y3, aux3 = layer(x)
    assert torch.equal(seen[-1], x)  # no jitter in eval
    y4, aux4 = clean(x)
    torch.testing.assert_close(y3, y4, atol=0, rtol=0)
    torch.testing.assert_close(aux3.loss, aux4.loss, atol=0, rtol=0)
    # and without jitter, training sees the clean input too
    clean.train()
    clean(x)
    torch.testing.assert_close(clean(x)[0], y4, atol=1e-6, rtol=1e-6)


def test_jittered_routing_gates_the_clean_tokens():
    layer = make_layer(moe={"jitter": 0.2}).train()
    x = tokens(24)
    captured = {}
    orig_route = layer.router.route

    def route(logits):
        routing = orig_route(logits)
        captured["routing"] = routing
        return routing

    layer.router.route = route
    torch.manual_seed(1)
    y, _ = layer(x)
    G = dense_gates(captured["routing"], 24, 8)
    torch.testing.assert_close(y.double(), reference_moe(x, G, layer), atol=1e-5, rtol=1e-4)
