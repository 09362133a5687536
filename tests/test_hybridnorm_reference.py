"""HybridNorm and HybridNorm* against shared/reference/hybridnorm.md, sections 1.1 and 1.3, line by line.

The reference below is transcribed from those sections (and the conventions confirmed in section 7)
with plain torch ops, reading the model's weights by parameter name. Notation as in section 1.1:
X^l is the residual input to block l, h query heads, h_kv KV heads, d_k = d / h.

  Norm = RMSNorm: y = g * x / sqrt(mean(x^2) + eps), eps = 1e-5, fp32, gain only.

  MHA_QKV(X):
    Q = X W_Q, K = X W_K, V = X W_V                  (fused projection; no norm on X)
    Q_i <- RMSNorm_q(Q_i); K_j <- RMSNorm_k(K_j); V_j <- RMSNorm_v(V_j)   (per head, over d_k,
                                                        one gain of length d_k shared by the heads)
    Q_i, K_j <- RoPE(Q_i), RoPE(K_j)                 (after the norm; rotate-half pairing)
    O_i = softmax(Q_i K_{g(i)}^T / sqrt(d_k) + causal) V_{g(i)}
    MHA_QKV(X) = Concat_i(O_i) W_O                   (output not normalised)

  HybridNorm block:   Y = X + MHA_QKV(X);  Z = RMSNorm_ffn(Y);  X' = Z + FFN(Z)
  HybridNorm* block 0: Y = X + MHA_QKV(RMSNorm_attn(X));  X' = Y + FFN(RMSNorm_ffn(Y))
  Head: logits = RMSNorm_f(X^L) W_emb^T (tied).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import zoo

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

N_LAYERS, N_HEADS, N_KV_HEADS, D_MODEL, D_FF = 3, 4, 2, 64, 128
D_K = D_MODEL // N_HEADS
EPS = 1e-5
THETA = 10000.0
OVERRIDES = [f"n_layers={N_LAYERS}", f"n_heads={N_HEADS}", f"n_kv_heads={N_KV_HEADS}", f"d_model={D_MODEL}",
             f"ffn.hidden_size={D_FF}"]
ATOL = 1e-5




# ---------------------------------------------------------------------------------------------
# Reference, transcribed from sections 1.1 and 1.3
# ---------------------------------------------------------------------------------------------
def RMSNorm(x, g):
    x32 = x.to(torch.float64)  # "computed in fp32" (we go further, float64, for a reference)
    return g * (x32 / torch.sqrt((x32 ** 2).mean(dim=-1, keepdim=True) + EPS))


def RoPE(x, theta=THETA):
    """x: (n, d_k) for one head. Dimension i pairs with i + d_k/2; frequency theta^(-2i/d_k)."""
    n, d_k = x.shape
    i = torch.arange(d_k // 2, dtype=torch.float64)
    angle = torch.arange(n, dtype=torch.float64)[:, None] * theta ** (-2.0 * i / d_k)[None, :]
    c, s = torch.cos(angle), torch.sin(angle)
    a, b = x[:, : d_k // 2], x[:, d_k // 2:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def softmax_causal(scores):
    n = scores.shape[0]
    causal = torch.triu(torch.full((n, n), float("-inf"), dtype=scores.dtype), diagonal=1)
    s = scores + causal
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def MHA_QKV(X, W, layer, *, norm_v=True, norm_after_rope=False):
    """One sequence X (n, d). ``norm_v`` and ``norm_after_rope`` exist only to build wrong variants."""
    p = f"blocks.{layer}.attn."
    h, h_kv, d_k = N_HEADS, N_KV_HEADS, D_K
    W_qkv = W[p + "qkv.weight"]
    W_Q, W_K, W_V = W_qkv[: h * d_k].T, W_qkv[h * d_k: (h + h_kv) * d_k].T, W_qkv[(h + h_kv) * d_k:].T
    Q, K, V = X @ W_Q, X @ W_K, X @ W_V  # no norm on X
    g_q, g_k, g_v = W[p + "q_norm.weight"], W[p + "k_norm.weight"], W[p + "v_norm.weight"]
    assert g_q.shape == g_k.shape == g_v.shape == (d_k,)
    Q_heads = [Q[:, i * d_k:(i + 1) * d_k] for i in range(h)]
    # K_j and V_j are normalised per KV head, i.e. before any GQA sharing. (With one gain shared by
    # all heads a per-head norm commutes with repeating heads, so this order is not observable.)
    K_heads = [K[:, j * d_k:(j + 1) * d_k] for j in range(h_kv)]
    V_heads = [V[:, j * d_k:(j + 1) * d_k] for j in range(h_kv)]
    if not norm_after_rope:
        Q_heads = [RMSNorm(q, g_q) for q in Q_heads]
        K_heads = [RMSNorm(k, g_k) for k in K_heads]
    if norm_v:
        V_heads = [RMSNorm(v, g_v) for v in V_heads]
    Q_heads = [RoPE(q) for q in Q_heads]
    K_heads = [RoPE(k) for k in K_heads]
    if norm_after_rope:
        Q_heads = [RMSNorm(q, g_q) for q in Q_heads]
        K_heads = [RMSNorm(k, g_k) for k in K_heads]
    group = h // h_kv
    O = []
    for i in range(h):
        j = i // group  # g(i): query head i reads KV head floor(i / (h / h_kv))
        O.append(softmax_causal(Q_heads[i] @ K_heads[j].T / math.sqrt(d_k)) @ V_heads[j])
    return torch.cat(O, dim=-1) @ W[p + "out.weight"].T  # output not normalised


def FFN(X, W, layer):
    """SwiGLU: the fused weight is [gate; up]; down(silu(gate) * up)."""
    p = f"blocks.{layer}.ffn."
    W1 = W[p + "gate_up.weight"]
    gate, up = X @ W1[:D_FF].T, X @ W1[D_FF:].T
    return (gate * torch.sigmoid(gate) * up) @ W[p + "down.weight"].T


def hybridnorm_block(X, W, l, **kw):
    Y = X + MHA_QKV(X, W, l, **kw)
    Z = RMSNorm(Y, W[f"blocks.{l}.strategy.ffn_norm.weight"])
    return Z + FFN(Z, W, l)  # the residual is taken AFTER the norm


def hybridnorm_star_block0(X, W, **kw):
    Y = X + MHA_QKV(RMSNorm(X, W["blocks.0.strategy.attn_norm.weight"]), W, 0, **kw)
    return Y + FFN(RMSNorm(Y, W["blocks.0.strategy.ffn_norm.weight"]), W, 0)


def prenorm_ffn_residual_block(X, W, l):
    """Wrong on purpose: HybridNorm with a Pre-Norm FFN residual (X' = Y + FFN(Norm(Y)))."""
    Y = X + MHA_QKV(X, W, l)
    return Y + FFN(RMSNorm(Y, W[f"blocks.{l}.strategy.ffn_norm.weight"]), W, l)


def reference(W, tokens, star: bool, *, variant=None, final_norm=True):
    logits = []
    for seq in tokens:  # one sequence at a time, as the equations are written
        X = W["embed.weight"][seq]
        for l in range(N_LAYERS):
            if star and l == 0:
                X = hybridnorm_star_block0(X, W)
            elif variant == "no_v_norm":
                X = hybridnorm_block(X, W, l, norm_v=False)
            elif variant == "norm_after_rope":
                X = hybridnorm_block(X, W, l, norm_after_rope=True)
            elif variant == "prenorm_ffn_residual":
                X = prenorm_ffn_residual_block(X, W, l)
            else:
                X = hybridnorm_block(X, W, l)
        if final_norm:
            X = RMSNorm(X, W["final_norm.weight"])  # ln_f, unconditional
        logits.append(X @ W["embed.weight"].T)  # tied head
    return torch.stack(logits)


# ---------------------------------------------------------------------------------------------
def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = zoo.build(name, OVERRIDES).float().eval()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:  # every RMSNorm gain: random, non-unit, and not uniform
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


def weights(model):
    return {k: v.detach().to(torch.float64) for k, v in model.state_dict().items()}


def tokens(seed: int = 7):
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hybrid():
    return build("tiny-dense-hybridnorm")


@pytest.fixture(scope="module")
def star():
    return build("tiny-dense-hybridnorm-star")


def test_hybridnorm_matches_section_1_1(hybrid):
    idx = tokens()
    with torch.no_grad():
        out = hybrid(idx).logits
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(weights(hybrid), idx, star=False), atol=ATOL, rtol=0)


