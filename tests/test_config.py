"""Configs: variant YAML, then overrides (dotlist or mapping); errors name the key and suggest a fix."""
from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

import zoo
from zoo.config import ModelConfig, merge_config

pytestmark = pytest.mark.usefixtures("registry_unchanged")

TINY = "tiny-dense-prenorm"


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------
def test_variant_yaml_is_merged_over_defaults():
    cfg = zoo.get_config(TINY)
    assert isinstance(cfg, ModelConfig)
    defaults = ModelConfig()
    # from tiny-dense.yaml
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.max_seq_len) == (128, 4, 4, 256, 256)
    assert cfg.ffn.type == "dense" and cfg.ffn.hidden_size == 512
    # from the variant's own mapping
    assert cfg.norm_strategy == "prenorm"
    assert zoo.get_config("tiny-dense-hybridnorm").norm_strategy == "hybridnorm"
    # untouched keys keep the schema defaults
    assert cfg.norm_layer == defaults.norm_layer and cfg.init == defaults.init

    big = zoo.get_config("olmo2-1b-hybridnorm")
    assert (big.d_model, big.n_layers, big.n_heads, big.n_kv_heads) == (2048, 16, 32, 8)
    assert big.attention.rope_theta == 500000.0 and big.vocab_size == 100352


def test_dotlist_overrides():
    cfg = zoo.get_config("tiny-dense-hybridnorm", ["norm_strategy=prenorm", "n_layers=6", "attention.rope_theta=1e6",
                                                   "tie_embeddings=false", "n_kv_heads=2", "norm_layer=layernorm"])
    assert cfg.norm_strategy == "prenorm"
    assert cfg.n_layers == 6 and isinstance(cfg.n_layers, int)
    assert cfg.attention.rope_theta == 1e6 and isinstance(cfg.attention.rope_theta, float)
    assert cfg.tie_embeddings is False
    assert cfg.kv_heads == 2
    assert cfg.norm_layer == "layernorm"
    assert cfg.d_model == 128  # the variant's value survives


def test_mapping_overrides_are_deep_merged():
    cfg = zoo.get_config(TINY, {"attention": {"rope_theta": 500000.0}, "ffn": {"hidden_size": 256}})
    assert cfg.attention.rope_theta == 500000.0
    assert cfg.attention.type == "mha"  # sibling keys are kept
    assert cfg.ffn.hidden_size == 256 and cfg.ffn.type == "dense"


def test_overrides_apply_to_the_built_model():
    model = zoo.build(TINY, ["n_layers=2", "norm_strategy=hybridnorm"], device="meta")
    assert len(model.blocks) == 2
    assert type(model.blocks[0].strategy).__name__ == "HybridNorm"


def test_config_object_and_plugin_options():
    base = zoo.get_config(TINY)
    cfg = zoo.get_config(base, ["norm_strategy=mixln", "norm_options.alpha=0.5"])
    assert cfg.norm_options == {"alpha": 0.5}
    model = zoo.build(cfg, device="meta")
    assert [b.strategy.post for b in model.blocks] == [True, True, False, False]
    deep = zoo.get_config("tiny-dense-deepnorm", {"norm_options": {"alpha": 2.0}})
    assert deep.norm_options == {"alpha": 2.0}


# ---------------------------------------------------------------------------------------------
# Errors name the key
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, needles", [
    (["d_modle=64"], ["'d_modle'", "did you mean 'd_model'"]),
    ({"d_modle": 64}, ["'d_modle'", "did you mean 'd_model'"]),
    (["attention.rope_thta=1.0"], ["'attention.rope_thta'", "rope_theta"]),
    ({"attention": {"rope_thta": 1.0}}, ["'attention.rope_thta'", "rope_theta"]),
    (["ffn.hiden_size=64"], ["'ffn.hiden_size'", "hidden_size"]),
    (["totally_new_key=1"], ["'totally_new_key'"]),
], ids=["dotlist", "mapping", "nested-dotlist", "nested-mapping", "ffn", "no-near-miss"])
def test_unknown_key(overrides, needles):
    with pytest.raises(zoo.ConfigError) as info:
        zoo.get_config(TINY, overrides)
    msg = str(info.value)
    assert "unknown config key" in msg
    for needle in needles:
        assert needle in msg, msg


def test_unknown_key_without_near_miss_has_no_suggestion():
    with pytest.raises(zoo.ConfigError) as info:
        zoo.get_config(TINY, ["totally_new_key=1"])
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("overrides, key", [
    (["n_layers=abc"], "n_layers"),
    (["attention.rope_theta=fast"], "attention.rope_theta"),
    ({"tie_embeddings": "maybe"}, "tie_embeddings"),
    ({"d_model": [1, 2]}, "d_model"),
    ({"ffn": {"hidden_size": "big"}}, "ffn.hidden_size"),
    ({"attention": 5}, "attention"),
    (["ffn=7"], "ffn"),
])
def test_wrong_type_names_the_key(overrides, key):
    with pytest.raises(zoo.ConfigError) as info:
        zoo.get_config(TINY, overrides)
    assert repr(key) in str(info.value), str(info.value)


@pytest.mark.parametrize("item", ["n_layers", "norm_strategy:prenorm", ""])
def test_dotlist_item_without_equals(item):
    with pytest.raises(zoo.ConfigError) as info:
        zoo.get_config(TINY, ["n_heads=4", item])
    assert repr(item) in str(info.value) and "KEY=VALUE" in str(info.value)


