"""MoE auxiliary losses and router statistics: the load-balancing loss in the Megatron/MegaBlocks
normalization (1 at perfect balance; HF's form is k times larger), the ST-MoE z-loss, the layer's
weighted sum, the model's sum over layers and its per-layer router_stats, with no global state."""
from __future__ import annotations

import copy
import functools
import json
import sys
from typing import Any

import pytest
import torch
from moe_helpers import build_moe_layer

import zoo
from zoo.moe import MoEFFN, load_balancing_loss, z_loss

pytestmark = pytest.mark.usefixtures("registry_unchanged", "one_intra_op_thread")




H, FF = 32, 16
STAT_KEYS = {"tokens_per_expert", "load_cv", "max_over_mean", "dropped", "router_logsumexp", "lb_loss", "z_loss"}


@functools.lru_cache(maxsize=None)
def _merged_config(key: str) -> zoo.ModelConfig:
    return zoo.get_config(zoo.ModelConfig(), json.loads(key))


def moe_config(router: str = "topk", options: Any = None, top_k: int = 2, num_experts: int = 8, lb_weight: float = 0.01,
               z_weight: float = 0.001, **extra: Any) -> zoo.ModelConfig:
    overrides = {"d_model": H, "n_heads": 4, "ffn": {"type": "moe"}, **extra,
                 "moe": {"num_experts": num_experts, "top_k": top_k, "hidden_size": FF, "backend": "loop", "router": router,
                         "router_options": dict(options or {}), "lb_weight": lb_weight, "z_weight": z_weight}}
    return copy.deepcopy(_merged_config(json.dumps(overrides, sort_keys=True)))


def make_layer(seed: int = 0, **kw: Any) -> MoEFFN:
    return build_moe_layer(moe_config(**kw), seed)


def hf_load_balancing_loss_funcs():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as mixtral_lbl
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func as olmoe_lbl
    return {"olmoe": olmoe_lbl, "mixtral": mixtral_lbl}


