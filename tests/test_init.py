"""The paper's initialisation (hybridnorm.md section 2; OLMo ``full_megatron`` with SmallInit).

Truncated normal at +-3 sigma with sigma = sqrt(2 / (5 d)) for the embedding and the input
projections (the q/k/v slices of ``qkv.weight`` and ``ffn.gate_up.weight``), sigma / sqrt(2 L) for
the residual outputs (``attn.out.weight``, ``ffn.down.weight``), 1 / sqrt(d) for an untied head, and
norm gains at 1. The standard deviation of a normal truncated at +-c sigma is sigma * k(c) with
k(c)^2 = 1 - 2 c phi(c) / (2 Phi(c) - 1); the checks use that exact factor.
"""
from __future__ import annotations

import math

import pytest
import torch

import zoo

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

D, L, H, KV, F, V = 512, 2, 8, 4, 512, 256
HD = D // H
SIGMA = math.sqrt(2.0 / (5.0 * D))
REL = 0.03  # a few percent; the smallest tensor checked has 2^17 entries (std error ~0.2 %)




def shape(*extra):
    return [f"d_model={D}", f"n_layers={L}", f"n_heads={H}", f"n_kv_heads={KV}", f"ffn.hidden_size={F}",
            f"vocab_size={V}", *extra]


def trunc_factor(c: float) -> float:
    phi = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(c / math.sqrt(2))  # 2 Phi(c) - 1
    return math.sqrt(1 - 2 * c * phi / mass)


def build(*extra, variant="tiny-dense-prenorm", seed=0):
    torch.manual_seed(seed)
    return zoo.build(variant, shape(*extra))


def build_1layer(*extra, variant="tiny-dense-prenorm", seed=0):
    """One layer keeps the override tests fast (trunc_normal_ is the cost); residual std sigma/sqrt(2)."""
    return build("n_layers=1", *extra, variant=variant, seed=seed)


def roles(model):
    """{role: [tensors]} per layer, q/k/v cut from the fused qkv and gate/up from gate_up."""
    q_dim, kv_dim = H * HD, KV * HD
    out = {"embed": [model.embed.weight], "q": [], "k": [], "v": [], "gate": [], "up": [], "o": [], "down": []}
    for b in model.blocks:
        w = b.attn.qkv.weight
        out["q"].append(w[:q_dim])
        out["k"].append(w[q_dim:q_dim + kv_dim])
        out["v"].append(w[q_dim + kv_dim:])
        gu = b.ffn.gate_up.weight
        out["gate"].append(gu[:F])
        out["up"].append(gu[F:])
        out["o"].append(b.attn.out.weight)
        out["down"].append(b.ffn.down.weight)
    return {k: [t.detach() for t in v] for k, v in out.items()}


IN_ROLES = ("embed", "q", "k", "v", "gate", "up")
OUT_ROLES = ("o", "down")


def check_trunc_normal(w: torch.Tensor, std: float, cutoff: float, what: str):
    assert w.abs().max().item() <= cutoff * std * (1 + 1e-6), f"{what}: a value beyond {cutoff} sigma"
    # truncated at cutoff sigma, not tighter: the extreme of >= 2^17 draws comes close to the bound
    assert w.abs().max().item() >= 0.9 * cutoff * std, f"{what}: truncated tighter than {cutoff} sigma"
    assert w.mean().abs().item() < 0.02 * std, f"{what}: mean not 0"
    assert w.std().item() == pytest.approx(std * trunc_factor(cutoff), rel=REL), what


@pytest.fixture(scope="module")
def default_model():
    return build()


def test_sigma_formula(default_model):
    assert default_model.cfg.init_std == pytest.approx(math.sqrt(2.0 / (5.0 * D)))
    # the paper's d = 2048: init_std 0.013975424859373685 (config), W_O / W_2 at 0.00247 for 16 layers
    cfg = zoo.get_config("olmo2-1b-hybridnorm")
    assert cfg.init_std == pytest.approx(0.013975424859373685, rel=1e-12)
    assert cfg.init_std / math.sqrt(2 * cfg.n_layers) == pytest.approx(0.00247, abs=5e-6)


def test_input_projections_and_embedding(default_model):
    for role in IN_ROLES:
        for i, w in enumerate(roles(default_model)[role]):
            check_trunc_normal(w, SIGMA, 3.0, f"{role}[{i}]")


def test_residual_outputs_scaled(default_model):
    for role in OUT_ROLES:
        for i, w in enumerate(roles(default_model)[role]):
            check_trunc_normal(w, SIGMA / math.sqrt(2 * L), 3.0, f"{role}[{i}]")


def test_residual_scale_depends_on_depth():
    model = build_1layer()
    w = torch.cat([b.ffn.down.weight.detach().flatten() for b in model.blocks] +
                  [b.attn.out.weight.detach().flatten() for b in model.blocks])
    check_trunc_normal(w, SIGMA / math.sqrt(2), 3.0, "out, L=1")


def test_tied_head_is_embedding(default_model):
    assert default_model.head is None
    assert default_model.lm_head_weight is default_model.embed.weight


