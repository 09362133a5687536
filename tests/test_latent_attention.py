"""``mla``, multi-head latent attention: its equations against a reference written here, cached generation
against recomputation under every registered norm strategy (dense and MoE), its cache size, and RoPE's
interleaved pairing and YaRN against transformers' formulas."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.model import Rope, Yarn
from zoo.registry import REGISTRY

MLA = ["attention.type=mla", "attention.options.kv_lora_rank=48", "attention.options.qk_rope_head_dim=16",
       "attention.options.qk_nope_head_dim=24", "attention.options.v_head_dim=20"]


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _interleaved_rope(x, positions, theta):
    """Pairs (2i, 2i+1) rotated by position * theta^(-2i/d), written out as complex numbers; the angles' cos
    and sin are taken in fp32, as the zoo's RoPE tables are."""
    d = x.shape[-1]
    freqs = positions[:, None].float() * theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    rot = torch.complex(freqs.cos().double(), freqs.sin().double())  # (T, d/2)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 3) + (d // 2,)
    return torch.view_as_real(xc * rot.view(shape)).flatten(-2).to(x.dtype)


def _reference(attn, x, theta):
    """MLA by the DeepSeek-V2 equations (no q compression), with interleaved RoPE in its original layout."""
    B, T, _ = x.shape
    H, dn, dr, dv, r = attn.n_heads, attn.nope, attn.rope_dim, attn.v_dim, attn.kv_rank
    eps = attn.kv_a_norm.eps
    q = (x @ attn.q.weight.T).view(B, T, H, dn + dr)
    ckv = x @ attn.kv_a.weight.T
    c, kr = _rms(ckv[..., :r], attn.kv_a_norm.weight, eps), ckv[..., r:]
    kv = (c @ attn.kv_b.weight.T).view(B, T, H, dn + dv)
    pos = torch.arange(T)
    qr = _interleaved_rope(q[..., dn:], pos, theta)
    kr = _interleaved_rope(kr[:, :, None], pos, theta).expand(B, T, H, dr)
    # the interleaved rotation leaves pairs in place; mla stores them evens-then-odds, and a permutation
    # applied to both q and k changes no dot product
    qq = torch.cat((q[..., :dn], qr), -1).transpose(1, 2)
    kk = torch.cat((kv[..., :dn], kr), -1).transpose(1, 2)
    vv = kv[..., dn:].transpose(1, 2)
    y = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=(dn + dr) ** -0.5)
    return y.transpose(1, 2).reshape(B, T, H * dv) @ attn.out.weight.T


def test_mla_matches_the_equations():
    torch.manual_seed(0)
    model = zoo.build("tiny-dense-prenorm", [*MLA, "attention.rope_layout=interleaved"], dtype=torch.float64)
    attn = model.blocks[0].attn
    x = torch.randn(2, 11, model.cfg.d_model, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _reference(attn, x, model.cfg.attention.rope_theta), rtol=1e-5, atol=1e-8)


def _assert_cached_greedy_is_recomputed(model, prompt, steps):
    """``model.generate`` (KV cache) against argmax of a full forward at each step; returns the tokens."""
    out = model.generate(prompt, steps)
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    return out


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("strategy", REGISTRY.names("norm strategy", usable=True))
def test_cached_generation_equals_recomputation(strategy, kind):
    """Greedy tokens from the latent cache equal argmax of full forwards; the last step's logits agree too."""
    torch.manual_seed(1)
    model = zoo.build(f"tiny-{kind}-prenorm", [*MLA, f"norm_strategy={strategy}", "attention.options.q_lora_rank=32"],
                      dtype=torch.float64).eval()
    out = _assert_cached_greedy_is_recomputed(model, torch.randint(0, 256, (2, 6)), 5)
    cache = model.new_cache(16)
    with torch.no_grad():
        model(out[:, :-1], cache=cache, positions=torch.arange(10).expand(2, 10))
        step = model(out[:, -1:], cache=cache, positions=torch.full((2, 1), 10)).logits[:, -1]
        full = model(out).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-9, atol=1e-9)


