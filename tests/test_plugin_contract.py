"""The plugin contract's rough edges that a new plugin author met (issue 20), each with its exact message:
options kept by every base class, checkpoints that name the packages their plugins came from, conflicts that
make only their own names unusable, --set on generate and eval, cards from the built model's per-layer
settings, resuming a finished run, and zoo.Router exported as the errors name it."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import zoo
from zoo.cli import main
from zoo.errors import MissingPluginError
from zoo.registry import Registry


@dataclass
class _Opts:
    scale: float = 2.0


class OptionReadingAttention(zoo.Attention):
    """An attention whose reset_parameters reads self.options, as the strategy tutorial's does."""

    Options = _Opts

    def __init__(self, cfg, layer, make_norm, *, qkv_norm=(), qkv_norm_width="head", options=None):
        super().__init__(cfg, layer, make_norm, qkv_norm=qkv_norm, qkv_norm_width=qkv_norm_width, options=options)
        self.proj = torch.nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.gain = torch.nn.Parameter(torch.empty(1))
        self.add_qkv_norms(cfg.head_size, (cfg.d_model,) * 3)
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.constant_(self.gain, self.options.scale)

    def forward(self, x):
        return self.gain * self.proj(x.cumsum(1) / torch.arange(1, x.shape[1] + 1)[:, None])

    def init_weights(self, init):
        init(self.proj.weight, "o")


class PerLayerQK(zoo.NormStrategy):
    """Pre-norm with QK-norm in every layer but the first, set per instance in __init__."""

    norms = ("attn_norm", "ffn_norm")

    def __init__(self, cfg, layer, make_norm, options=None):
        super().__init__(cfg, layer, make_norm, options)
        self.qkv_norm = ("q", "k") if layer else ()

    def forward(self, x, attn, ffn):
        h = x + attn(self.attn_norm(x))
        return h + ffn(self.ffn_norm(h))


class _Plugin:
    @zoo.hookimpl
    def register_attention(self, register):
        register("option-reader", OptionReadingAttention)

    @zoo.hookimpl
    def register_norm_strategies(self, register):
        register("per-layer-qk", PerLayerQK)


@pytest.fixture
def plugin():
    zoo.register_plugin(_Plugin(), "contract-test")
    yield
    zoo.unregister_plugin("contract-test")


def test_every_base_class_keeps_its_options(plugin):
    model = zoo.build("tiny-dense-prenorm", ["attention.type=option-reader", "attention.options.scale=3"])
    attn = model.blocks[0].attn
    assert attn.options == _Opts(3.0) and attn.gain.item() == 3.0
    moe = zoo.build("tiny-moe-mixln", ["moe.router=switch", "moe.top_k=1", "moe.router_options.capacity_factor=2"])
    assert moe.blocks[0].strategy.options.alpha == 0.25
    assert moe.blocks[0].ffn.router.options.capacity_factor == 2.0


