"""Every built-in norm strategy against an independent reference forward.

The reference below is written from shared/reference/variants.md (section A: the block equations,
section B: attention) with plain torch ops only. It never calls the zoo's modules or functions for
the math: it reads the model's ``state_dict()`` by parameter name and recomputes the logits in
float64. Every norm gain/bias is perturbed to random non-unit values first, so a norm that is
missing, extra or misplaced changes the logits. The reference also records which parameters it
read, and each test checks that it read all of them (a norm the model has but the equations do not
would otherwise go unnoticed).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import zoo

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

ATOL = 1e-5
BATCH, SEQ = 2, 16
# d_model 64, 4 heads of 16, GQA with 2 KV heads, 3 layers.
BASE = ["d_model=64", "n_layers=3", "n_heads=4", "n_kv_heads=2", "ffn.hidden_size=128"]




# ---------------------------------------------------------------------------------------------
# Independent reference (float64, plain torch ops)
# ---------------------------------------------------------------------------------------------
class Params(dict):
    """The state dict in float64, remembering which names the reference read."""

    def __init__(self, sd):
        super().__init__({k: v.detach().to(torch.float64) for k, v in sd.items()})
        self.used: set[str] = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)


def ref_rmsnorm(x, g, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g


def ref_layernorm(x, g, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * g
    return y if b is None else y + b


def ref_dyt(x, a, g, b):
    return g * torch.tanh(a * x) + b


def ref_rope(x, theta):
    """Rotate-half RoPE on (B, T, H, d_h): pair i with i + d_h/2, angle pos * theta^(-2i/d_h)."""
    T, d_h = x.shape[1], x.shape[-1]
    half = d_h // 2
    i = torch.arange(half, dtype=torch.float64)
    inv_freq = theta ** (-2.0 * i / d_h)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, half)
    cos, sin = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def ref_silu(x):
    return x * (1.0 / (1.0 + torch.exp(-x)))


class Reference:
    """Reference forward of one model config; ``norm(x, name)`` applies the norm stored at ``name``."""

    def __init__(self, cfg, P: Params):
        self.cfg, self.P = cfg, P
        self.H, self.Hkv = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
        self.hd = cfg.head_dim or cfg.d_model // cfg.n_heads

    def norm(self, x, name):
        P, kind, eps = self.P, self.cfg.norm_layer, self.cfg.norm_eps
        if kind == "rmsnorm":
            return ref_rmsnorm(x, P[name + ".weight"], eps)
        if kind == "layernorm":
            b = P[name + ".bias"] if (name + ".bias") in P else None
            return ref_layernorm(x, P[name + ".weight"], b, eps)
        if kind == "dyt":
            return ref_dyt(x, P[name + ".alpha"], P[name + ".weight"], P[name + ".bias"])
        raise AssertionError(kind)

    def attn(self, x, layer, qkv_norm=(), width="head"):
        P, H, Hkv, hd = self.P, self.H, self.Hkv, self.hd
        pre = f"blocks.{layer}.attn."
        B, T, _ = x.shape
        W = P[pre + "qkv.weight"]
        wq, wk, wv = W[: H * hd], W[H * hd: (H + Hkv) * hd], W[(H + Hkv) * hd:]
        assert wv.shape[0] == Hkv * hd
        q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
        if width == "full":  # OLMo-2: one norm over all heads, before the head split
            q = self.norm(q, pre + "q_norm") if "q" in qkv_norm else q
            k = self.norm(k, pre + "k_norm") if "k" in qkv_norm else k
            v = self.norm(v, pre + "v_norm") if "v" in qkv_norm else v
        q, k, v = q.view(B, T, H, hd), k.view(B, T, Hkv, hd), v.view(B, T, Hkv, hd)
        if width == "head":  # per head over d_h, one gain shared by the heads
            q = self.norm(q, pre + "q_norm") if "q" in qkv_norm else q
            k = self.norm(k, pre + "k_norm") if "k" in qkv_norm else k
            v = self.norm(v, pre + "v_norm") if "v" in qkv_norm else v
        theta = float(self.cfg.attention.rope_theta)
        q, k = ref_rope(q, theta), ref_rope(k, theta)
        g = H // Hkv  # query head h uses KV head h // g
        k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
        i = torch.arange(T)
        allowed = i[None, :] <= i[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        p = torch.exp(scores - scores.amax(-1, keepdim=True))
        p = p / p.sum(-1, keepdim=True)
        o = torch.einsum("bhij,bjhd->bihd", p, v).reshape(B, T, H * hd)
        return o @ P[pre + "out.weight"].T

    def ffn(self, x, layer):
        P = self.P
        pre = f"blocks.{layer}.ffn."
        gu = P[pre + "gate_up.weight"]
        F = gu.shape[0] // 2
        gate, up = x @ gu[:F].T, x @ gu[F:].T
        return (ref_silu(gate) * up) @ P[pre + "down.weight"].T

    def forward(self, idx, block, *, final_norm, embed_norm=False):
        P = self.P
        x = P["embed.weight"][idx]
        if embed_norm:
            x = self.norm(x, "embed_norm")
        for layer in range(self.cfg.n_layers):
            x = block(self, x, layer)
        if final_norm:
            x = self.norm(x, "final_norm")
        head = P["head.weight"] if "head.weight" in P else P["embed.weight"]
        return x @ head.T


# -- block equations (variants.md section A) --------------------------------------------------
def s(layer, name):
    return f"blocks.{layer}.strategy.{name}"


def blk_prenorm(R, x, l, qkv_norm=(), width="head"):  # A2
    h = x + R.attn(R.norm(x, s(l, "attn_norm")), l, qkv_norm, width)
    return h + R.ffn(R.norm(h, s(l, "ffn_norm")), l)


def blk_postnorm(R, x, l):  # A1
    h = R.norm(x + R.attn(x, l), s(l, "attn_norm"))
    return R.norm(h + R.ffn(h, l), s(l, "ffn_norm"))


def blk_hybridnorm(R, x, l):  # A8
    h = x + R.attn(x, l, ("q", "k", "v"), "head")
    z = R.norm(h, s(l, "ffn_norm"))
    return z + R.ffn(z, l)


def blk_hybridnorm_star(R, x, l):  # A8, HybridNorm*: block 0 Pre-Norm in both sublayers, QKV-Norm kept
    if l == 0:
        return blk_prenorm(R, x, l, ("q", "k", "v"), "head")
    return blk_hybridnorm(R, x, l)


def blk_mixln(alpha):  # A9
    def blk(R, x, l):
        if l < math.floor(alpha * R.cfg.n_layers):
            return blk_postnorm(R, x, l)
        return blk_prenorm(R, x, l)
    return blk


def blk_periln(R, x, l):  # A3 / A4
    h = x + R.norm(R.attn(R.norm(x, s(l, "attn_in_norm")), l), s(l, "attn_out_norm"))
    return h + R.norm(R.ffn(R.norm(h, s(l, "ffn_in_norm")), l), s(l, "ffn_out_norm"))


def blk_qknorm(width):  # A7 on Pre-LN
    def blk(R, x, l):
        return blk_prenorm(R, x, l, ("q", "k"), width)
    return blk


def blk_olmo2(R, x, l):  # A5: output norms only, full-width QK-norm
    h = x + R.norm(R.attn(x, l, ("q", "k"), "full"), s(l, "attn_out_norm"))
    return h + R.norm(R.ffn(h, l), s(l, "ffn_out_norm"))


def blk_deepnorm(alpha=None):  # A6
    def blk(R, x, l):
        a = alpha if alpha is not None else (2 * R.cfg.n_layers) ** 0.25
        h = R.norm(a * x + R.attn(x, l), s(l, "attn_norm"))
        return R.norm(a * h + R.ffn(h, l), s(l, "ffn_norm"))
    return blk


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def perturb_norms(model: nn.Module, seed: int = 1) -> list[str]:
    """Set every norm parameter (anything not owned by a Linear or Embedding) to random non-unit values."""
    gen = torch.Generator().manual_seed(seed)
    touched = []
    for mname, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if pname == "weight":
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)  # U(0.5, 1.5)
            elif pname == "bias":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif pname == "alpha":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.8 + 0.4)
            else:
                raise AssertionError(f"unexpected norm parameter {mname}.{pname}")
            touched.append(f"{mname}.{pname}")
    assert touched and all("norm" in t for t in touched), touched
    return touched


def build(variant: str, overrides, seed: int = 0):
    torch.manual_seed(seed)
    model = zoo.build(variant, overrides).float().eval()
    perturb_norms(model, seed + 1)
    return model


def batch(vocab: int = 256, seed: int = 123):
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def reference_logits(model, idx, block, *, final_norm, embed_norm=False, check_all_used=True):
    P = Params(model.state_dict())
    ref = Reference(model.cfg, P).forward(idx, block, final_norm=final_norm, embed_norm=embed_norm)
    if check_all_used:
        unused = set(P) - P.used
        assert not unused, f"model has parameters the reference equations never use: {sorted(unused)}"
    return ref


def assert_matches(model, idx, ref):
    with torch.no_grad():
        out = model(idx).logits
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=0)


def assert_differs(model, idx, ref, margin=1e-3):
    with torch.no_grad():
        out = model(idx).logits
    diff = (out.double() - ref).abs().max().item()
    assert diff > margin, f"wrong reference matched the model (max diff {diff:.2e}): the comparison is not sensitive"


# (id, variant, overrides, reference block, final norm, embed norm)
CASES = [
    ("prenorm", "tiny-dense-prenorm", BASE, blk_prenorm, True, False),
    ("prenorm-mha", "tiny-dense-prenorm", BASE + ["n_kv_heads=4"], blk_prenorm, True, False),
    ("postnorm", "tiny-dense-postnorm", BASE, blk_postnorm, False, False),
    ("hybridnorm", "tiny-dense-hybridnorm", BASE, blk_hybridnorm, True, False),
    ("hybridnorm-star", "tiny-dense-hybridnorm-star", BASE, blk_hybridnorm_star, True, False),
    ("mixln-default", "tiny-dense-mixln", BASE + ["n_layers=4"], blk_mixln(0.25), True, False),
    ("mixln-0.5", "tiny-dense-mixln", BASE + ["n_layers=4", "norm_options.alpha=0.5"], blk_mixln(0.5), True, False),
    ("periln", "tiny-dense-periln", BASE, blk_periln, True, False),
    ("sandwich", "tiny-dense-periln", BASE + ["norm_strategy=sandwich"], blk_periln, True, False),
    ("periln-embed-norm", "tiny-dense-periln", BASE + ["embed_norm=true"], blk_periln, True, True),
    ("qknorm-head", "tiny-dense-qknorm", BASE + ["norm_options.width=head"], blk_qknorm("head"), True, False),
    ("qknorm-full", "tiny-dense-qknorm", BASE + ["norm_options.width=full"], blk_qknorm("full"), True, False),
    ("olmo2", "tiny-dense-olmo2", BASE, blk_olmo2, True, False),
    ("deepnorm", "tiny-dense-deepnorm", BASE, blk_deepnorm(), False, False),
    ("deepnorm-mha", "tiny-dense-deepnorm", BASE + ["n_kv_heads=4", "n_layers=2"], blk_deepnorm(), False, False),
    ("hybridnorm-untied", "tiny-dense-hybridnorm", BASE + ["tie_embeddings=false"], blk_hybridnorm, True, False),
    ("postnorm-untied", "tiny-dense-postnorm", BASE + ["tie_embeddings=false"], blk_postnorm, False, False),
]


@pytest.mark.parametrize("variant,overrides,block,final_norm,embed_norm",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_strategy_matches_reference(variant, overrides, block, final_norm, embed_norm):
    model = build(variant, overrides)
    assert (model.final_norm is not None) == final_norm
    assert ("final_norm.weight" in model.state_dict()) == final_norm
    assert (model.embed_norm is not None) == embed_norm
    tied = "tie_embeddings=false" not in overrides
    assert (model.head is None) == tied  # tied: logits = x @ embed.weight^T; untied: x @ head.weight^T
    idx = batch()
    assert_matches(model, idx, reference_logits(model, idx, block, final_norm=final_norm, embed_norm=embed_norm))


# -- the comparison can fail: wrong equations must not match ----------------------------------
def mut_prenorm_on_hybridnorm(R, x, l):
    """Pre-Norm's FFN residual (x' = h + F(N(h))) on HybridNorm's weights."""
    h = x + R.attn(x, l, ("q", "k", "v"), "head")
    return h + R.ffn(R.norm(h, s(l, "ffn_norm")), l)


