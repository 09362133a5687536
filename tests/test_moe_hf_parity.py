"""The zoo's MoE against HF transformers: an MoE layer given the weights of an OlmoeSparseMoeBlock
(no renormalization) or a MixtralSparseMoeBlock (renormalized) reproduces it on every backend, and
a tiny zoo model in OLMoE's layout (pre-norm, full-width QK-norm) reproduces OlmoeForCausalLM.

Weight mapping (MegaBlocks dMoE layout <-> HF v5 fused experts):
  router.layer.weight (E, H)            <-> gate.weight (E, H)
  experts.mlp.w1 / v1 (E*F, H)          <-> experts.gate_up_proj (E, 2F, H) = [w1 | v1] along dim 1
  experts.mlp.w2 (E*F, H), untransposed <-> experts.down_proj (E, H, F) = w2.view(E, F, H)^T
"""
from __future__ import annotations

import copy
import functools
import json
from typing import Any

import pytest
import torch

import zoo
from zoo.builder import build_ffn
from zoo.moe import MoEFFN

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, OlmoeConfig, OlmoeForCausalLM  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("registry_unchanged", "one_intra_op_thread")




BACKENDS = ("loop", "grouped_mm", "fused")
SILENT = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}  # tiny vocabularies


@functools.lru_cache(maxsize=None)
def _merged_config(key: str) -> zoo.ModelConfig:
    return zoo.get_config(zoo.ModelConfig(), json.loads(key))


def zoo_config(E: int, k: int, H: int, F: int, renormalize: bool, backend: str, **extra: Any) -> zoo.ModelConfig:
    overrides = {"d_model": H, "n_heads": 4, "ffn": {"type": "moe"}, **extra,
                 "moe": {"num_experts": E, "top_k": k, "hidden_size": F, "backend": backend, "router": "topk",
                         "router_options": {"renormalize": renormalize}}}
    return copy.deepcopy(_merged_config(json.dumps(overrides, sort_keys=True)))


def hf_block(family: str, E: int, k: int, H: int, F: int) -> torch.nn.Module:
    if family == "olmoe":
        cfg = OlmoeConfig(hidden_size=H, intermediate_size=F, num_experts=E, num_experts_per_tok=k, norm_topk_prob=False,
                          num_hidden_layers=1, num_attention_heads=4, vocab_size=64, **SILENT)
        cls = OlmoeSparseMoeBlock
    else:
        cfg = MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, vocab_size=64, **SILENT)
        cls = MixtralSparseMoeBlock
    cfg._experts_implementation = "eager"  # HF's reference loop over experts
    torch.manual_seed(0)
    block = cls(cfg)
    # normal_ init, as HF may leave the weights empty; std H^-1/2 rather than HF's 0.02 so that
    # outputs are O(0.1-1) and the 1e-5 tolerance means something
    std = H ** -0.5
    for p in block.parameters():
        torch.nn.init.normal_(p, std=std)
    return block


@torch.no_grad()
def copy_from_hf(block: torch.nn.Module, layer: MoEFFN) -> None:
    """HF fused experts -> MegaBlocks layout (the reverse of benchmarks/moe_layer.py's copy_to_hf)."""
    mlp = layer.experts.mlp
    E, F, H = mlp.num_experts, mlp.ffn, mlp.hidden
    gate_up = block.experts.gate_up_proj  # (E, 2F, H)
    assert gate_up.shape == (E, 2 * F, H) and block.experts.down_proj.shape == (E, H, F)
    layer.router.layer.weight.copy_(block.gate.weight)
    mlp.w1.copy_(gate_up[:, :F].reshape(E * F, H))
    mlp.v1.copy_(gate_up[:, F:].reshape(E * F, H))
    mlp.w2.copy_(block.experts.down_proj.transpose(1, 2).reshape(E * F, H))


def layer_from_hf(block: torch.nn.Module, E: int, k: int, H: int, F: int, renormalize: bool, backend: str) -> MoEFFN:
    cfg = zoo_config(E, k, H, F, renormalize, backend)
    layer = build_ffn(cfg, 0)
    copy_from_hf(block, layer)
    return layer


