"""Hugging Face interop: tiny random transformers models imported into the zoo and zoo variants exported to
transformers give the same fp32 logits (to 1e-4); variants without an equivalent are refused clearly."""
from __future__ import annotations

import json
import subprocess
import warnings

import pytest
import torch

import zoo
from zoo.config import merge_config
from zoo.interop.hf import HFConversionError, export_arch, from_hf, hf_to_config, state_dict_to_hf, to_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB, SEQ = 128, 12
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random (transformers and the zoo zero some, e.g. routers and biases), norm gains away from 1,
    large enough that attention is peaked and routing decisive, so a wrong mapping shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("o_proj.bias"):
            p.zero_()  # the zoo has no output-projection bias; a non-zero one is refused (tested below)
        elif p.dim() == 1 and "bias" not in name:
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def hf_model(config: "transformers.PretrainedConfig") -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return randomize(model.float())


def hf_logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def zoo_logits(model: zoo.ZooModel, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(idx).logits


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert expected.abs().max() > 0.5, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def hf_config(cls_name: str, **kwargs) -> "transformers.PretrainedConfig":
    """A transformers config, or a skip where this transformers version lacks the architecture."""
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    return cls(**kwargs)


@pytest.fixture(scope="module")
def idx() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


# name: (config, what the zoo config must say)
IMPORTS = {
    "llama-gqa-tied": (lambda: hf_config("LlamaConfig", **BASE, intermediate_size=96, tie_word_embeddings=True,
                                                        rope_theta=5000.0),
                       {"norm_strategy": "prenorm", "n_kv_heads": 2, "tie_embeddings": True, "ffn.type": "dense",
                        "attention.rope_theta": 5000.0}),
    "mixtral": (lambda: hf_config("MixtralConfig", **BASE, intermediate_size=48, num_local_experts=4,
                                                   num_experts_per_tok=2, sliding_window=5),
                {"norm_strategy": "prenorm", "moe.num_experts": 4, "moe.top_k": 2, "attention.sliding_window": 5,
                 "moe.router_options": {"renormalize": True}}),
    "olmoe": (lambda: hf_config("OlmoeConfig", **BASE, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                               norm_topk_prob=False),
              {"norm_strategy": "qknorm", "norm_options": {"width": "full"}, "moe.num_experts": 8,
               "moe.router_options": {"renormalize": False}}),
    "qwen2-moe": (lambda: hf_config("Qwen2MoeConfig", **BASE, intermediate_size=96, moe_intermediate_size=32,
                                                      shared_expert_intermediate_size=48, num_experts=4,
                                                      num_experts_per_tok=2, norm_topk_prob=False),
                  {"norm_strategy": "prenorm", "attention.options": {"qkv_bias": True}, "moe.shared_experts": 1,
                   "moe.shared_hidden_size": 48, "moe.shared_gate": True, "moe.router_options": {"renormalize": False}}),
    # beyond the four the issue names: the remaining architectures the converter maps, both ways
    "mistral": (lambda: hf_config("MistralConfig", **BASE, intermediate_size=96, sliding_window=4),
                {"norm_strategy": "prenorm", "attention.sliding_window": 4}),
    "llama-attention-bias": (lambda: hf_config("LlamaConfig", **BASE, intermediate_size=96, attention_bias=True),
                             {"attention.options": {"qkv_bias": True}}),
    "qwen3": (lambda: hf_config("Qwen3Config", **BASE, intermediate_size=96, head_dim=32),
              {"norm_strategy": "qknorm", "norm_options": {"width": "head"}, "head_dim": 32}),
    "qwen3-moe": (lambda: hf_config("Qwen3MoeConfig", **BASE, intermediate_size=96, moe_intermediate_size=32,
                                                      head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                      norm_topk_prob=True),
                  {"norm_strategy": "qknorm", "norm_options": {"width": "head"}}),
    "olmo2": (lambda: hf_config("Olmo2Config", **BASE, intermediate_size=96), {"norm_strategy": "olmo2"}),
    "flex-olmo": (lambda: hf_config("FlexOlmoConfig", **BASE, intermediate_size=32, num_experts=4, num_experts_per_tok=2),
                  {"norm_strategy": "olmo2", "ffn.type": "moe"}),
}


def _cfg_value(cfg: zoo.ModelConfig, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return dict(value) if isinstance(value, dict) else value


@pytest.mark.parametrize("case", list(IMPORTS))
def test_import_then_export_matches_transformers(case, tmp_path, idx):
    make_config, expected_cfg = IMPORTS[case]
    hf = hf_model(make_config())
    hf.save_pretrained(tmp_path / "hf")
    ref = hf_logits(hf, idx)

    ckpt = from_hf(tmp_path / "hf", tmp_path / "zoo")
    model = zoo.load(ckpt)
    for key, value in expected_cfg.items():
        assert _cfg_value(model.cfg, key) == value, key
    assert merge_config(tmp_path / "zoo" / "config.yaml") == model.cfg
    if model.cfg.is_moe:
        assert {"experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2"} <= {n.split("ffn.", 1)[1] for n, _ in model.named_parameters() if ".ffn." in n}
    assert_same(zoo_logits(model, idx), ref)

    out = to_hf(ckpt, tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(back) is type(hf)
    assert_same(hf_logits(back.eval(), idx), ref)


def test_transformers5_fused_expert_layout_imports(tmp_path, idx):
    """transformers 5 holds experts fused (``experts.gate_up_proj``/``down_proj``); such files import too."""
    from safetensors.torch import save_file
    hf = hf_model(IMPORTS["mixtral"][0]())
    hf.save_pretrained(tmp_path / "hf")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if not any(k.endswith("experts.gate_up_proj") for k in state):
        pytest.skip(f"transformers {transformers.__version__} keeps experts unfused")
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    assert_same(zoo_logits(zoo.load(from_hf(tmp_path / "hf", tmp_path / "zoo")), idx), hf_logits(hf, idx))


SMALL = ["n_layers=2", "d_model=64", "vocab_size=128", "max_seq_len=64"]
EXPORTS = {
    "tiny-dense-prenorm": ([], "LlamaForCausalLM"),
    "tiny-moe-prenorm": (["moe.router_options.renormalize=true", "moe.jitter=0.01"], "MixtralForCausalLM"),
    "tiny-moe-qknorm": (["norm_options.width=full"], "OlmoeForCausalLM"),
    "tiny-dense-olmo2": (["tie_embeddings=false"], "Olmo2ForCausalLM"),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_transformers_with_the_same_logits(name, tmp_path, idx):
    overrides, hf_class = EXPORTS[name]
    model = randomize(zoo.build(name, SMALL + overrides), seed=2)
    ckpt = zoo.save(model, tmp_path / "zoo" / "model.safetensors", variant=name)
    out = to_hf(tmp_path / "zoo", tmp_path / "hf")  # a folder holding the checkpoint works as well as the file
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [hf_class]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(hf).__name__ == hf_class
    assert_same(hf_logits(hf.eval(), idx), zoo_logits(model, idx))
    # and back again: the same config and weights
    again = zoo.load(from_hf(out, tmp_path / "again"))
    assert again.cfg.norm_strategy == model.cfg.norm_strategy and ckpt.exists()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, atol=0, rtol=0)


@pytest.mark.parametrize("name, overrides, needles", [
    ("tiny-dense-hybridnorm", [], ["HybridNorm normalizes Q, K and V per head", "FFN residual after the norm"]),
    ("tiny-moe-hybridnorm-star", [], ["HybridNorm*"]),
    ("tiny-dense-postnorm", [], ["Post-LN"]),
    ("tiny-dense-mixln", [], ["Mix-LN"]),
    ("tiny-dense-periln", [], ["Peri-LN"]),
    ("tiny-dense-deepnorm", [], ["DeepNorm"]),
    ("tiny-moe-prenorm", [], ["renormalize=false", "Mixtral"]),
    ("tiny-moe-prenorm", ["moe.router=sigmoid-bias"], ["router 'sigmoid-bias'"]),
    ("tiny-dense-prenorm", ["norm_layer=layernorm"], ["'layernorm'", "RMSNorm"]),
    ("tiny-dense-qknorm", ["norm_options.width=full"], ["full-width QK-norm"]),
    ("tiny-moe-olmo2", ["attention.sliding_window=8"], ["sliding_window=8", "FlexOlmoForCausalLM"]),
])
def test_variants_without_an_hf_equivalent_are_refused(name, overrides, needles, tmp_path):
    with pytest.raises(HFConversionError) as info:
        to_hf(name, tmp_path / "out", overrides=overrides or None)
    msg = str(info.value)
    assert isinstance(info.value, zoo.ZooError)
    assert name in msg and "no Hugging Face transformers equivalent" in msg, msg
    for needle in needles:
        assert needle in msg, msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("base, changes, needles", [
    ("qwen2-moe", {"mlp_only_layers": [1]}, ["mlp_only_layers=[1]", "every layer is MoE"]),
    ("qwen2-moe", {"decoder_sparse_step": 2}, ["decoder_sparse_step=2"]),
    ("qwen2-moe", {"use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention"]}, ["layer_types"]),
    ("qwen2-moe", {"hidden_act": "gelu"}, ["hidden_act 'gelu'", "SwiGLU"]),
    ("llama-gqa-tied", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, ["'yarn'"]),
    ("llama-gqa-tied", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["'llama3'"]),
    ("llama-gqa-tied", {"model_type": "gpt2"}, ["model_type 'gpt2'", "llama", "mixtral", "olmoe", "qwen2_moe"]),
    ("olmoe", {"clip_qkv": 8.0}, ["clip_qkv"]),
])
def test_unsupported_hf_configs_are_refused(base, changes, needles):
    hf = {**IMPORTS[base][0]().to_dict(), **changes}
    with pytest.raises(HFConversionError) as info:
        hf_to_config(hf)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_nonzero_output_bias_and_stray_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    hf = hf_model(IMPORTS["llama-attention-bias"][0]())
    with torch.no_grad():
        hf.model.layers[1].self_attn.o_proj.bias.fill_(0.5)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(HFConversionError, match="o_proj.bias is not zero"):
        from_hf(tmp_path / "hf", tmp_path / "zoo")
    hf = hf_model(IMPORTS["llama-gqa-tied"][0]())
    hf.save_pretrained(tmp_path / "hf2")
    tensors = load_file(tmp_path / "hf2" / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "hf2" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFConversionError, match="does not map: model.layers.0.mlp.extra.weight|does not map: layers.0.mlp.extra"):
        from_hf(tmp_path / "hf2", tmp_path / "zoo2")


def test_sources_that_are_not_hf_folders(tmp_path, monkeypatch):
    with pytest.raises(HFConversionError, match="has no config.json"):
        from_hf(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps(IMPORTS["olmo2"][0]().to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(HFConversionError, match="pickle files, which the zoo never loads"):
        from_hf(tmp_path, tmp_path / "out")
    with pytest.raises(HFConversionError, match="no such folder"):
        from_hf(str(tmp_path / "missing" / "dir"), tmp_path / "out")

    import huggingface_hub

    def offline(repo_id, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("outgoing traffic has been disabled")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(HFConversionError) as info:
        from_hf("some-org/some-model", tmp_path / "out")
    msg = str(info.value)
    assert "'some-org/some-model'" in msg and "could not be downloaded" in msg and "pass that folder" in msg


def test_qwen2_moe_parts_in_the_zoo_config():
    """The two MoE fields and the mha option Qwen2-MoE needs, on their own."""
    model = zoo.build("tiny-moe-prenorm", SMALL + ["moe.shared_experts=1", "moe.shared_hidden_size=48",
                                                   "moe.shared_gate=true", "attention.options.qkv_bias=true"])
    ffn, attn = model.blocks[0].ffn, model.blocks[0].attn
    assert ffn.shared.gate_up.weight.shape == (96, 64) and ffn.shared_gate.weight.shape == (1, 64)
    assert ffn.shared_gate.weight.abs().sum() > 0  # initialized, as a router is
    assert attn.qkv.bias is not None and not attn.qkv.bias.any()  # zero at init
    st = zoo.stats(model.cfg, flops=False)
    assert st.total_params == sum(p.numel() for p in model.parameters())
    assert st.total_params - st.active_params == 3 * 64 * 256 * (8 - 2) * 2  # the gate and shared expert are active
    default = zoo.build("tiny-moe-prenorm", SMALL + ["moe.shared_experts=2"])
    assert default.blocks[0].ffn.shared.hidden_size == 2 * 256 and default.blocks[0].ffn.shared_gate is None
    with pytest.raises(zoo.ConfigError, match="moe.shared_experts"):
        zoo.get_config("tiny-moe-prenorm", ["moe.shared_gate=true"])
    with pytest.raises(zoo.ConfigError, match="moe.shared_hidden_size"):
        zoo.get_config("tiny-moe-prenorm", ["moe.shared_hidden_size=64"])


def test_cli_convert(tmp_path, idx, subprocess_env, capsys, monkeypatch):
    hf = hf_model(IMPORTS["olmoe"][0]())
    hf.save_pretrained(tmp_path / "hf")
    result = subprocess.run(["zoo", "convert", "--from-hf", str(tmp_path / "hf"), "--to", str(tmp_path / "zoo")],
                            env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and str(tmp_path / "zoo" / "model.safetensors") in result.stdout
    assert_same(zoo_logits(zoo.load(tmp_path / "zoo" / "model.safetensors"), idx), hf_logits(hf, idx))
    assert (tmp_path / "zoo" / "config.yaml").read_text().startswith("# imported from Hugging Face OlmoeForCausalLM")

    from zoo.cli import main
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own
    assert main(["convert", "--to-hf", str(tmp_path / "zoo"), "--to", str(tmp_path / "back")]) == 0
    assert "OlmoeForCausalLM" in capsys.readouterr().out
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--to", str(tmp_path / "hf")]) == 2
    assert "would overwrite the source" in capsys.readouterr().err
    assert main(["convert", "--to-hf", "tiny-dense-hybridnorm", "--to", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: tiny-dense-hybridnorm (hybridnorm, dense) has no Hugging Face transformers "
                          "equivalent: HybridNorm") and err.count("\n") == 1, err


@pytest.mark.parametrize("case", ["llama-gqa-tied", "qwen3", "olmo2"])
def test_training_gradients_match_transformers(case, tmp_path, idx):
    """The hand-written backwards (RMSNorm, RoPE, SwiGLU) give transformers' gradients: the LM loss of an
    imported model, back-propagated in both libraries, with every zoo gradient mapped to HF names."""
    make_config, _ = IMPORTS[case]
    hf = hf_model(make_config())
    hf.save_pretrained(tmp_path / "hf")
    model = zoo.load(from_hf(tmp_path / "hf", tmp_path / "zoo"))
    x, y = idx[:, :-1], idx[:, 1:]
    hf.train()(x, labels=None).logits.flatten(0, 1).log_softmax(-1).gather(1, y.reshape(-1, 1)).mean().neg().backward()
    model.train()(x, y).loss.backward()
    grads = state_dict_to_hf(export_arch(model.cfg), model.cfg, {n: p.grad for n, p in model.named_parameters()})
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    assert grads.keys() == hf_grads.keys()
    for name, want in hf_grads.items():
        assert want.abs().max() > 0, name
        torch.testing.assert_close(grads[name], want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


class _RenamedPreNorm(zoo.NormStrategy):
    """Pre-Norm whose norms have other names than the built-in's: the converter reaches them only through
    the ``hf_norms`` it declares, so renaming a plugin's fields cannot break conversion."""

    norms = ("before_attention", "before_ffn")
    hf_norms = {"before_attention": "input_layernorm", "before_ffn": "post_attention_layernorm"}

    def forward(self, x, attn, ffn):
        h = x + attn(self.before_attention(x))
        return h + ffn(self.before_ffn(h))


def test_a_plugins_declared_names_are_all_the_converter_needs(tmp_path, idx, runtime_plugin):
    class Plugin:
        @zoo.hookimpl
        def register_norm_strategies(self, register):
            register("renamed-prenorm", _RenamedPreNorm)

    runtime_plugin(Plugin(), "test-renamed-prenorm")
    torch.manual_seed(0)
    model = randomize(zoo.build("tiny-dense-prenorm", ["norm_strategy=renamed-prenorm"]))
    ckpt = zoo.save(model, tmp_path / "zoo" / "model.safetensors")
    out = to_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert_same(hf_logits(hf, idx), zoo_logits(model, idx))
    back = zoo.load(from_hf(out, tmp_path / "back"))  # either declared Pre-Norm computes it
    assert back.cfg.norm_strategy in ("prenorm", "renamed-prenorm")
    assert_same(zoo_logits(back, idx), zoo_logits(model, idx))