def mut_hybridnorm_no_v_norm(R, x, l):
    h = x + R.attn(x, l, ("q", "k"), "head")
    z = R.norm(h, s(l, "ffn_norm"))
    return z + R.ffn(z, l)


def mut_periln_no_out_norms(R, x, l):
    h = x + R.attn(R.norm(x, s(l, "attn_in_norm")), l)
    return h + R.ffn(R.norm(h, s(l, "ffn_in_norm")), l)


def mut_olmo2_input_norms(R, x, l):
    h = x + R.attn(R.norm(x, s(l, "attn_out_norm")), l, ("q", "k"), "full")
    return h + R.ffn(R.norm(h, s(l, "ffn_out_norm")), l)


NEGATIVE = [
    ("hybridnorm-vs-prenorm-ffn-residual", "tiny-dense-hybridnorm", BASE, mut_prenorm_on_hybridnorm, True),
    ("hybridnorm-vs-no-v-norm", "tiny-dense-hybridnorm", BASE, mut_hybridnorm_no_v_norm, True),
    ("hybridnorm-star-vs-hybridnorm", "tiny-dense-hybridnorm-star", BASE, blk_hybridnorm, True),
    ("prenorm-vs-no-final-norm", "tiny-dense-prenorm", BASE, blk_prenorm, False),
    ("prenorm-vs-qknorm", "tiny-dense-qknorm", BASE, blk_prenorm, True),
    ("mixln-vs-all-pre", "tiny-dense-mixln", BASE + ["n_layers=4"], blk_mixln(0.0), True),
    ("mixln-0.5-vs-0.25", "tiny-dense-mixln", BASE + ["n_layers=4", "norm_options.alpha=0.5"], blk_mixln(0.25), True),
    ("periln-vs-prenorm", "tiny-dense-periln", BASE, mut_periln_no_out_norms, True),
    ("olmo2-vs-input-norms", "tiny-dense-olmo2", BASE, mut_olmo2_input_norms, True),
    ("qknorm-full-vs-no-qk", "tiny-dense-qknorm", BASE + ["norm_options.width=full"], blk_prenorm, True),
    ("deepnorm-vs-alpha-1", "tiny-dense-deepnorm", BASE, blk_deepnorm(1.0), False),
    ("postnorm-vs-deepnorm", "tiny-dense-postnorm", BASE, blk_deepnorm(), False),
]