def reference_losses(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Independent float64 recomputation for a softmax top-k router from its logits (T, E)."""
    z = logits.double()
    T, E = z.shape
    p = torch.exp(z - z.max(-1, keepdim=True).values)
    p = p / p.sum(-1, keepdim=True)
    chosen = torch.topk(p, k, dim=-1).indices
    counts = torch.zeros(E, dtype=torch.float64)
    for t in range(T):
        for e in chosen[t].tolist():
            counts[e] += 1
    f = counts / (T * k)
    P = p.mean(0)
    lse = z.max(-1).values + torch.log(torch.exp(z - z.max(-1, keepdim=True).values).sum(-1))
    load = counts
    return {"lb": E * (f * P).sum(), "z": (lse ** 2).mean(), "counts": counts, "lse_mean": lse.mean(),
            "load_cv": load.std(unbiased=False) / load.mean(), "max_over_mean": load.max() / load.mean()}


# ---------------------------------------------------------------------------------------------
# load-balancing loss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,E,k", [(16, 8, 2), (64, 64, 8), (12, 4, 1), (9, 3, 3)])
def test_lb_loss_is_one_at_perfect_balance_whatever_the_probs(T, E, k):
    assert T * k % E == 0
    selected = torch.full((E,), T * k // E)
    for seed in range(3):
        probs = torch.softmax(3 * torch.randn(T, E, generator=torch.Generator().manual_seed(seed)), -1)
        torch.testing.assert_close(load_balancing_loss(probs, selected, k), torch.tensor(1.0), atol=1e-6, rtol=0)


def test_layer_lb_contribution_is_lb_weight_at_constructed_perfect_balance():
    """Four one-hot tokens, router rows so that token t picks experts t and t+1 (mod 4): every
    expert gets exactly T*k/E = 2 assignments, so LB = 1 and the layer adds exactly lb_weight."""
    E, k, lbw = 4, 2, 0.05
    layer = make_layer(num_experts=E, top_k=k, lb_weight=lbw, z_weight=0.0)
    with torch.no_grad():
        w = layer.router.layer.weight
        w.zero_()
        for t in range(E):
            w[t, t] = 3.0
            w[(t + 1) % E, t] = 2.0
    x = torch.zeros(2 * E, H)  # two copies of the four one-hot tokens: T = 8
    for t in range(2 * E):
        x[t, t % E] = 1.0
    _, aux = layer(x)
    assert torch.equal(aux.stats["tokens_per_expert"], torch.full((E,), 2 * k))
    torch.testing.assert_close(aux.stats["lb_loss"], torch.tensor(1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(aux.loss, torch.tensor(lbw), atol=1e-7, rtol=1e-6)
    assert aux.stats["load_cv"] == 0 and aux.stats["max_over_mean"] == 1


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
@pytest.mark.parametrize("T,E,k", [(32, 8, 2), (48, 64, 8), (20, 4, 1)])
def test_lb_loss_is_hf_form_divided_by_k(family, T, E, k):
    hf_lbl = hf_load_balancing_loss_funcs()[family]
    layer = make_layer(num_experts=E, top_k=k, options={"renormalize": family == "mixtral"})
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    routing = layer.router(x)
    ours = load_balancing_loss(routing.probs, routing.selected, routing.top_k)
    hf = hf_lbl((routing.logits,), E, k)
    torch.testing.assert_close(hf, k * ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.double(), reference_losses(routing.logits, k)["lb"], atol=1e-6, rtol=1e-5)
    # and at perfect balance HF's form is k, ours 1
    balanced = torch.full((E,), T * k / E)
    probs = torch.softmax(routing.logits, -1)
    torch.testing.assert_close(load_balancing_loss(probs, balanced, k), torch.tensor(1.0), atol=1e-6, rtol=0)


def test_hf_form_is_about_k_at_balance():
    """HF's loss on logits whose top-k is perfectly balanced: k (while ours is 1)."""
    E, k = 8, 2
    hf_lbl = hf_load_balancing_loss_funcs()["olmoe"]
    T = E  # token t prefers experts t and t+1 with equal margins
    logits = torch.zeros(T, E)
    for t in range(T):
        logits[t, t] = 5.0
        logits[t, (t + 1) % E] = 4.0
    hf = hf_lbl((logits,), E, k)
    selected = torch.bincount(torch.topk(logits, k, -1).indices.reshape(-1), minlength=E)
    assert torch.equal(selected, torch.full((E,), k))
    torch.testing.assert_close(hf, torch.tensor(float(k)), atol=1e-5, rtol=0)
    torch.testing.assert_close(load_balancing_loss(torch.softmax(logits, -1), selected, k), torch.tensor(1.0),
                               atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# z-loss and the layer's weighted sum
# ---------------------------------------------------------------------------------------------
def test_z_loss_matches_mean_squared_logsumexp():
    logits = 4 * torch.randn(37, 8, generator=torch.Generator().manual_seed(0))
    want = reference_losses(logits, 2)["z"]
    torch.testing.assert_close(z_loss(logits).double(), want, atol=1e-5, rtol=1e-6)
    # constant shift c: logsumexp shifts by c
    torch.testing.assert_close(z_loss(torch.zeros(5, 8)), torch.log(torch.tensor(8.0)) ** 2)


@pytest.mark.parametrize("router,options,k", [("topk", {"renormalize": False}, 2), ("topk", {"renormalize": True}, 3),
                                              ("switch", {}, 1)])
def test_layer_aux_is_weighted_sum_of_lb_and_z(router, options, k):
    lbw, zw = 0.3, 0.07
    layer = make_layer(router=router, options=options, top_k=k, lb_weight=lbw, z_weight=zw)
    x = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(2))
    _, aux = layer(x)
    logits = x.reshape(-1, H).double() @ layer.router.layer.weight.double().t()
    ref = reference_losses(logits, k)
    torch.testing.assert_close(aux.loss.double(), lbw * ref["lb"] + zw * ref["z"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aux.stats["lb_loss"].double(), ref["lb"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aux.stats["z_loss"].double(), ref["z"], atol=1e-5, rtol=1e-5)
    # the aux loss trains the router
    aux.loss.backward()
    assert layer.router.layer.weight.grad is not None and layer.router.layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("router,options", [("sinkhorn", {}), ("expert-choice", {"allow_causal": True})])
def test_balanced_by_construction_routers_have_no_lb_term(router, options):
    layer = make_layer(router=router, options=options, lb_weight=0.5, z_weight=0.01).train()
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(3))
    _, aux = layer(x)
    ref = reference_losses(x.double() @ layer.router.layer.weight.double().t(), 2)
    assert aux.stats["lb_loss"] == 0
    torch.testing.assert_close(aux.loss.double(), 0.01 * ref["z"], atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the model: sum over layers, per-layer statistics, nothing global
# ---------------------------------------------------------------------------------------------
def tiny_model(n_layers: int = 3, **kw: Any) -> zoo.ZooModel:
    torch.manual_seed(0)
    return zoo.build(moe_config(n_layers=n_layers, vocab_size=64, max_seq_len=32, lb_weight=0.02, z_weight=0.005, **kw))


def capture_moe_inputs(model: zoo.ZooModel) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    for block in model.blocks:
        block.ffn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    return seen


def expected_layer(model: zoo.ZooModel, i: int, h: torch.Tensor) -> dict[str, torch.Tensor]:
    ffn = model.blocks[i].ffn
    logits = h.double() @ ffn.router.layer.weight.double().t()
    ref = reference_losses(logits, ffn.top_k)
    ref["aux"] = ffn.lb_weight * ref["lb"] + ffn.z_weight * ref["z"]
    return ref


def check_stats(stats: dict[str, Any], ref: dict[str, torch.Tensor], layer: int) -> None:
    assert STAT_KEYS <= set(stats), sorted(STAT_KEYS - set(stats))
    assert stats.get("layer", layer) == layer
    assert torch.equal(stats["tokens_per_expert"].double(), ref["counts"])
    assert int(stats["dropped"]) == 0
    for key, want in (("load_cv", ref["load_cv"]), ("max_over_mean", ref["max_over_mean"]),
                      ("router_logsumexp", ref["lse_mean"]), ("lb_loss", ref["lb"]), ("z_loss", ref["z"])):
        got = torch.as_tensor(stats[key]).double()
        assert not torch.as_tensor(stats[key]).requires_grad, key  # detached statistics
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"layer {layer} {key}: {m}")


def test_model_aux_loss_is_sum_over_layers_and_stats_match():
    model = tiny_model(n_layers=3)
    seen = capture_moe_inputs(model)
    idx = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    out = model(idx, targets=torch.roll(idx, -1, 1))
    assert len(seen) == 3 and len(out.router_stats) == 3
    refs = [expected_layer(model, i, h) for i, h in enumerate(seen)]
    torch.testing.assert_close(out.aux_loss.double(), sum(r["aux"] for r in refs), atol=1e-6, rtol=1e-5)
    for i, (stats, ref) in enumerate(zip(out.router_stats, refs)):
        check_stats(stats, ref, i)
    assert out.aux_loss.requires_grad  # the caller adds it to the loss
    # the LM loss stays the LM loss: aux is reported separately
    lm = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 64), torch.roll(idx, -1, 1).reshape(-1))
    torch.testing.assert_close(out.loss, lm)