def test_the_cache_holds_the_latent_and_the_rope_key():
    cfg = zoo.get_config("tiny-dense-prenorm", MLA)
    st = zoo.stats(cfg, flops=False)
    assert st.kv_cache_bytes_per_token == cfg.n_layers * (48 + 16) * 4
    mha = zoo.stats("tiny-dense-prenorm", flops=False)
    assert mha.kv_cache_bytes_per_token == cfg.n_layers * 2 * cfg.n_heads * cfg.head_size * 4
    model = zoo.build("tiny-dense-prenorm", MLA).eval()
    cache = model.new_cache(8)
    model.generate(torch.zeros(1, 3, dtype=torch.long), 2)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache, positions=torch.arange(3)[None])
    assert cache.layers[0].k.shape == (1, 8, 48) and cache.layers[0].v.shape == (1, 8, 16)


def test_mla_refuses_kv_head_groups_and_bad_sizes():
    with pytest.raises(zoo.ConfigError) as e:
        zoo.build("tiny-dense-prenorm", [*MLA, "n_kv_heads=2"], device="meta")
    assert str(e.value) == ("attention 'mla' shares one latent among all heads and has no KV head groups; unset "
                            "n_kv_heads (got 2 for 4 heads)")
    with pytest.raises(zoo.ConfigError) as e:
        zoo.build("tiny-dense-prenorm", [*MLA, "attention.options.qk_rope_head_dim=5"], device="meta")
    assert str(e.value) == "attention 'mla' needs positive sizes: attention.options qk_rope_head_dim=5 (must be even)"


def test_yarn_frequencies_and_scales_follow_transformers_formulas():
    """YaRN as transformers' _compute_yarn_parameters and yarn_get_mscale define it, written out here."""
    dim, theta, factor, original = 16, 10000.0, 40.0, 64
    yarn = Yarn(factor, original, 32.0, 1.0, 1.0, 1.0)
    base = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)

    def corr(rot):
        return dim * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), dim - 1)
    extrapolate = 1 - ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    want = (1 / (factor * base)) * (1 - extrapolate) + (1 / base) * extrapolate
    torch.testing.assert_close(yarn.inv_freq(dim, theta), want)
    mscale = 0.1 * math.log(factor) + 1
    assert yarn.attention_factor == 1.0 and yarn.softmax_scale == pytest.approx(mscale ** 2)
    assert Yarn(factor, original, mscale_all_dim=0.0).attention_factor == pytest.approx(mscale)
    cos, _ = Rope(dim, theta, yarn=Yarn(factor, original, mscale_all_dim=0.0)).tables(5, torch.device("cpu"),
                                                                                       torch.float32)
    assert cos[0].tolist() == pytest.approx([mscale] * dim)


def test_factor_one_is_plain_rope_and_bad_yarn_is_refused():
    plain = Rope(16, 500.0).tables(7, torch.device("cpu"), torch.float32)
    same = Rope(16, 500.0, yarn=Yarn(1.0, 8)).tables(7, torch.device("cpu"), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(plain, same))
    with pytest.raises(zoo.ConfigError) as e:
        zoo.get_config("tiny-dense-prenorm", ["attention.yarn.factor=4"])
    assert str(e.value) == ("attention.yarn.factor must be >= 1 (1: plain RoPE), and above 1 needs a positive "
                            "attention.yarn.original_max_seq_len; got factor 4.0, original_max_seq_len None")
    with pytest.raises(zoo.ConfigError) as e:
        zoo.build("tiny-dense-prenorm", ["attention.rope_layout=spiral"], device="meta")
    assert str(e.value) == "attention.rope_layout must be one of rotate-half, interleaved; got 'spiral'"


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_interleaved_and_yarn_cached_generation_equals_recomputation(attention):
    torch.manual_seed(2)
    extra = MLA if attention == "mla" else []
    model = zoo.build("tiny-dense-hybridnorm", [*extra, "attention.rope_layout=interleaved", "attention.yarn.factor=4",
                                                "attention.yarn.original_max_seq_len=16",
                                                "attention.yarn.mscale_all_dim=1"], dtype=torch.float64).eval()
    _assert_cached_greedy_is_recomputed(model, torch.randint(0, 256, (1, 5)), 6)