@pytest.mark.parametrize("variant,overrides,block,final_norm", [c[1:] for c in NEGATIVE], ids=[c[0] for c in NEGATIVE])
def test_wrong_reference_does_not_match(variant, overrides, block, final_norm):
    model = build(variant, overrides)
    idx = batch()
    assert_differs(model, idx, reference_logits(model, idx, block, final_norm=final_norm, check_all_used=False))


def test_prenorm_reference_does_not_match_hybridnorm_model():
    """Same seed, same shapes: the Pre-Norm reference on the Pre-Norm model matches, and the same
    reference does not match the HybridNorm model built from the same weights."""
    pre = build("tiny-dense-prenorm", BASE)
    hyb = build("tiny-dense-hybridnorm", BASE)
    sd = pre.state_dict()
    with torch.no_grad():  # give HybridNorm exactly the Pre-Norm model's shared weights
        for name, p in hyb.named_parameters():
            if name in sd:
                p.copy_(sd[name])
            else:  # q/k/v norms: identity gains, so only the placement differs
                p.fill_(1.0)
    idx = batch()
    ref = reference_logits(pre, idx, blk_prenorm, final_norm=True)
    assert_matches(pre, idx, ref)
    assert_differs(hyb, idx, ref)


# -- details of individual strategies -------------------------------------------------------
def test_mixln_post_layers():
    for alpha, n_layers, expected in [(0.25, 4, 1), (0.5, 4, 2), (0.25, 3, 0), (1.0, 3, 3)]:
        model = zoo.build("tiny-dense-mixln", BASE + [f"n_layers={n_layers}", f"norm_options.alpha={alpha}"], device="meta")
        posts = [b.strategy.post for b in model.blocks]
        assert posts == [l < expected for l in range(n_layers)], (alpha, n_layers, posts)