def test_dense_model_reports_no_aux():
    cfg = zoo.get_config(zoo.ModelConfig(), {"d_model": H, "n_heads": 4, "n_layers": 1, "vocab_size": 32})
    torch.manual_seed(0)
    out = zoo.build(cfg)(torch.zeros(1, 4, dtype=torch.long))
    assert out.aux_loss is None and out.router_stats == []


def _module_state() -> dict[str, int]:
    """Sizes of every list/dict/set held at module level by the zoo's MoE code and router plugins."""
    sizes = {}
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name.startswith("zoo") or name.startswith("plugins")):
            continue
        for attr, value in vars(mod).items():
            if isinstance(value, (list, dict, set)) and not attr.startswith("__"):
                sizes[f"{name}.{attr}"] = len(value)
    return sizes


def test_nothing_accumulates_across_forwards():
    model = tiny_model(n_layers=2).train()
    seen = capture_moe_inputs(model)
    g = torch.Generator().manual_seed(0)
    idx1, idx2 = torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g)
    model(idx1)  # warm up anything lazily created
    before = _module_state()
    seen.clear()
    first = model(idx1)
    again = model(idx1)
    torch.testing.assert_close(again.aux_loss, first.aux_loss, atol=0, rtol=0)  # not doubled
    seen.clear()
    second = model(idx2)
    fresh = sum(expected_layer(model, i, h)["aux"] for i, h in enumerate(seen))
    torch.testing.assert_close(second.aux_loss.double(), fresh, atol=1e-6, rtol=1e-5)
    assert len(second.router_stats) == 2
    for i, h in enumerate(seen):
        assert int(second.router_stats[i]["tokens_per_expert"].sum()) == h.shape[0] * 2
    assert _module_state() == before, "module-level state changed across forwards"
    # the backward of one forward's aux does not need or touch another's
    second.aux_loss.backward()
    first.aux_loss.backward()
