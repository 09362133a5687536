"""The built-in ``mha`` attention against an independent reference (variants.md, section B).

MHA, GQA and MQA (n_kv_heads = n_heads, a divisor, 1), RoPE (rotate-half pairing, inverse
frequencies theta^(-2i/d_h)) at two thetas, sliding-window band masks and causality. The reference
uses plain torch ops on the module's weights: explicit softmax, GQA by ``repeat_interleave``.
"""
from __future__ import annotations

import math

import pytest
import torch

import zoo

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

D, H, SEQ, BATCH = 64, 4, 16, 2
HD = D // H
ATOL = 1e-5




def base(n_kv_heads=H, *extra):
    return [f"d_model={D}", "n_layers=2", f"n_heads={H}", f"n_kv_heads={n_kv_heads}", "ffn.hidden_size=128", *extra]


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def ref_rope(x, theta, pairing="half"):
    """x (B, T, heads, d_h). ``half``: pair i with i + d_h/2 (the zoo's); ``interleaved``: 2i with 2i+1."""
    T, d_h = x.shape[1], x.shape[-1]
    inv_freq = theta ** (-2.0 * torch.arange(d_h // 2, dtype=torch.float64) / d_h)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]
    if pairing == "half":
        a, b = x[..., : d_h // 2], x[..., d_h // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    return out


def ref_attention(x, wqkv, wo, n_heads, n_kv_heads, head_dim, theta, window=None, *, pairing="half", kv_order="interleave"):
    """x (B, T, d) float64. Causal (and band, if ``window``) attention with RoPE and GQA."""
    B, T, _ = x.shape
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    q = (x @ wqkv[:q_dim].T).view(B, T, n_heads, head_dim)
    k = (x @ wqkv[q_dim:q_dim + kv_dim].T).view(B, T, n_kv_heads, head_dim)
    v = (x @ wqkv[q_dim + kv_dim:].T).view(B, T, n_kv_heads, head_dim)
    q, k = ref_rope(q, theta, pairing), ref_rope(k, theta, pairing)
    g = n_heads // n_kv_heads
    if kv_order == "interleave":  # query head h -> KV head h // g
        k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    else:  # wrong on purpose: query head h -> KV head h % n_kv
        k, v = k.repeat(1, 1, g, 1), v.repeat(1, 1, g, 1)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(head_dim)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (j > i - window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    o = torch.einsum("bhij,bjhd->bihd", p, v).reshape(B, T, n_heads * head_dim)
    return o @ wo.T


def ref_rmsnorm(x, g, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g


def ref_prenorm_logits(model, idx, window=None):
    """Full Pre-Norm model (norm gains read from the state dict), tied head."""
    cfg = model.cfg
    P = {k: v.detach().double() for k, v in model.state_dict().items()}
    hd = cfg.head_size
    x = P["embed.weight"][idx]
    for l in range(cfg.n_layers):
        pre = f"blocks.{l}."
        a = ref_rmsnorm(x, P[pre + "strategy.attn_norm.weight"], cfg.norm_eps)
        x = x + ref_attention(a, P[pre + "attn.qkv.weight"], P[pre + "attn.out.weight"], cfg.n_heads, cfg.kv_heads, hd,
                              cfg.attention.rope_theta, window)
        f = ref_rmsnorm(x, P[pre + "strategy.ffn_norm.weight"], cfg.norm_eps)
        gu = P[pre + "ffn.gate_up.weight"]
        F = gu.shape[0] // 2
        gate, up = f @ gu[:F].T, f @ gu[F:].T
        x = x + (gate * torch.sigmoid(gate) * up) @ P[pre + "ffn.down.weight"].T
    x = ref_rmsnorm(x, P["final_norm.weight"], cfg.norm_eps)
    return x @ P["embed.weight"].T


# ---------------------------------------------------------------------------------------------
def build(overrides, variant="tiny-dense-prenorm", seed=0):
    torch.manual_seed(seed)
    model = zoo.build(variant, overrides).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


def module_io(model, layer=0, seed=3, seq=SEQ):
    attn = model.blocks[layer].attn
    x = torch.randn(BATCH, seq, model.cfg.d_model, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = attn(x)
    return attn, x, y


def ref_for(model, attn, x, **kw):
    cfg = model.cfg
    kw.setdefault("theta", cfg.attention.rope_theta)
    kw.setdefault("window", cfg.attention.sliding_window)
    return ref_attention(x.double(), attn.qkv.weight.detach().double(), attn.out.weight.detach().double(),
                         cfg.n_heads, cfg.kv_heads, cfg.head_size, **kw)


def tokens(seed=11, seq=SEQ):
    return torch.randint(0, 256, (BATCH, seq), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_module_matches_reference(n_kv_heads):
    model = build(base(n_kv_heads))
    attn, x, y = module_io(model)
    assert attn.qkv.weight.shape == ((H + 2 * n_kv_heads) * HD, D)
    assert attn.out.weight.shape == (D, H * HD)
    torch.testing.assert_close(y.double(), ref_for(model, attn, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_full_model_matches_reference(n_kv_heads):
    model = build(base(n_kv_heads))
    idx = tokens()
    with torch.no_grad():
        out = model(idx).logits
    torch.testing.assert_close(out.double(), ref_prenorm_logits(model, idx), atol=ATOL, rtol=0)


def test_gqa_kv_head_order_is_repeat_interleave():
    """Query head h uses KV head h // (H / n_kv); the tiled order h % n_kv must not match."""
    model = build(base(2))
    attn, x, y = module_io(model)
    assert max_diff(y, ref_for(model, attn, x, kv_order="tile")) > 1e-3


def test_head_dim_override():
    """head_dim need not be d_model / n_heads: here q has 4 x 24 = 96 channels for d_model 64."""
    model = build(base(2, "head_dim=24"))
    attn, x, y = module_io(model)
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 24, D) and attn.out.weight.shape == (D, 96)
    ref = ref_attention(x.double(), attn.qkv.weight.detach().double(), attn.out.weight.detach().double(),
                        H, 2, 24, 10000.0)
    torch.testing.assert_close(y.double(), ref, atol=ATOL, rtol=0)


# -- RoPE --------------------------------------------------------------------------------------
def test_rope_theta_500000():
    hi = build(base(2, "attention.rope_theta=500000"))
    lo = build(base(2))  # same seed: same weights, theta 10000
    assert hi.cfg.attention.rope_theta == 500000.0 and lo.cfg.attention.rope_theta == 10000.0
    attn_hi, x, y_hi = module_io(hi)
    attn_lo, _, y_lo = module_io(lo)
    assert torch.equal(attn_hi.qkv.weight, attn_lo.qkv.weight)
    torch.testing.assert_close(y_hi.double(), ref_for(hi, attn_hi, x, theta=500000.0), atol=ATOL, rtol=0)
    assert max_diff(y_hi, y_lo) > 1e-3  # theta changes the output
    assert max_diff(y_hi, ref_for(hi, attn_hi, x, theta=10000.0)) > 1e-3
    idx = tokens()
    with torch.no_grad():
        out = hi(idx).logits
    torch.testing.assert_close(out.double(), ref_prenorm_logits(hi, idx), atol=ATOL, rtol=0)


def test_rope_pairing_is_rotate_half():
    model = build(base(2))
    attn, x, y = module_io(model)
    assert max_diff(y, ref_for(model, attn, x, pairing="interleaved")) > 1e-3


def test_rope_gradient_is_the_reference_rotations_gradient():
    """RoPE's hand-written backward (the inverse rotation) gives autograd's gradient of the reference; the
    per-row tables of generation rotate, forward and backward, exactly as the shared ones do."""
    from zoo.nn import apply_rope, rope_tables, rope_tables_at

    gen = torch.Generator().manual_seed(3)
    B, T, heads, d_h, theta = 2, 9, 3, 16, 500.0
    x = torch.randn(B, T, heads, d_h, generator=gen, dtype=torch.float64)
    dy = torch.randn(B, T, heads, d_h, generator=gen, dtype=torch.float64)
    xs, xr, xp = (x.clone().requires_grad_() for _ in range(3))
    y = apply_rope(xs, *rope_tables(T, d_h, theta, x.device, torch.float64))
    y.backward(dy)
    want = ref_rope(xr, theta)
    want.backward(dy)
    torch.testing.assert_close(y, want, atol=1e-6, rtol=0)  # the zoo's tables are computed in fp32
    torch.testing.assert_close(xs.grad, xr.grad, atol=1e-6, rtol=0)
    assert (xs.grad - dy).abs().max() > 0.1  # the rotation is not the identity at these positions
    yp = apply_rope(xp, *rope_tables_at(torch.arange(T).expand(B, T), d_h, theta, torch.float64))
    yp.backward(dy)
    torch.testing.assert_close(yp, y, atol=0, rtol=0)
    torch.testing.assert_close(xp.grad, xs.grad, atol=0, rtol=0)


@pytest.mark.parametrize("T, S, budget", [(150, 150, 1 << 24), (70, 200, 1 << 24), (150, 150, 2000)],
                         ids=["blocks", "queries-behind-a-cache", "budget-below-a-block"])
def test_max_logit_causal_blocks_equal_a_full_mask(T, S, budget):
    """``max_logit(causal=True)`` multiplies each query block only with the keys it sees and masks only
    its diagonal; it must give the maximum under the full causal mask (aligned to the last key)."""
    from zoo.nn import max_logit

    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, T, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 3, S, 8, generator=gen, dtype=torch.float64)
    # the largest products (100) are ones the mask hides: query 0 with the last key, and query 10 with the
    # key one step ahead of it, which sits on a block's diagonal
    for t, j in ((0, S - 1), (10, S - T + 11)):
        q[:, :, t] = k[:, :, j] = 10 * torch.eye(8, dtype=torch.float64)[0]
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    scores = q @ k.transpose(-1, -2)
    want = scores.masked_fill(~allowed, float("-inf")).max().float() * 0.5  # max_logit reports fp32
    assert scores[..., 0, S - 1].min() * 0.5 > want and scores[..., 10, S - T + 11].min() * 0.5 > want
    assert float(max_logit(q, k, None, 0.5, budget, causal=True)) == float(want)
    assert float(max_logit(q, k, allowed, 0.5, budget)) == float(want)


def test_rope_is_relative():
    """RoPE scores depend only on i - j. With a window of 8, the last query of 8 tokens at positions
    0..7 and of the same 8 tokens at positions 4..11 (behind 4 others) sees the same keys at the
    same offsets, so its output must be the same (a reference-free check)."""
    model = build(base(4, "attention.sliding_window=8"))
    attn = model.blocks[0].attn
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 8, D, generator=gen)
    pad = torch.randn(1, 4, D, generator=gen)
    with torch.no_grad():
        a = attn(x)[:, -1]
        b = attn(torch.cat([pad, x], dim=1))[:, -1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# -- sliding window ----------------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 3, 5])
def test_sliding_window_matches_band_mask(window):
    model = build(base(2, f"attention.sliding_window={window}"))
    attn, x, y = module_io(model)
    assert window < SEQ
    torch.testing.assert_close(y.double(), ref_for(model, attn, x, window=window), atol=ATOL, rtol=0)
    assert max_diff(y, ref_for(model, attn, x, window=None)) > 1e-3  # differs from full causal
    if window > 1:  # the band is i - W < j <= i: W keys, not W + 1 and not W - 1
        assert max_diff(y, ref_for(model, attn, x, window=window + 1)) > 1e-4
        assert max_diff(y, ref_for(model, attn, x, window=window - 1)) > 1e-4
    # the first W positions see their whole prefix, so they equal full causal attention
    full = ref_for(model, attn, x, window=None)
    torch.testing.assert_close(y[:, :window].double(), full[:, :window], atol=ATOL, rtol=0)


def test_sliding_window_one_attends_to_self_only():
    model = build(base(2, "attention.sliding_window=1"))
    attn, x, y = module_io(model)
    v = x @ attn.qkv.weight[(H + 2) * HD:].T  # (B, T, 2 * HD): each token's own V
    own = v.view(BATCH, SEQ, 2, HD).repeat_interleave(2, dim=2).reshape(BATCH, SEQ, H * HD)
    torch.testing.assert_close(y, own @ attn.out.weight.T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [SEQ, 4 * SEQ])
def test_sliding_window_at_least_seq_is_causal(window):
    model = build(base(2, f"attention.sliding_window={window}"))
    plain = build(base(2))
    _, x, y = module_io(model)
    _, _, y_plain = module_io(plain)
    torch.testing.assert_close(y, y_plain, atol=1e-6, rtol=0)


def test_sliding_window_full_model():
    model = build(base(2, "attention.sliding_window=4"))
    idx = tokens()
    with torch.no_grad():
        out = model(idx).logits
    torch.testing.assert_close(out.double(), ref_prenorm_logits(model, idx, window=4), atol=ATOL, rtol=0)


# -- causality ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,extra", [("tiny-dense-prenorm", ()), ("tiny-dense-hybridnorm", ()),
                                           ("tiny-dense-olmo2", ()), ("tiny-dense-postnorm", ()),
                                           ("tiny-dense-prenorm", ("attention.sliding_window=4",))],
                         ids=["prenorm", "hybridnorm", "olmo2", "postnorm", "prenorm-window4"])
def test_future_tokens_do_not_change_earlier_logits(variant, extra):
    model = build(base(2, *extra), variant=variant)
    idx = tokens()
    t = 9
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 17) % 256
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert max_diff(a[:, t], b[:, t]) > 1e-4  # the changed position itself does change
    assert max_diff(a[:, t + 1:], b[:, t + 1:]) > 1e-5  # and so do later positions
    # a prefix run gives the same logits as the full run
    with torch.no_grad():
        prefix = model(idx[:, :t]).logits
    torch.testing.assert_close(prefix, a[:, :t], atol=1e-5, rtol=0)