def test_sandwich_is_periln():
    a = build("tiny-dense-periln", BASE)
    b = build("tiny-dense-periln", BASE + ["norm_strategy=sandwich"])
    assert type(a.blocks[0].strategy) is type(b.blocks[0].strategy)
    assert a.state_dict().keys() == b.state_dict().keys()
    idx = batch()
    with torch.no_grad():
        torch.testing.assert_close(a(idx).logits, b(idx).logits, atol=0, rtol=0)


@pytest.mark.parametrize("width,q_size,k_size", [("head", 16, 16), ("full", 64, 32)])
def test_qknorm_gain_shapes(width, q_size, k_size):
    model = zoo.build("tiny-dense-qknorm", BASE + [f"norm_options.width={width}"], device="meta")
    sd = model.state_dict()
    for l in range(3):
        assert sd[f"blocks.{l}.attn.q_norm.weight"].shape == (q_size,)
        assert sd[f"blocks.{l}.attn.k_norm.weight"].shape == (k_size,)
        assert f"blocks.{l}.attn.v_norm.weight" not in sd


def test_deepnorm_alpha_wiring():
    for n_layers in (2, 3, 6):
        model = zoo.build("tiny-dense-deepnorm", BASE + [f"n_layers={n_layers}"], device="meta")
        for b in model.blocks:
            assert b.strategy.alpha == pytest.approx((2 * n_layers) ** 0.25, rel=1e-12)
            assert b.strategy.beta == pytest.approx((8 * n_layers) ** -0.25, rel=1e-12)
    # worked values from variants.md A6
    assert (2 * 12) ** 0.25 == pytest.approx(2.213, abs=1e-3) and (8 * 12) ** -0.25 == pytest.approx(0.319, abs=1e-3)
    # an explicit alpha is used in the forward
    model = build("tiny-dense-deepnorm", BASE + ["norm_options.alpha=1.7"])
    idx = batch()
    assert_matches(model, idx, reference_logits(model, idx, blk_deepnorm(1.7), final_norm=False))


