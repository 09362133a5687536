"""DeepSeek-V3 in the zoo's terms: group-limited sigmoid routing against a reference written here, dense first
layers counted by stats, the hash router, and ``zoo convert`` both ways against transformers' DeepseekV3
(tiny configs, random weights): logits within 1e-4, greedy tokens equal where the top-2 gap exceeds 1e-3,
and an exact round trip."""
from __future__ import annotations

import json

import pytest
import torch

import zoo
from zoo.interop.hf import HFConversionError, from_hf, to_hf

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
            routed_scaling_factor=2.5, kv_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=10,
            n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=256, initializer_range=0.1)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def _hf_model(tmp_path, q_lora_rank, rope, seed=0):
    cfg = transformers.DeepseekV3Config(**TINY, q_lora_rank=q_lora_rank,
                                        rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.8, 1.2)
        for layer in model.model.layers[TINY["first_k_dense_replace"]:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("q_lora_rank,rope", [(None, None), (32, YARN)], ids=["no-q-compression", "q-compression-yarn"])
def test_import_matches_transformers_and_exports_back(tmp_path, q_lora_rank, rope):
    hf, folder = _hf_model(tmp_path, q_lora_rank, rope)
    ckpt = from_hf(folder, tmp_path / "zoo")
    model = zoo.load(ckpt).eval()
    cfg = model.cfg
    assert (cfg.attention.type, cfg.moe.router, cfg.moe.first_dense_layers) == ("mla", "sigmoid-bias", 1)
    assert cfg.moe.router_options == {"n_group": 4, "topk_group": 2, "renormalize": True, "route_scale": 2.5}
    assert type(model.blocks[0].ffn).__name__ == "SwiGLU" and type(model.blocks[1].ffn).__name__ == "MoEFFN"
    torch.manual_seed(1)
    idx = torch.randint(0, TINY["vocab_size"], (3, 40))
    with torch.no_grad():
        want, got = hf(idx).logits, model(idx).logits
    assert (want - got).abs().max() < 1e-4
    prompt = idx[:, :8]
    out = model.generate(prompt, 12)
    with torch.no_grad():
        logits = hf(out).logits[:, 7:-1]
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3
    assert clear.float().mean() > 0.5
    assert torch.equal(logits.argmax(-1)[clear], out[:, 8:][clear])

    back = to_hf(ckpt, tmp_path / "back")
    exported = transformers.DeepseekV3ForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        assert torch.equal(exported(idx).logits, want)
    again = zoo.load(from_hf(back, tmp_path / "again"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert json.loads((back / "config.json").read_text())["architectures"] == ["DeepseekV3ForCausalLM"]


def test_import_refuses_an_eps_the_latent_norms_do_not_use(tmp_path):
    _, folder = _hf_model(tmp_path, None, None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    with pytest.raises(HFConversionError) as e:
        from_hf(folder, tmp_path / "zoo")
    assert str(e.value) == ("rms_norm_eps=1e-05: transformers' DeepseekV3 normalizes its q and kv latents at eps 1e-06 "
                            "and its layers at rms_norm_eps, and the zoo uses one eps for both")


def test_export_refuses_what_deepseek_v3_does_not_compute():
    with pytest.raises(HFConversionError) as e:
        to_hf("tiny-moe-prenorm", "/nonexistent", overrides=["attention.type=mla"])
    assert str(e.value) == ("tiny-moe-prenorm (prenorm, MoE) has no Hugging Face transformers equivalent: router "
                            "'topk': DeepseekV3 routes by sigmoid scores with a balancing bias (hf_bias_name)")
    with pytest.raises(HFConversionError) as e:
        to_hf("tiny-moe-prenorm", "/nonexistent", overrides=["attention.type=mla", "moe.router=sigmoid-bias"])
    assert str(e.value).endswith("DeepseekV3 normalizes its latents at eps 1e-06; set norm_eps=1e-06")


def _group_limited_reference(logits, bias, k, groups, best, scale):
    """DeepSeek-V3's gate: sigmoid scores; groups ranked by the sum of their two best biased scores; top-k among
    the best groups' experts; gates the unbiased scores of those, normalized and scaled."""
    T, E = logits.shape
    s = logits.sigmoid()
    rows = []
    for t in range(T):
        biased = (s[t] + bias).tolist()
        size = E // groups
        ranked = sorted(range(groups), key=lambda g: -sum(sorted(biased[g * size:(g + 1) * size])[-2:]))[:best]
        allowed = [e for g in ranked for e in range(g * size, (g + 1) * size)]
        chosen = sorted(allowed, key=lambda e: -biased[e])[:k]
        total = sum(s[t, e].item() for e in chosen)
        rows.append({e: s[t, e].item() / total * scale for e in chosen})
    return rows


def test_group_limited_routing_matches_the_reference():
    torch.manual_seed(3)
    cfg = zoo.get_config("tiny-moe-prenorm", ["moe.router=sigmoid-bias", "moe.num_experts=12", "moe.top_k=3",
                                              "moe.router_options.n_group=4", "moe.router_options.topk_group=2",
                                              "moe.router_options.route_scale=2.5"])
    router = zoo.build(cfg).blocks[0].ffn.router
    router.expert_bias.normal_(0, 0.3)
    x = torch.randn(64, cfg.d_model)
    routing = router(x)
    want = _group_limited_reference(router.layer(x).float(), router.expert_bias, 3, 4, 2, 2.5)
    got = [dict() for _ in range(64)]
    for t, e, w in zip(routing.token.tolist(), routing.expert.tolist(), routing.weight.tolist()):
        got[t][e] = w
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and all(g[e] == pytest.approx(w[e], rel=1e-6) for e in g)


def test_group_limits_are_checked():
    with pytest.raises(zoo.ConfigError) as e:
        zoo.build("tiny-moe-prenorm", ["moe.router=sigmoid-bias", "moe.router_options.n_group=3"], device="meta")
    assert str(e.value) == ("moe.router_options.n_group (3) must divide moe.num_experts (8), topk_group (1) must lie "
                            "in [1, n_group], and the chosen groups must hold at least moe.top_k (2) experts")


def test_dense_first_layers_are_counted_by_stats():
    moe = zoo.stats("tiny-moe-prenorm", seq_len=64)
    mixed = zoo.stats("tiny-moe-prenorm", ["moe.first_dense_layers=1", "ffn.hidden_size=512"], seq_len=64)
    dense = zoo.stats("tiny-dense-prenorm", seq_len=64)
    cfg = zoo.get_config("tiny-moe-prenorm")
    L = cfg.n_layers
    # one MoE FFN swapped for the dense one: the totals move by one layer's difference between the two models
    assert mixed.total_params == moe.total_params - (moe.total_params - dense.total_params) // L
    assert mixed.active_params == moe.active_params - (moe.active_params - dense.active_params) // L
    assert mixed.flops_per_token == moe.flops_per_token - (moe.flops_per_token - dense.flops_per_token) // L
    with pytest.raises(zoo.ConfigError) as e:
        zoo.get_config("tiny-moe-prenorm", [f"moe.first_dense_layers={L}"])
    assert str(e.value) == (f"moe.first_dense_layers ({L}) must lie in [0, n_layers) (n_layers={L}); an MoE model "
                            "keeps at least one MoE layer")


def test_hash_router_routes_by_token_id_through_the_router_context():
    torch.manual_seed(4)
    model = zoo.build("tiny-moe-prenorm", ["moe.router=hash", "moe.top_k=1"]).eval()
    idx = torch.randint(0, 256, (2, 32))
    idx[1, 5:] = idx[0, 5:]
    out = model(idx)
    assert out.router_stats[0]["tokens_per_expert"].sum() == 64
    layer = model.blocks[1].ffn
    x = torch.randn(4, 3, model.cfg.d_model)
    ids = torch.tensor([[7, 7, 9]] * 4)
    routing = layer.router(x.view(-1, model.cfg.d_model), ids.view(-1))
    assert len(set(routing.expert[ids.view(-1) == 7].tolist())) == 1  # one token id, one expert, whatever x is
    salt = (0 * 0x9E3779B1 + 1) & 0xFFFFFFFF
    assert routing.expert.tolist() == [((i * 2654435761 + salt) & 0xFFFFFFFF) % 8 for i in ids.view(-1).tolist()]
    with pytest.raises(zoo.ConfigError) as e:
        layer.router(x.view(-1, model.cfg.d_model))
    assert str(e.value) == ("the hash router routes by token id, and this MoE layer was called without the token ids "
                            "(call the model, or pass token_ids to the MoE layer)")
