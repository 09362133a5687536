"""timm-style tests over the zoo's MoE variants: every tiny MoE variant builds, runs, backpropagates
and counts its parameters right; the OLMoE-1B-7B shapes build on meta with the paper's sizes; and a
tiny MoE model with the aux-loss-free (sigmoid-bias) router learns."""
from __future__ import annotations

import math

import pytest
import torch

import zoo
from zoo.moe import MoEFFN, after_optimizer_step

pytestmark = pytest.mark.usefixtures("registry_unchanged", "one_intra_op_thread")




TINY_MOE = zoo.list_models("tiny-moe-*")
OLMOE = zoo.list_models("olmoe-1b-7b-*")


def recount(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active) from scratch: active drops (E - k) experts of 3*F*H weights per MoE layer."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoEFFN):
            cfg = model.cfg.moe
            inactive += (cfg.num_experts - cfg.top_k) * 3 * cfg.hidden_size * model.cfg.d_model
    return total, total - inactive


def test_moe_variant_lists_are_populated():
    assert len(TINY_MOE) >= 9
    assert {"olmoe-1b-7b-prenorm", "olmoe-1b-7b-hybridnorm-star"} <= set(OLMOE)
    for name in TINY_MOE + OLMOE:
        cfg = zoo.get_config(name)
        assert cfg.is_moe and cfg.moe.top_k <= cfg.moe.num_experts


@pytest.mark.parametrize("name", TINY_MOE)
def test_tiny_moe_builds_trains_and_counts(name):
    torch.manual_seed(0)
    model = zoo.build(name)
    cfg = model.cfg
    assert cfg.ffn.type == "moe" and all(p.device.type == "cpu" for p in model.parameters())
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -100
    out = model(idx, targets=targets)
    assert out.logits.shape == (2, 16, cfg.vocab_size) and torch.isfinite(out.logits).all()
    assert out.loss is not None and torch.isfinite(out.loss)
    assert out.aux_loss is not None and out.aux_loss.ndim == 0 and torch.isfinite(out.aux_loss) and out.aux_loss > 0
    assert len(out.router_stats) == cfg.n_layers
    for stats in out.router_stats:
        assert int(stats["tokens_per_expert"].sum()) == 2 * 16 * cfg.moe.top_k

    (out.loss + out.aux_loss).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    assert all(b.ffn.router.layer.weight.grad.abs().sum() > 0 for b in model.blocks)

    total, active = recount(model)
    st = zoo.stats(name, flops=False)  # counted on meta, without allocating
    assert st.total_params == total
    assert st.active_params == active
    assert active < total


@pytest.mark.parametrize("name", OLMOE)
def test_olmoe_builds_on_meta_with_paper_sizes(name):
    model = zoo.build(name, device="meta")
    params = list(model.parameters())
    assert params and all(p.is_meta for p in params)
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.hidden_size) == (16, 2048, 64, 8, 1024)
    total, active = recount(model)
    st = zoo.stats(name, flops=False)
    assert (st.total_params, st.active_params) == (total, active)
    assert st.total_params == pytest.approx(6.9e9, rel=0.02)
    assert st.active_params == pytest.approx(1.28e9, rel=0.02)


def test_tiny_moe_with_sigmoid_bias_router_learns():
    torch.manual_seed(0)
    model = zoo.build("tiny-moe-prenorm", {
        "n_layers": 2, "d_model": 64, "vocab_size": 64, "max_seq_len": 32,
        "moe": {"num_experts": 4, "top_k": 2, "hidden_size": 64, "router": "sigmoid-bias",
                "router_options": {"update_rate": 0.01, "renormalize": True}}})
    routers = [b.ffn.router for b in model.blocks]
    assert all(type(r).__name__ == "SigmoidBiasRouter" for r in routers)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    assert not any(p is r.expert_bias for r in routers for g in opt.param_groups for p in g["params"])
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 64, (4, 24), generator=g)
    targets = torch.roll(idx, -1, dims=1)
    losses = []
    for _ in range(30):
        out = model(idx, targets=targets)
        loss = out.loss + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        after_optimizer_step(model)
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1.0, losses  # starts near log(64) = 4.16
    assert min(losses[-5:]) < 0.7 * losses[0]
    assert any(r.expert_bias.abs().sum() > 0 for r in routers)  # the bias was updated each step