def test_hybridnorm_star_matches_section_1_3(star):
    idx = tokens()
    with torch.no_grad():
        out = star(idx).logits
    torch.testing.assert_close(out.double(), reference(weights(star), idx, star=True), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["no_v_norm", "norm_after_rope", "prenorm_ffn_residual", "no_final_norm"])
def test_hybridnorm_wrong_readings_do_not_match(hybrid, variant):
    """Each deviation from section 1.1 changes the logits by far more than the tolerance."""
    idx = tokens()
    with torch.no_grad():
        out = hybrid(idx).logits.double()
    ref = reference(weights(hybrid), idx, star=False, variant=variant, final_norm=variant != "no_final_norm")
    assert (out - ref).abs().max().item() > 1e-3


def test_hybridnorm_star_block0_differs_from_hybridnorm_block0(star):
    """The HybridNorm* model is not matched by the plain HybridNorm reference (block 0 matters)."""
    idx = tokens()
    W = weights(star)
    with torch.no_grad():
        out = star(idx).logits.double()
    assert (out - reference(W, idx, star=False)).abs().max().item() > 1e-3


def _attn_input_norms(model):
    sd = model.state_dict()
    return [l for l in range(N_LAYERS) if f"blocks.{l}.strategy.attn_norm.weight" in sd]