def test_config_errors_are_value_errors():
    assert issubclass(zoo.ConfigError, ValueError) and issubclass(zoo.ConfigError, zoo.ZooError)


# ---------------------------------------------------------------------------------------------
# Plugin options
# ---------------------------------------------------------------------------------------------
def test_plugin_option_near_miss_is_suggested():
    with pytest.raises(zoo.ConfigError) as info:
        zoo.get_config("tiny-dense-mixln", ["norm_options.alfa=0.5"])
    msg = str(info.value)
    assert "norm_options.alfa" in msg and "'mixln'" in msg
    assert "did you mean 'alpha'" in msg
    assert "it takes: alpha" in msg


def test_plugin_option_wrong_type():
    with pytest.raises(zoo.ConfigError) as info:
        zoo.get_config("tiny-dense-mixln", ["norm_options.alpha=lots"])
    assert "norm_options.alpha" in str(info.value) and "mixln" in str(info.value)


@pytest.mark.parametrize("overrides, needles", [
    (["norm_options.alpha=0.5"], ["norm_options", "alpha", "'prenorm'", "takes no options"]),
    (["attention.options.window=4"], ["attention.options", "window", "'mha'"]),
])
def test_options_for_a_component_without_options(overrides, needles):
    with pytest.raises(zoo.ConfigError) as info:
        zoo.get_config(TINY, overrides)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_options_checked_after_the_strategy_changes():
    # options valid for mixln are rejected once the override switches to a strategy without them
    with pytest.raises(zoo.ConfigError, match="takes no options"):
        zoo.get_config("tiny-dense-mixln", ["norm_options.alpha=0.5", "norm_strategy=prenorm"])


def test_norm_layer_options_checked_against_the_layer():
    cfg = zoo.get_config(TINY, ["norm_layer=layernorm", "norm_layer_options.bias=false"])
    assert cfg.norm_layer_options == {"bias": False}
    with pytest.raises(zoo.ConfigError) as info:
        zoo.get_config(TINY, ["norm_layer_options.bias=false"])  # rmsnorm has no bias
    assert "norm_layer_options" in str(info.value) and "'rmsnorm'" in str(info.value)


def test_option_value_out_of_range_fails_at_build():
    with pytest.raises(zoo.ConfigError, match="alpha"):
        zoo.build("tiny-dense-mixln", ["norm_options.alpha=1.5"], device="meta")


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, needles", [
    (["n_heads=3"], ["d_model (128)", "n_heads (3)", "head_dim"]),
    (["n_kv_heads=3"], ["n_heads (4)", "n_kv_heads (3)"]),
    (["n_kv_heads=0"], ["n_kv_heads"]),
    (["d_model=12", "n_heads=4"], ["head size (3)", "even"]),
    (["head_dim=5"], ["head size (5)", "even"]),
    (["n_layers=0"], ["n_layers", "positive"]),
    (["d_model=-8"], ["d_model", "positive"]),
    (["ffn.hidden_size=0"], ["ffn.hidden_size"]),
    (["attention.sliding_window=0"], ["attention.sliding_window"]),
    (["ffn.type=sparse"], ["ffn.type", "'sparse'"]),
], ids=["heads-divide-d", "kv-heads-divide-heads", "kv-heads-zero", "odd-head-size", "odd-head-dim",
        "zero-layers", "negative-d", "zero-ffn", "zero-window", "ffn-type"])
def test_inconsistent_shapes(overrides, needles):
    with pytest.raises(zoo.ConfigError) as info:
        zoo.get_config(TINY, overrides)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_head_dim_makes_indivisible_d_model_legal():
    cfg = zoo.get_config(TINY, ["n_heads=3", "head_dim=32"])
    assert cfg.head_size == 32
    model = zoo.build(cfg, device="meta")
    assert model(__import__("torch").zeros(1, 4, dtype=__import__("torch").long, device="meta")).logits.shape == (1, 4, 256)


# ---------------------------------------------------------------------------------------------
# YAML round trip
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-dense-prenorm", "tiny-dense-mixln", "olmo2-1b-hybridnorm-star"])
def test_to_yaml_round_trips(name, tmp_path):
    cfg = zoo.get_config(name, ["norm_options.alpha=0.5"] if name.endswith("mixln") else None)
    text = cfg.to_yaml()
    assert zoo.get_config(name, OmegaConf.create(text)) == cfg
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    assert zoo.get_config(name, OmegaConf.load(path)) == cfg
    assert merge_config(path) == cfg  # a YAML path alone rebuilds the whole config
    assert zoo.get_config(name, str(path)) == cfg
    assert dataclasses.asdict(cfg) == cfg.to_dict()


def test_yaml_overrides_from_another_variant(tmp_path):
    other = zoo.get_config("olmo2-1b-prenorm")
    path = tmp_path / "olmo.yaml"
    path.write_text(other.to_yaml())
    assert zoo.get_config(TINY, path) == other


def test_bad_yaml_files(tmp_path):
    with pytest.raises(zoo.ConfigError, match="not found"):
        zoo.get_config(TINY, str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: [1, 2\n")
    with pytest.raises(zoo.ConfigError, match="not valid YAML"):
        zoo.get_config(TINY, bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(zoo.ConfigError, match="mapping"):
        zoo.get_config(TINY, scalar)