def _retag(path, plugins):
    """Rewrite a checkpoint's recorded plugins, as a package that provided them would have left them."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**meta, "plugins": json.dumps(plugins)})


def test_a_checkpoint_records_its_plugins_and_names_what_to_install(plugin, tmp_path):
    path = zoo.save(zoo.build("tiny-dense-prenorm", ["norm_strategy=per-layer-qk", "attention.type=option-reader"]),
                    tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        recorded = {(r["kind"], r["name"]): r for r in json.loads(f.metadata()["plugins"])}
    assert recorded["norm strategy", "per-layer-qk"] == {"kind": "norm strategy", "name": "per-layer-qk",
                                                         "plugin": "contract-test", "dist": None, "version": None}
    assert recorded["norm layer", "rmsnorm"]["dist"] == "hybridnorm-zoo"
    zoo.unregister_plugin("contract-test")
    try:
        with pytest.raises(MissingPluginError) as e:
            zoo.load(path)
        assert str(e.value) == (f"{path} uses plugins that are not installed: norm strategy 'per-layer-qk', attention "
                                "'option-reader' (registered at run time by plugin 'contract-test', from no installed "
                                "package: register it again with zoo.register_plugin)")
        _retag(path, [{"kind": "norm strategy", "name": "per-layer-qk", "plugin": "my-norms", "dist": "my-zoo-norms",
                       "version": "1.0.0"},
                      {"kind": "attention", "name": "option-reader", "plugin": "attn", "dist": "zoo-attn", "version": "0.3"}])
        with pytest.raises(MissingPluginError) as e:
            zoo.load(path)
        assert str(e.value) == (f"{path} uses plugins that are not installed: norm strategy 'per-layer-qk' (from "
                                "my-zoo-norms 1.0.0: pip install my-zoo-norms); attention 'option-reader' (from zoo-attn "
                                "0.3: pip install zoo-attn)")
        assert main(["eval", str(path)]) == 2  # one line, no traceback, no "did you mean"
    finally:
        zoo.register_plugin(_Plugin(), "contract-test")


def test_a_conflict_makes_only_its_names_unusable(fake_entry_points, monkeypatch, capsys):
    source = """
        import zoo
        @zoo.hookimpl
        def register_variants(register):
            register("tiny-dense-prenorm", {"n_layers": 1})
            register("clash-free-variant", {"n_layers": 1})
    """
    fake_entry_points({"clashing": source})
    registry = Registry()
    for module in ("zoo.registry", "zoo.api", "zoo.builder"):
        monkeypatch.setattr(f"{module}.REGISTRY", registry)
    assert main(["list", "tiny-dense-p*"]) == 0  # the others list; the conflicting one is left out, and said why
    out, err = capsys.readouterr()
    assert "tiny-dense-postnorm" in out and "tiny-dense-prenorm" not in out
    assert ("zoo: warning: variant 'tiny-dense-prenorm' is left out: plugins 'zoo.variants' and 'clashing' both "
            "register it (see `zoo plugins`; disable one, e.g. ZOO_DISABLE_PLUGINS=clashing)") in err
    assert main(["list", "clash-*"]) == 0 and "clash-free-variant" in capsys.readouterr().out
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "clashing  (entry point " in out and "[conflict: 1 name unusable]" in out
    assert ("    conflict: variant 'tiny-dense-prenorm' (also registered by 'zoo.variants'); unusable until one of "
            "them is disabled (ZOO_DISABLE_PLUGINS)") in out
    assert main(["plugins", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["zoo.variants"]["conflicts"] == ["variant 'tiny-dense-prenorm' (also registered by 'clashing')"]


def test_generate_and_eval_take_set(capsys):
    assert main(["generate", "tiny-dense-prenorm", "--set", "norm_strategy=mixln", "--set", "n_layers=2",
                 "--prompt", "ab", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    losses = []
    for extra in ([], ["--set", "norm_strategy=hybridnorm"]):
        assert main(["eval", "tiny-dense-prenorm", *extra, "--max-tokens", "512", "--seq-len", "64", "--json"]) == 0
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    assert losses[0] != losses[1]  # another placement, so another (untrained) model
    assert main(["generate", "tiny-dense-prenorm", "--set", "norm_strategy=nope", "--prompt", "a"]) == 2
    assert "zoo: error: unknown norm strategy 'nope'." in capsys.readouterr().err


class _Variants:
    @zoo.hookimpl
    def register_variants(self, register):
        register("per-layer-qk-tiny", zoo.Variant(config=[{"n_layers": 4, "norm_strategy": "per-layer-qk"}]))
        register("qknorm-full-tiny", zoo.Variant(config=[{"norm_strategy": "qknorm", "norm_options": {"width": "full"}}]))


def test_cards_read_the_per_layer_settings_of_the_built_model(plugin):
    from zoo.cards import render_card
    zoo.register_plugin(_Variants(), "contract-variants")
    try:
        per_layer, full = render_card("per-layer-qk-tiny"), render_card("qknorm-full-tiny")
    finally:
        zoo.unregister_plugin("contract-variants")
    assert "Normalized inside attention: layer 0: none; layers 1-3: q, k (width: head)." in per_layer
    assert "Normalized inside attention: q, k (width: full)." in full  # set from its options in __init__


def test_resuming_a_finished_run_reports_its_numbers(tmp_path, capsys):
    from zoo.train.trainer import TrainConfig, train
    tc = TrainConfig(steps=2, batch_size=2, seq_len=32, eval_every=2)
    first = train("tiny-dense-prenorm", ["n_layers=1"], tc, out_dir=tmp_path, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    again = train("tiny-dense-prenorm", ["n_layers=1"], tc, out_dir=tmp_path, resume=True, progress=False)
    assert (again.final_train_loss, again.final_val_loss) == (first.final_train_loss, first.final_val_loss)
    assert json.loads((tmp_path / "summary.json").read_text())["final_train_loss"] == summary["final_train_loss"]


def test_zoo_router_is_exported_as_the_registration_error_names_it():
    assert zoo.Router is zoo.moe.Router and zoo.RouterContext is zoo.moe.RouterContext

    class NotARouter:
        @zoo.hookimpl
        def register_routers(self, register):
            register("not-a-router", torch.nn.Module)

    with pytest.raises(zoo.PluginError) as e:
        zoo.register_plugin(NotARouter(), "not-a-router")
    assert str(e.value) == ("plugin 'not-a-router' failed to register: TypeError: router 'not-a-router': expected a "
                            "subclass of zoo.Router, got <class 'torch.nn.modules.module.Module'>")


def test_zoo_check_takes_kind_name_where_a_name_exists_in_two_kinds(capsys):
    from zoo.plugins.attention import MultiHeadAttention

    class SameName:
        @zoo.hookimpl
        def register_attention(self, register):
            register("prenorm", MultiHeadAttention)

    zoo.register_plugin(SameName(), "same-name")
    try:
        assert main(["check", "prenorm", "--check", "options"]) == 2
        assert capsys.readouterr().err == ("zoo: error: 'prenorm' is registered as norm strategy and as attention; say "
                                           "which: norm-strategy:prenorm or attention:prenorm\n")
        assert main(["check", "attention:prenorm", "--check", "options"]) == 0
        assert capsys.readouterr().out == "attention:prenorm\n  PASS options\n1 passed, 0 failed, 0 not applicable\n"
        assert main(["check", "kernel:prenorm"]) == 2
        assert capsys.readouterr().err == ("zoo: error: unknown kind 'kernel' in 'kernel:prenorm'; the kinds are: "
                                           "norm-strategy, norm-layer, attention, router, variant\n")
    finally:
        zoo.unregister_plugin("same-name")