def test_hybridnorm_star_attention_input_norm_only_in_block0(star):
    assert _attn_input_norms(star) == [0]
    assert isinstance(star.blocks[0].strategy.attn_norm, nn.Module)
    assert star.blocks[0].strategy.attn_norm.weight.shape == (D_MODEL,)
    for l in range(1, N_LAYERS):
        assert not hasattr(star.blocks[l].strategy, "attn_norm")
    # QKV-Norm stays on in every block, block 0 included (the q/k/v flags are global)
    sd = star.state_dict()
    for l in range(N_LAYERS):
        for t in "qkv":
            assert sd[f"blocks.{l}.attn.{t}_norm.weight"].shape == (D_K,)
        assert sd[f"blocks.{l}.strategy.ffn_norm.weight"].shape == (D_MODEL,)


def test_hybridnorm_blocks_have_per_head_qkv_norms(hybrid):
    sd = hybrid.state_dict()
    assert _attn_input_norms(hybrid) == []  # no attention input norm anywhere
    for l in range(N_LAYERS):
        attn = hybrid.blocks[l].attn
        for t in "qkv":
            norm = getattr(attn, f"{t}_norm")
            assert norm is not None and sd[f"blocks.{l}.attn.{t}_norm.weight"].shape == (D_K,)
        # the block's norms: the q/k/v norms and the FFN norm, nothing else (no output norm)
        block_norms = sorted(k for k in sd if k.startswith(f"blocks.{l}.") and "norm" in k)
        assert block_norms == sorted([f"blocks.{l}.attn.{t}_norm.weight" for t in "qkv"]
                                     + [f"blocks.{l}.strategy.ffn_norm.weight"])
    assert sd["final_norm.weight"].shape == (D_MODEL,)
    assert "head.weight" not in sd  # tied
    assert hybrid.cfg.norm_eps == EPS and hybrid.cfg.norm_layer == "rmsnorm"


def test_gains_start_at_one():
    torch.manual_seed(0)
    for name in ("tiny-dense-hybridnorm", "tiny-dense-hybridnorm-star"):
        model = zoo.build(name, OVERRIDES)
        for pname, p in model.named_parameters():
            if "norm" in pname:
                assert torch.equal(p, torch.ones_like(p)), pname