def test_untied_head_uses_inverse_sqrt_d():
    model = build_1layer("tie_embeddings=false")
    assert model.head is not None and model.head.weight.shape == (V, D)
    assert not torch.equal(model.head.weight, model.embed.weight)
    check_trunc_normal(model.head.weight.detach(), 1.0 / math.sqrt(D), 3.0, "head")
    check_trunc_normal(model.embed.weight.detach(), SIGMA, 3.0, "embed (untied)")


def test_head_std_override():
    torch.manual_seed(0)
    model = zoo.build("tiny-dense-prenorm", ["d_model=128", "n_layers=1", "vocab_size=1024", "tie_embeddings=false",
                                            "init.head_std=0.01"])
    check_trunc_normal(model.head.weight.detach(), 0.01, 3.0, "head, init.head_std")


def test_init_std_override():
    std = 0.01
    model = build_1layer(f"init.std={std}")
    r = roles(model)
    for role in IN_ROLES:
        check_trunc_normal(torch.cat([w.flatten() for w in r[role]]), std, 3.0, role)
    for role in OUT_ROLES:
        check_trunc_normal(torch.cat([w.flatten() for w in r[role]]), std / math.sqrt(2), 3.0, role)


def test_scale_residual_false():
    model = build_1layer("init.scale_residual=false")
    r = roles(model)
    for role in OUT_ROLES:
        check_trunc_normal(torch.cat([w.flatten() for w in r[role]]), SIGMA, 3.0, role)
    check_trunc_normal(torch.cat([w.flatten() for w in r["q"]]), SIGMA, 3.0, "q")


@pytest.mark.parametrize("cutoff", [2.0, 1.5])
def test_cutoff_factor(cutoff):
    model = build_1layer(f"init.cutoff_factor={cutoff}")
    r = roles(model)
    assert trunc_factor(cutoff) < 0.9  # distinguishable from the 3-sigma factor 0.9866
    for role in ("embed", "q", "gate"):
        check_trunc_normal(torch.cat([w.flatten() for w in r[role]]), SIGMA, cutoff, role)
    check_trunc_normal(torch.cat([w.flatten() for w in r["down"]]), SIGMA / math.sqrt(2), cutoff, "down")


@pytest.mark.parametrize("variant", ["tiny-dense-prenorm", "tiny-dense-hybridnorm", "tiny-dense-hybridnorm-star",
                                     "tiny-dense-periln", "tiny-dense-olmo2", "tiny-dense-qknorm", "tiny-dense-mixln"])
def test_norm_gains_start_at_one(variant):
    torch.manual_seed(0)
    model = zoo.build(variant, ["d_model=64", "n_layers=2", "n_heads=4", "n_kv_heads=2", "ffn.hidden_size=128"])
    norm_params = [(n, p) for n, p in model.named_parameters() if "norm" in n]
    assert norm_params
    for name, p in norm_params:
        assert torch.equal(p, torch.ones_like(p)), name


def test_layernorm_bias_starts_at_zero():
    torch.manual_seed(0)
    model = zoo.build("tiny-dense-prenorm", ["d_model=64", "n_layers=2", "norm_layer=layernorm"])
    for name, p in model.named_parameters():
        if "norm" in name:
            expected = torch.zeros_like(p) if name.endswith(".bias") else torch.ones_like(p)
            assert torch.equal(p, expected), name


def test_init_is_seeded():
    small = ["d_model=64", "n_layers=2", "n_heads=4", "n_kv_heads=2", "ffn.hidden_size=128"]

    def make(seed):
        torch.manual_seed(seed)
        return zoo.build("tiny-dense-prenorm", small)

    a, b = make(3), make(3)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
    c = make(4)
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_hybridnorm_uses_same_init():
    """The init is the paper's for HybridNorm too (the strategy does not change it)."""
    model = build_1layer(variant="tiny-dense-hybridnorm")
    r = roles(model)
    check_trunc_normal(torch.cat([w.flatten() for w in r["v"]]), SIGMA, 3.0, "v")
    check_trunc_normal(torch.cat([w.flatten() for w in r["o"]]), SIGMA / math.sqrt(2), 3.0, "o")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("cutoff", [3.0, 1.5, 0.5, 0.2])
def test_trunc_normal_draws_torchs_numbers(dtype, cutoff):
    """zoo's trunc_normal_ (one buffer beside the tensor) gives torch's values and leaves the generator where
    torch's leaves it, whatever the dtype, shape and bounds (0.2: torch's other sampling, used as it is)."""
    from zoo.model.init import trunc_normal_
    for shape in [(7,), (300, 129), (64, 3, 5)]:
        for seed in range(3):
            std = 0.02
            torch.manual_seed(seed)
            want = torch.nn.init.trunc_normal_(torch.empty(shape, dtype=dtype), 0.0, std, -cutoff * std, cutoff * std)
            after_torch = torch.rand(4)
            torch.manual_seed(seed)
            got = trunc_normal_(torch.empty(shape, dtype=dtype), std, -cutoff * std, cutoff * std)
            assert torch.equal(got, want) and torch.equal(torch.rand(4), after_torch), (shape, seed)
            assert got.abs().max() <= cutoff * std