def test_deepnorm_alpha_one_is_postnorm():
    """DeepNorm with alpha = 1 is Post-LN: the Post-LN reference must match it."""
    model = build("tiny-dense-deepnorm", BASE + ["norm_options.alpha=1.0"])
    idx = batch()
    assert_matches(model, idx, reference_logits(model, idx, blk_postnorm, final_norm=False))


# -- DeepNorm init: Xavier normal, gain beta on V, O, FFN; gain 1 on Q, K --------------------
DEEP_D, DEEP_L, DEEP_H, DEEP_KV, DEEP_F = 256, 4, 4, 2, 512


@pytest.fixture(scope="module")
def deepnorm_init_model():
    torch.manual_seed(0)
    return zoo.build("tiny-dense-deepnorm", [f"d_model={DEEP_D}", f"n_layers={DEEP_L}", f"n_heads={DEEP_H}",
                                             f"n_kv_heads={DEEP_KV}", f"ffn.hidden_size={DEEP_F}"])


def xavier_std(fan_in, fan_out, gain):
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def deepnorm_weights(model):
    """(role, per-layer weight matrix with its own (fan_out, fan_in)) for every projection."""
    hd = DEEP_D // DEEP_H
    q_dim, kv_dim = DEEP_H * hd, DEEP_KV * hd
    out = []
    for b in model.blocks:
        w = b.attn.qkv.weight.detach()
        out += [("q", w[:q_dim]), ("k", w[q_dim:q_dim + kv_dim]), ("v", w[q_dim + kv_dim:]),
                ("o", b.attn.out.weight.detach()), ("ffn_out", b.ffn.down.weight.detach())]
    return out


