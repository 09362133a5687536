"""timm-style tests over the zoo's dense variants (MoE variants are covered with the MoE layer)."""
from __future__ import annotations

import math

import pytest
import torch

import zoo

pytestmark = pytest.mark.usefixtures("registry_unchanged")

TINY_DENSE = zoo.list_models("tiny-dense-*")
OLMO2 = zoo.list_models("olmo2-*")


def test_variant_lists_are_populated_and_lowercase():
    assert len(TINY_DENSE) >= 9
    assert {"olmo2-1b-hybridnorm", "olmo2-1b-hybridnorm-star", "olmo2-1b-prenorm"} <= set(OLMO2)
    for name in zoo.list_models():
        assert name == name.lower(), name
    assert TINY_DENSE == sorted(TINY_DENSE)
    strategies = {zoo.get_config(n).norm_strategy for n in TINY_DENSE}
    assert {"prenorm", "postnorm", "hybridnorm", "hybridnorm-star"} <= strategies


@pytest.mark.parametrize("name", TINY_DENSE)
def test_tiny_dense_builds_trains_and_counts(name):
    torch.manual_seed(0)
    model = zoo.build(name)
    assert isinstance(model, zoo.ZooModel)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    cfg = model.cfg
    assert cfg == zoo.get_config(name) and cfg.ffn.type == "dense"

    idx = torch.randint(0, cfg.vocab_size, (2, 32))
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -100  # ignored positions are honoured
    out = model(idx, targets=targets)
    assert out.logits.shape == (2, 32, cfg.vocab_size)
    assert torch.isfinite(out.logits).all()
    assert out.loss is not None and out.loss.ndim == 0 and torch.isfinite(out.loss)
    # a freshly initialized LM is near uniform over the vocabulary (post-norm placements with tied
    # embeddings favour copying the input token, hence the loose upper bound)
    assert math.log(cfg.vocab_size) - 1.0 < out.loss.item() < math.log(cfg.vocab_size) + 3.0, out.loss.item()

    out.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())

    # the stats (counted on meta, without allocation) agree with the built model
    st = zoo.stats(name, seq_len=16)
    n_params = sum(p.numel() for p in model.parameters())
    assert st.total_params == n_params
    assert st.active_params == n_params  # dense: every parameter is active
    assert st.flops_per_token > 0 and st.seq_len == 16


@pytest.mark.parametrize("name", TINY_DENSE)
def test_tiny_dense_forward_without_targets_is_causal(name):
    torch.manual_seed(0)
    model = zoo.build(name, ["n_layers=2"]).eval()
    idx = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        out = model(idx)
        changed = idx.clone()
        changed[0, 8:] = (changed[0, 8:] + 1) % 256
        out2 = model(changed)
    assert out.loss is None
    torch.testing.assert_close(out.logits[:, :8], out2.logits[:, :8])  # no peeking at later tokens
    assert not torch.allclose(out.logits[:, 8:], out2.logits[:, 8:])


@pytest.mark.parametrize("name", OLMO2)
def test_olmo2_builds_on_meta(name):
    model = zoo.build(name, device="meta")
    params = list(model.parameters())
    assert params and all(p.is_meta for p in params)
    cfg = model.cfg
    assert len(model.blocks) == cfg.n_layers == 16
    st = zoo.stats(name, seq_len=8)
    assert st.total_params == sum(p.numel() for p in params)
    assert st.active_params == st.total_params
    assert st.flops_per_token > 0
    # a meta forward runs (that is how FLOPs are counted)
    out = model(torch.zeros(1, 8, dtype=torch.long, device="meta"))
    assert out.logits.shape == (1, 8, cfg.vocab_size) and out.logits.is_meta


def test_olmo2_hybridnorm_size():
    st = zoo.stats("olmo2-1b-hybridnorm")  # default seq_len: the config's max_seq_len
    assert st.total_params == pytest.approx(1.18e9, rel=0.01)
    assert st.seq_len == zoo.get_config("olmo2-1b-hybridnorm").max_seq_len
    # about 2 FLOPs per parameter per token plus attention; never less than the matmul weights
    assert 2 * 0.9e9 < st.flops_per_token < 2 * 2e9
    assert st.train_flops_per_token == 3 * st.flops_per_token


def test_strategies_change_parameter_counts_as_expected():
    """Norm placement is the only difference between tiny dense variants: counts move by norm gains."""
    d = zoo.get_config("tiny-dense-prenorm").d_model
    pre = zoo.stats("tiny-dense-prenorm", seq_len=4).total_params
    post = zoo.stats("tiny-dense-postnorm", seq_len=4).total_params
    hybrid = zoo.stats("tiny-dense-hybridnorm", seq_len=4).total_params
    assert pre - post == d  # post-norm has no final norm
    assert hybrid != pre  # QKV-norm gains replace the attention input norms


def test_dtype_and_device_arguments():
    model = zoo.build("tiny-dense-hybridnorm", ["n_layers=1"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = model(torch.randint(0, 256, (1, 8)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_build_is_deterministic_under_a_seed():
    torch.manual_seed(123)
    a = zoo.build("tiny-dense-hybridnorm-star", ["n_layers=2"])
    torch.manual_seed(123)
    b = zoo.build("tiny-dense-hybridnorm-star", ["n_layers=2"])
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        torch.testing.assert_close(pa, pb)


LADDER = zoo.list_models("ladder-*")


def test_the_ladder_says_its_size_and_matches_dense_and_moe():
    """About 20M, 150M and 550M active parameters, for the paper's three placements, dense and MoE; the MoE
    variant's active parameters are its dense twin's plus only the router."""
    assert len(LADDER) == 18
    for name in LADDER:
        _, size, kind, strategy = name.split("-", 3)
        cfg, st = zoo.get_config(name), zoo.stats(name, flops=False)
        assert strategy in ("prenorm", "hybridnorm", "hybridnorm-star") and cfg.norm_strategy == strategy
        assert cfg.ffn.type == kind
        target = int(size.removesuffix("m")) * 1e6
        assert abs(st.active_params - target) / target < 0.05, (name, st.active_params)
        if kind == "moe":
            dense = zoo.stats(name.replace("-moe-", "-dense-"), flops=False)
            router = cfg.n_layers * cfg.moe.num_experts * cfg.d_model
            assert st.active_params == dense.active_params + router
            assert st.total_params > 2 * dense.total_params


@pytest.mark.parametrize("name", ["ladder-20m-dense-hybridnorm", "ladder-20m-moe-hybridnorm-star"])
def test_the_smallest_rung_trains_a_step(name):
    torch.manual_seed(0)
    model = zoo.build(name)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 64))
    out = model(idx, targets=idx.roll(-1, 1))
    (out.loss + (out.aux_loss if out.aux_loss is not None else 0)).backward()
    assert math.log(model.cfg.vocab_size) - 1.0 < out.loss.item() < math.log(model.cfg.vocab_size) + 1.0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