CASES = [  # family, E, k, H, F, renormalize
    pytest.param("olmoe", 8, 2, 32, 16, False, id="olmoe-E8-k2"),
    pytest.param("olmoe", 64, 8, 32, 16, False, id="olmoe-E64-k8"),
    pytest.param("mixtral", 8, 2, 32, 16, True, id="mixtral-E8-k2"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,E,k,H,F,renormalize", CASES)
def test_layer_reproduces_hf_sparse_moe_block(family, E, k, H, F, renormalize, backend):
    block = hf_block(family, E, k, H, F)
    layer = layer_from_hf(block, E, k, H, F, renormalize, backend)
    x = torch.randn(2, 24, H, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = block(xa)
    got, _ = layer(xb)
    assert want.abs().max() > 1e-2  # a comparison at a meaningful scale
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # gradients too: input, router, experts (mapped back to HF's layout)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (want * grad_out).sum().backward()
    (got * grad_out).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.router.layer.weight.grad, block.gate.weight.grad, atol=1e-5, rtol=1e-5)
    mlp = layer.experts.mlp
    gu = block.experts.gate_up_proj.grad
    torch.testing.assert_close(mlp.w1.grad.view(E, F, H), gu[:, :F], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mlp.v1.grad.view(E, F, H), gu[:, F:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mlp.w2.grad.view(E, F, H), block.experts.down_proj.grad.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_renormalization_is_what_tells_mixtral_from_olmoe():
    """Sanity check that the parity above discriminates: the wrong renormalize setting differs."""
    block = hf_block("mixtral", 8, 2, 32, 16)
    wrong = layer_from_hf(block, 8, 2, 32, 16, False, "loop")
    x = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (wrong(x)[0] - block(x)).abs().max() > 1e-3


def test_weight_mapping_round_trips():
    """Zoo -> HF (benchmarks/moe_layer.py's mapping) -> zoo gives the same tensors back."""
    E, k, H, F = 8, 2, 32, 16
    cfg = zoo_config(E, k, H, F, False, "loop")
    torch.manual_seed(0)
    src = build_ffn(cfg, 0)
    src.init_weights(zoo.Init.from_config(cfg))
    block = hf_block("olmoe", E, k, H, F)
    w1, v1, w2 = src.experts.mlp.views()
    with torch.no_grad():
        block.gate.weight.copy_(src.router.layer.weight)
        block.experts.gate_up_proj.copy_(torch.cat([w1, v1], dim=1))
        block.experts.down_proj.copy_(w2.transpose(1, 2))
    back = layer_from_hf(block, E, k, H, F, False, "loop")
    for (name, a), (_, b) in zip(src.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------
# whole model: OLMoE layout
# ---------------------------------------------------------------------------------------------
def olmoe_pair(attn_impl: str, backend: str = "loop"):
    E, k, H, F, L, V, nh, theta = 8, 2, 32, 16, 2, 64, 4, 10000.0
    cfg = zoo_config(E, k, H, F, False, backend, n_layers=L, vocab_size=V, max_seq_len=64, tie_embeddings=False,
                     norm_strategy="qknorm", norm_options={"width": "full"}, attention={"rope_theta": theta})
    torch.manual_seed(0)
    model = zoo.build(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains, so a misplaced norm would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape))
    hc = OlmoeConfig(hidden_size=H, intermediate_size=F, num_experts=E, num_experts_per_tok=k, norm_topk_prob=False,
                     num_hidden_layers=L, num_attention_heads=nh, num_key_value_heads=nh, vocab_size=V, rms_norm_eps=1e-5,
                     rope_theta=theta, attention_bias=False, clip_qkv=None, tie_word_embeddings=False,
                     max_position_embeddings=64, **SILENT)
    hc._attn_implementation = attn_impl
    hc._experts_implementation = "eager"
    hf = OlmoeForCausalLM(hc).eval()
    sd = model.state_dict()
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(sd["embed.weight"])
        for i, lay in enumerate(hf.model.layers):
            p = f"blocks.{i}."
            lay.input_layernorm.weight.copy_(sd[p + "strategy.attn_norm.weight"])
            lay.post_attention_layernorm.weight.copy_(sd[p + "strategy.ffn_norm.weight"])
            q, kk, v = sd[p + "attn.qkv.weight"].split([H, H, H])
            lay.self_attn.q_proj.weight.copy_(q)
            lay.self_attn.k_proj.weight.copy_(kk)
            lay.self_attn.v_proj.weight.copy_(v)
            lay.self_attn.o_proj.weight.copy_(sd[p + "attn.out.weight"])
            lay.self_attn.q_norm.weight.copy_(sd[p + "attn.q_norm.weight"])
            lay.self_attn.k_norm.weight.copy_(sd[p + "attn.k_norm.weight"])
            lay.mlp.gate.weight.copy_(sd[p + "ffn.router.layer.weight"])
            w1, v1, w2 = (sd[p + f"ffn.experts.mlp.{n}"].view(E, F, H) for n in ("w1", "v1", "w2"))
            lay.mlp.experts.gate_up_proj.copy_(torch.cat([w1, v1], dim=1))
            lay.mlp.experts.down_proj.copy_(w2.transpose(1, 2))
        hf.model.norm.weight.copy_(sd["final_norm.weight"])
        hf.lm_head.weight.copy_(sd["head.weight"])
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_hf == sum(p.numel() for p in model.parameters())  # every weight has a home
    return model, hf


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_tiny_olmoe_layout_model_matches_hf_olmoe(attn_impl):
    model, hf = olmoe_pair(attn_impl)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    targets = torch.roll(idx, -1, 1)
    targets[:, -1] = -100
    with torch.no_grad():
        ours = model(idx, targets=targets)
        theirs = hf(idx, labels=idx)
    assert ours.logits.abs().max() > 0.1
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-4, rtol=1e-4)  # HF shifts labels itself


@pytest.mark.parametrize("backend", ["grouped_mm", "fused"])
def test_tiny_olmoe_layout_model_matches_hf_on_other_backends(backend):
    model, hf = olmoe_pair("sdpa", backend)
    idx = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, hf(idx).logits, atol=1e-4, rtol=1e-4)