def test_deepnorm_init_xavier_qkvo_down(deepnorm_init_model):
    beta = (8 * DEEP_L) ** -0.25
    for role, w in deepnorm_weights(deepnorm_init_model):
        fan_out, fan_in = w.shape
        expected = xavier_std(fan_in, fan_out, 1.0 if role in ("q", "k") else beta)
        assert w.mean().abs().item() < 0.05 * expected
        assert w.std().item() == pytest.approx(expected, rel=0.03), role


def test_deepnorm_init_ffn_in_xavier_per_projection(deepnorm_init_model):
    """gate and up are two d -> F projections (SwiGLU: silu(x W) * (x V)) that the zoo stores fused;
    Xavier with gain beta applies to each, fan_in = d and fan_out = F (just as the fused qkv is
    initialised projection by projection)."""
    beta = (8 * DEEP_L) ** -0.25
    for b in deepnorm_init_model.blocks:
        w = b.ffn.gate_up.weight.detach()
        for part in (w[:DEEP_F], w[DEEP_F:]):
            assert part.std().item() == pytest.approx(xavier_std(DEEP_D, DEEP_F, beta), rel=0.03)


def test_deepnorm_init_q_k_differ_from_v():
    """Sanity: beta really scales V (not Q/K): with MHA-equal fans the ratio is beta."""
    torch.manual_seed(0)
    model = zoo.build("tiny-dense-deepnorm", [f"d_model={DEEP_D}", f"n_layers={DEEP_L}", f"n_heads={DEEP_H}",
                                              f"ffn.hidden_size={DEEP_F}"])
    w = model.blocks[0].attn.qkv.weight.detach()
    q, v = w[:DEEP_D], w[2 * DEEP_D:]
    assert (v.std() / q.std()).item() == pytest.approx((8 * DEEP_L) ** -0.25, rel=0.03)


# ---------------------------------------------------------------------------------------------
# Norm layers
# ---------------------------------------------------------------------------------------------
def test_rmsnorm_layer_fp32_math_and_eps():
    model = build("tiny-dense-prenorm", BASE + ["norm_eps=1e-3"])
    norm = model.final_norm
    g = norm.weight.detach().double()
    gen = torch.Generator().manual_seed(5)
    # small inputs, so mean(x^2) ~ eps and eps matters
    x = torch.randn(3, 7, 64, generator=gen) * 0.03
    ref = ref_rmsnorm(x.double(), g, 1e-3)
    torch.testing.assert_close(norm(x).double(), ref, atol=1e-6, rtol=1e-6)
    assert (ref - ref_rmsnorm(x.double(), g, 1e-5)).abs().max() > 1e-2  # eps is observable here
    # low precision in, same dtype out, statistics in fp32: fp16 x^2 would overflow at |x| = 300
    xh = (torch.randn(3, 7, 64, generator=gen) * 300).half()
    yh = norm(xh)
    assert yh.dtype == torch.float16 and torch.isfinite(yh).all()
    torch.testing.assert_close(yh.double(), ref_rmsnorm(xh.double(), g, 1e-3), atol=2e-3, rtol=2e-3)
    xb = (torch.randn(3, 7, 64, generator=gen) * 4).bfloat16()
    yb = norm(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), ref_rmsnorm(xb.double(), g, 1e-3), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("shape", [(3, 7, 64), (2, 5, 4, 16)], ids=["full-width", "per-head"])
def test_rmsnorm_layer_gradients_match_the_reference(shape):
    """The hand-written backward gives autograd's gradients of the reference formula, for the input and
    for the gain (summed over every leading dimension, heads included); in bf16 the same, to its rounding."""
    from zoo.plugins.norm_layers import RMSNorm

    gen = torch.Generator().manual_seed(11)
    norm = RMSNorm(shape[-1], eps=1e-3).double()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(shape[-1], generator=gen))
    x = (0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    norm(x).backward(dy)
    xr, gr = x.detach().clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    ref_rmsnorm(xr, gr, 1e-3).backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(norm.weight.grad, gr.grad, atol=1e-12, rtol=1e-10)

    bf = RMSNorm(shape[-1], eps=1e-3).bfloat16()
    bf.load_state_dict(norm.state_dict())
    xb = x.detach().bfloat16().requires_grad_()
    bf(xb).backward(dy.bfloat16())
    assert xb.grad.dtype == bf.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xb.grad.double(), xr.grad, atol=0.05 * xr.grad.abs().max().item(), rtol=2e-2)
    torch.testing.assert_close(bf.weight.grad.double(), gr.grad, atol=0.02 * gr.grad.abs().max().item(), rtol=2e-2)


def test_rmsnorm_layer_refuses_a_wrong_width():
    from zoo.plugins.norm_layers import RMSNorm

    with pytest.raises(ValueError, match=r"RMSNorm over 64 features got an input of shape \(2, 32\)"):
        RMSNorm(64)(torch.ones(2, 32))


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_layer(bias):
    overrides = BASE + ["norm_layer=layernorm", "norm_eps=1e-4"] + ([] if bias else ["norm_layer_options.bias=false"])
    model = build("tiny-dense-postnorm", overrides)
    norm = model.blocks[0].strategy.attn_norm
    sd = model.state_dict()
    assert ("blocks.0.strategy.attn_norm.bias" in sd) == bias
    assert (norm.bias is not None) == bias
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2)) * 2 + 0.7
    b = norm.bias.detach().double() if bias else None
    torch.testing.assert_close(norm(x).double(), ref_layernorm(x.double(), norm.weight.detach().double(), b, 1e-4),
                               atol=1e-5, rtol=1e-5)
    # full model (Post-LN with LayerNorm everywhere, no final norm)
    idx = batch()
    assert_matches(model, idx, reference_logits(model, idx, blk_postnorm, final_norm=False))


@pytest.mark.parametrize("variant,block", [("tiny-dense-prenorm", blk_prenorm), ("tiny-dense-hybridnorm", blk_hybridnorm),
                                           ("tiny-dense-periln", blk_periln)], ids=["prenorm", "hybridnorm", "periln"])
def test_layernorm_in_strategies(variant, block):
    model = build(variant, BASE + ["norm_layer=layernorm"])
    assert "final_norm.bias" in model.state_dict()
    idx = batch()
    assert_matches(model, idx, reference_logits(model, idx, block, final_norm=True))


def test_dyt_layer_and_alpha_init():
    torch.manual_seed(0)
    fresh = zoo.build("tiny-dense-prenorm", BASE + ["norm_layer=dyt", "norm_layer_options.alpha_init=0.8"])
    for name, p in fresh.named_parameters():
        if name.endswith("norm.alpha"):
            assert p.shape == (1,) and p.item() == pytest.approx(0.8)
        elif "norm" in name and name.endswith(".weight"):
            assert torch.equal(p, torch.ones_like(p))
        elif "norm" in name and name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p))
    default = zoo.build("tiny-dense-prenorm", BASE + ["norm_layer=dyt"], device="meta")
    assert default.final_norm.alpha_init == 0.5
    model = build("tiny-dense-prenorm", BASE + ["norm_layer=dyt", "norm_layer_options.alpha_init=0.8"])
    norm = model.final_norm
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3)) * 3
    ref = ref_dyt(x.double(), norm.alpha.detach().double(), norm.weight.detach().double(), norm.bias.detach().double())
    torch.testing.assert_close(norm(x).double(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant,block,final_norm", [("tiny-dense-prenorm", blk_prenorm, True),
                                                      ("tiny-dense-hybridnorm", blk_hybridnorm, True),
                                                      ("tiny-dense-deepnorm", blk_deepnorm(), False)],
                         ids=["prenorm", "hybridnorm", "deepnorm"])
def test_dyt_as_norm_layer(variant, block, final_norm):
    model = build(variant, BASE + ["norm_layer=dyt", "norm_layer_options.alpha_init=0.8"])
    idx = batch()
    assert_matches(model, idx, reference_logits(model, idx, block, final_norm=final_norm))
