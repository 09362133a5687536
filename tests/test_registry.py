"""The plugin registry: lookups, run-time plugins, isolation of bad plugins, entry points, env vars."""
from __future__ import annotations

import importlib.metadata
import inspect
import json
import subprocess
import sys
import textwrap
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from zoo.plugins.norm_layers import RMSNorm
from zoo.plugins.norm_strategies import PreNorm

import zoo
from zoo import hookspecs
from zoo.registry import REGISTRY, PluginWarning, Registry

pytestmark = pytest.mark.usefixtures("registry_unchanged")

TINY = "tiny-dense-prenorm"
REPO = Path(__file__).resolve().parents[1]


def _runs(name: str = TINY, overrides=None) -> None:
    """Build a small model and run forward + backward: the zoo still works."""
    torch.manual_seed(0)
    model = zoo.build(name, ["n_layers=1", "d_model=32", "n_heads=2", "ffn.hidden_size=64", *(overrides or [])])
    idx = torch.randint(0, 256, (2, 8))
    out = model(idx, targets=idx)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def _plugin_names() -> list[str]:
    return [r.name for r in REGISTRY.plugins()]


# ---------------------------------------------------------------------------------------------
# Unknown names
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, kind, typo, match", [
    ("norm_strategy=hybrdnorm", "norm strategy", "hybrdnorm", "hybridnorm"),
    ("norm_layer=rmsnrom", "norm layer", "rmsnrom", "rmsnorm"),
    ("norm_layer=layrenorm", "norm layer", "layrenorm", "layernorm"),
    ("attention.type=mhaa", "attention", "mhaa", "mha"),
])
def test_unknown_component_lists_available_and_closest(override, kind, typo, match):
    with pytest.raises(zoo.UnknownNameError) as info:
        zoo.build(TINY, [override])
    err = info.value
    msg = str(err)
    assert err.kind == kind and err.name == typo
    assert f"unknown {kind} {typo!r}" in msg
    assert f"Did you mean {match!r}?" in msg
    assert "Available:" in msg
    for name in REGISTRY.names(kind):
        assert name in msg
    assert err.available == REGISTRY.names(kind)
    assert isinstance(err, LookupError) and isinstance(err, zoo.ZooError)


def test_unknown_variant_lists_available_and_closest():
    with pytest.raises(zoo.UnknownNameError) as info:
        zoo.build("tiny-dense-hybrdnorm")
    msg = str(info.value)
    assert "unknown variant 'tiny-dense-hybrdnorm'" in msg
    assert "Did you mean 'tiny-dense-hybridnorm'?" in msg
    for name in zoo.list_models("tiny-dense-*") + zoo.list_models("olmo2-*"):
        assert name in msg
    for getter in (zoo.get_config, zoo.stats):
        with pytest.raises(zoo.UnknownNameError, match="Did you mean 'tiny-dense-hybridnorm'"):
            getter("tiny-dense-hybrdnorm")


def test_unknown_name_without_close_match_has_no_hint():
    with pytest.raises(zoo.UnknownNameError) as info:
        REGISTRY.get("norm strategy", "zzzzzzzzzzzz")
    assert "Did you mean" not in str(info.value)
    assert "prenorm" in str(info.value)


def test_variant_names_are_lowercase_and_valid():
    names = zoo.list_models()
    assert names, "no variants registered"
    for name in names:
        assert name == name.lower()
        assert zoo.registry.NAME_RE.match(name)
    assert zoo.list_models("TINY-*") == []


# ---------------------------------------------------------------------------------------------
# Run-time plugins
# ---------------------------------------------------------------------------------------------
class GatedPreNorm(zoo.NormStrategy):
    """Pre-norm with a learnable residual gate per sublayer, starting at ``Options.gate``; the plain
    PyTorch way: the gates get their values in ``__init__`` only."""

    @dataclass
    class Options:
        gate: float = 0.5

    def __init__(self, cfg, layer, make_norm, options):
        super().__init__(cfg, layer, make_norm, options)
        self.attn_norm = make_norm(cfg.d_model)
        self.ffn_norm = make_norm(cfg.d_model)
        self.gate = options.gate
        self.g_attn = torch.nn.Parameter(torch.full((1,), options.gate))
        self.g_ffn = torch.nn.Parameter(torch.full((1,), options.gate))

    def forward(self, x, attn, ffn):
        h = x + self.g_attn * attn(self.attn_norm(x))
        return h + self.g_ffn * ffn(self.ffn_norm(h))


class ReZeroish(GatedPreNorm):
    """The same, with ``reset_parameters`` (zoo.build allocates on meta first, then initializes)."""

    def reset_parameters(self):
        torch.nn.init.constant_(self.g_attn, self.gate)
        torch.nn.init.constant_(self.g_ffn, self.gate)


class StrategyPlugin:
    @zoo.hookimpl
    def register_norm_strategies(self, register):
        register("rezeroish", ReZeroish)


def test_runtime_plugin_adds_norm_strategy_that_builds_and_trains(runtime_plugin):
    assert "rezeroish" not in REGISTRY.names("norm strategy")
    runtime_plugin(StrategyPlugin(), "test-rezeroish")
    assert "rezeroish" in REGISTRY.names("norm strategy")
    assert REGISTRY.owner("norm strategy", "rezeroish") == "test-rezeroish"
    record = next(r for r in REGISTRY.plugins() if r.name == "test-rezeroish")
    assert record.status == "ok" and record.registered == {"norm strategy": ["rezeroish"]}
    assert "runtime" in record.source

    torch.manual_seed(0)
    model = zoo.build(TINY, ["norm_strategy=rezeroish", "norm_options.gate=0.25"])
    assert model.cfg.norm_strategy == "rezeroish"
    assert all(isinstance(b.strategy, ReZeroish) for b in model.blocks)
    assert all(float(b.strategy.g_attn.detach()) == pytest.approx(0.25) for b in model.blocks)
    idx = torch.randint(0, 256, (2, 16))
    out = model(idx, targets=idx)
    assert out.logits.shape == (2, 16, 256)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.blocks[0].strategy.g_attn.grad is not None
    # its Options are checked like a built-in's
    with pytest.raises(zoo.ConfigError, match="gate"):
        zoo.get_config(TINY, ["norm_strategy=rezeroish", "norm_options.gat=1.0"])


def test_strategy_parameters_set_in_init_survive_build(runtime_plugin):
    class Plugin:
        @zoo.hookimpl
        def register_norm_strategies(self, register):
            register("test-init-only", GatedPreNorm)

    runtime_plugin(Plugin(), "test-init-only")
    torch.manual_seed(0)
    model = zoo.build(TINY, ["norm_strategy=test-init-only", "norm_options.gate=0.25"])
    gates = [float(b.strategy.g_attn.detach()) for b in model.blocks] + \
            [float(b.strategy.g_ffn.detach()) for b in model.blocks]
    assert gates == pytest.approx([0.25] * len(gates))


def test_unregister_removes_everything_the_plugin_registered():
    zoo.register_plugin(StrategyPlugin(), name="test-temporary")
    try:
        assert "rezeroish" in REGISTRY.names("norm strategy")
    finally:
        zoo.unregister_plugin("test-temporary")
    assert "test-temporary" not in _plugin_names()
    with pytest.raises(zoo.UnknownNameError, match="unknown norm strategy 'rezeroish'"):
        zoo.build(TINY, ["norm_strategy=rezeroish"])
    with pytest.raises(zoo.PluginError, match="test-temporary"):
        zoo.unregister_plugin("test-temporary")


def test_runtime_plugin_as_module_registers_layer_and_variant(runtime_plugin):
    module = types.ModuleType("my_notebook_plugin")

    @zoo.hookimpl
    def register_norm_layers(register):
        register("test-rms", RMSNorm)

    @zoo.hookimpl
    def register_variants(register):
        register("test-micro", {"d_model": 32, "n_layers": 1, "n_heads": 2, "ffn": {"hidden_size": 64},
                                "norm_layer": "test-rms"})
        register("test-micro-v", zoo.Variant(config=[{"d_model": 32, "n_layers": 2, "n_heads": 2}],
                                             description="micro"))

    module.register_norm_layers = register_norm_layers
    module.register_variants = register_variants
    runtime_plugin(module, "test-module-plugin")
    assert zoo.list_models("test-micro*") == ["test-micro", "test-micro-v"]
    _runs("test-micro")
    assert zoo.get_config("test-micro-v").n_layers == 2
    assert zoo.stats("test-micro", seq_len=4).total_params > 0


def test_plugin_name_must_be_unique(runtime_plugin):
    runtime_plugin(StrategyPlugin(), "test-once")

    class Empty:
        pass

    with pytest.raises(zoo.PluginError, match="'test-once' is already registered"):
        zoo.register_plugin(Empty(), name="test-once")
    with pytest.raises(zoo.PluginError, match="'zoo.norm_strategies' is already registered"):
        zoo.register_plugin(Empty(), name="zoo.norm_strategies")


# ---------------------------------------------------------------------------------------------
# Duplicates and bad plugins: rejected whole, naming the plugin and the cause
# ---------------------------------------------------------------------------------------------
class DuplicatePrenorm:
    @zoo.hookimpl
    def register_norm_layers(self, register):
        register("test-dup-layer", RMSNorm)  # valid, but must not survive the rejection

    @zoo.hookimpl
    def register_norm_strategies(self, register):
        register("prenorm", PreNorm)


def test_duplicate_name_names_both_plugins():
    before = _plugin_names()
    with pytest.raises(zoo.PluginError) as info:
        zoo.register_plugin(DuplicatePrenorm(), name="test-dup")
    msg = str(info.value)
    assert "'prenorm'" in msg and "'zoo.norm_strategies'" in msg and "'test-dup'" in msg
    assert _plugin_names() == before
    assert "test-dup-layer" not in REGISTRY.names("norm layer")
    assert REGISTRY.owner("norm strategy", "prenorm") == "zoo.norm_strategies"
    _runs()


def test_duplicate_name_within_one_plugin_is_rejected():
    class Twice:
        @zoo.hookimpl
        def register_norm_layers(self, register):
            register("test-twice", RMSNorm)
            register("test-twice", RMSNorm)

    try:
        with pytest.raises(zoo.PluginError, match="test-twice"):
            zoo.register_plugin(Twice(), name="test-twice-plugin")
        assert "test-twice" not in REGISTRY.names("norm layer")
    finally:
        if "test-twice-plugin" in _plugin_names():
            zoo.unregister_plugin("test-twice-plugin")


class HookRaises:
    @zoo.hookimpl
    def register_norm_strategies(self, register):
        raise RuntimeError("boom in the hook")


class StrategyNotASubclass:
    @zoo.hookimpl
    def register_norm_strategies(self, register):
        register("test-not-a-strategy", torch.nn.Module)


class VariantIsInt:
    @zoo.hookimpl
    def register_variants(self, register):
        register("test-int-variant", 42)


class AttentionNotASubclass:
    @zoo.hookimpl
    def register_attention(self, register):
        register("test-attn", PreNorm)


class LayerNotCallable:
    @zoo.hookimpl
    def register_norm_layers(self, register):
        register("test-good-layer", RMSNorm)
        register("test-bad-layer", 5)


class EvilName:
    @zoo.hookimpl
    def register_variants(self, register):
        register("../evil", {"n_layers": 1})


class UpperName:
    @zoo.hookimpl
    def register_norm_layers(self, register):
        register("Upper", RMSNorm)


class SlashName:
    @zoo.hookimpl
    def register_norm_strategies(self, register):
        register("a/b", PreNorm)


@pytest.mark.parametrize("plugin, name, cause", [
    (HookRaises(), "test-raises", "RuntimeError: boom in the hook"),
    (StrategyNotASubclass(), "test-not-sub", "expected a subclass of zoo.NormStrategy"),
    (VariantIsInt(), "test-int-variant-plugin", "variant 'test-int-variant': expected a zoo.Variant"),
    (AttentionNotASubclass(), "test-attn-plugin", "expected a subclass of zoo.Attention"),
    (LayerNotCallable(), "test-layers", "norm layer 'test-bad-layer': expected a callable"),
    (EvilName(), "test-evil", "invalid variant name '../evil'"),
    (UpperName(), "test-upper", "invalid norm layer name 'Upper'"),
    (SlashName(), "test-slash", "invalid norm strategy name 'a/b'"),
], ids=["hook-raises", "strategy-not-subclass", "variant-int", "attention-not-subclass", "layer-not-callable",
        "name-dotdot", "name-upper", "name-slash"])
def test_bad_plugin_is_rejected_whole_and_zoo_keeps_working(plugin, name, cause, runtime_plugin):
    before = {kind: REGISTRY.names(kind) for kind in ("norm strategy", "norm layer", "attention", "variant")}
    plugins_before = _plugin_names()
    with pytest.raises(zoo.PluginError) as info:
        zoo.register_plugin(plugin, name=name)
    msg = str(info.value)
    assert repr(name) in msg, msg
    assert cause in msg, msg
    # nothing of it stays: not the plugin, not its valid registrations
    assert _plugin_names() == plugins_before
    assert {kind: REGISTRY.names(kind) for kind in before} == before
    _runs()
    # and the name is free for a corrected plugin
    runtime_plugin(StrategyPlugin(), name)
    _runs(overrides=["norm_strategy=rezeroish"])


def test_misspelled_hook_is_rejected():
    class Typo:
        @zoo.hookimpl
        def register_nrom_layers(self, register):
            register("test-typo", RMSNorm)

    try:
        with pytest.raises(zoo.PluginError, match="register_nrom_layers"):
            zoo.register_plugin(Typo(), name="test-typo-plugin")
    finally:
        if "test-typo-plugin" in _plugin_names():
            zoo.unregister_plugin("test-typo-plugin")


# ---------------------------------------------------------------------------------------------
# The contract is documented
# ---------------------------------------------------------------------------------------------
def test_every_hookspec_has_a_docstring():
    specs = {name: fn for name, fn in vars(hookspecs).items()
             if callable(fn) and getattr(fn, "zoo_spec", None) is not None}
    assert set(specs) == {"register_norm_strategies", "register_norm_layers", "register_attention",
                          "register_routers", "register_variants"}
    for name, fn in specs.items():
        doc = inspect.getdoc(fn)
        assert doc and len(doc) > 40, f"hookspec {name} has no useful docstring"
        assert "register(" in doc, f"hookspec {name}'s docstring has no example"
        assert list(inspect.signature(fn).parameters) == ["register"]
    assert inspect.getdoc(hookspecs)


# ---------------------------------------------------------------------------------------------
# Entry points through a fresh Registry (in-process, fake entry points)
# ---------------------------------------------------------------------------------------------
ALT_PRENORM = """
    import zoo
    from zoo.plugins.norm_strategies import PreNorm

    class AltPreNorm(PreNorm):
        pass

    @zoo.hookimpl
    def register_norm_strategies(register):
        register("test-shared", {cls})
"""


def test_entry_point_conflict_makes_name_fail_naming_both(fake_entry_points):
    fake_entry_points({"plugin-a": ALT_PRENORM.format(cls="PreNorm"),
                       "plugin-b": ALT_PRENORM.format(cls="AltPreNorm"),
                       "plugin-c": ALT_PRENORM.format(cls="AltPreNorm")})
    reg = Registry()
    assert "test-shared" in reg.names("norm strategy")  # listed, but it does not resolve
    with pytest.raises(zoo.PluginError) as info:
        reg.get("norm strategy", "test-shared")
    msg = str(info.value)
    assert "'plugin-a'" in msg and "'plugin-b'" in msg
    assert "ZOO_DISABLE_PLUGINS" in msg
    # every plugin loaded fine; other names are unaffected
    assert all(r.status == "ok" for r in reg.plugins())
    assert reg.get("norm strategy", "prenorm") is PreNorm
    # removing conflicting plugins one at a time leaves the survivor's registration resolvable
    reg.unregister_plugin("plugin-a")
    with pytest.raises(zoo.PluginError, match="plugin-b"):
        reg.get("norm strategy", "test-shared")
    reg.unregister_plugin("plugin-c")
    assert reg.get("norm strategy", "test-shared").__name__ == "AltPreNorm"
    assert reg.owner("norm strategy", "test-shared") == "plugin-b"


def test_entry_point_conflict_with_builtin(fake_entry_points):
    fake_entry_points({"shadow": ALT_PRENORM.replace('"test-shared"', '"prenorm"').format(cls="AltPreNorm")})
    reg = Registry()
    with pytest.raises(zoo.PluginError) as info:
        reg.get("norm strategy", "prenorm")
    assert "'zoo.norm_strategies'" in str(info.value) and "'shadow'" in str(info.value)
    assert reg.get("norm strategy", "hybridnorm").__name__ == "HybridNorm"


def test_failing_entry_points_are_isolated(fake_entry_points):
    fake_entry_points({
        "ep-import-error": "raise ImportError('needs a missing dependency')",
        "ep-hook-raises": """
            import zoo
            @zoo.hookimpl
            def register_norm_layers(register):
                raise ValueError('hook went wrong')
            """,
        "ep-wrong-type": """
            import zoo
            @zoo.hookimpl
            def register_variants(register):
                register('test-ok-first', {'n_layers': 1})
                register('test-int', 7)
            """,
        "ep-good": """
            import zoo
            from zoo.plugins.norm_layers import RMSNorm
            @zoo.hookimpl
            def register_norm_layers(register):
                register('test-ep-layer', RMSNorm)
            """,
    })
    reg = Registry()
    with pytest.warns(PluginWarning) as caught:
        records = {r.name: r for r in reg.plugins()}
    messages = [str(w.message) for w in caught]
    for name, why in [("ep-import-error", "ImportError: needs a missing dependency"),
                      ("ep-hook-raises", "ValueError: hook went wrong"),
                      ("ep-wrong-type", "variant 'test-int'")]:
        assert records[name].status == "failed"
        assert why in records[name].error
        assert any(f"zoo plugin {name!r} skipped" in m and why in m for m in messages), messages
    assert "failed to load" in records["ep-import-error"].error
    assert "failed to register" in records["ep-hook-raises"].error
    assert records["ep-good"].status == "ok"
    assert records["ep-good"].registered == {"norm layer": ["test-ep-layer"]}
    assert all(records[n].status == "ok" for n in CORE)
    assert "test-ok-first" not in reg.names("variant")  # a failed plugin is skipped whole
    assert "tiny-dense-prenorm" in reg.names("variant")
    assert reg.get("norm layer", "test-ep-layer") is RMSNorm
    with pytest.raises(zoo.UnknownNameError):
        reg.get("variant", "test-int")


# the built-in plugins ("zoo.*"; more may come, e.g. zoo.routers) and the three every test relies on
BUILTINS = frozenset(ep.name for ep in importlib.metadata.entry_points(group="zoo") if ep.name.startswith("zoo."))
CORE = frozenset({"zoo.norm_layers", "zoo.norm_strategies", "zoo.attention", "zoo.variants"})


def test_builtins_are_entry_points():
    assert CORE <= BUILTINS


@pytest.mark.parametrize("allow, block, expected_enabled", [
    ("zoo.*", None, BUILTINS),
    (None, "ext-*", BUILTINS),
    (None, "zoo.variants", (BUILTINS - {"zoo.variants"}) | {"ext-a", "ext-b"}),
    ("zoo.norm_strategies, zoo.attention,ext-a", None, {"zoo.norm_strategies", "zoo.attention", "ext-a"}),
    ("*", "ext-b,zoo.variants", (BUILTINS - {"zoo.variants"}) | {"ext-a"}),
], ids=["allow-builtins", "block-ext", "block-variants", "allow-list", "allow-all-block-two"])
def test_allow_and_block_patterns(fake_entry_points, monkeypatch, allow, block, expected_enabled):
    layer = """
        import zoo
        from zoo.plugins.norm_layers import RMSNorm
        @zoo.hookimpl
        def register_norm_layers(register):
            register({name!r}, RMSNorm)
        """
    fake_entry_points({"ext-a": layer.format(name="test-a"), "ext-b": layer.format(name="test-b")})
    for var, value in (("ZOO_PLUGINS", allow), ("ZOO_DISABLE_PLUGINS", block)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    reg = Registry()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)  # a built-in under construction may fail to load
        status = {r.name: r.status for r in reg.plugins()}
    assert set(status) == BUILTINS | {"ext-a", "ext-b"}
    assert {n for n, s in status.items() if s != "disabled"} == set(expected_enabled)
    for name in (CORE | {"ext-a", "ext-b"}) & set(expected_enabled):
        assert status[name] == "ok", (name, status)
    assert ("test-a" in reg.names("norm layer")) == ("ext-a" in expected_enabled)
    assert ("tiny-dense-prenorm" in reg.names("variant")) == ("zoo.variants" in expected_enabled)


# ---------------------------------------------------------------------------------------------
# The real global registry in fresh interpreters, with a hand-made installed distribution
# ---------------------------------------------------------------------------------------------
PROBE = """
    import json, sys, warnings
    warnings.simplefilter("default")
    import zoo
    from zoo.registry import REGISTRY
    out = {"plugins": {r.name: r.to_dict() for r in REGISTRY.plugins()},
           "variants": zoo.list_models("tiny-dense-*"),
           "layers": REGISTRY.names("norm layer"),
           "imported": sorted(m for m in ("zoo_ext_good", "zoo_ext_broken") if m in sys.modules)}
    try:
        m = zoo.build("tiny-dense-prenorm", ["n_layers=1", "norm_layer=ext-layer"]
                      if "ext-layer" in out["layers"] else ["n_layers=1"])
        out["build"] = float(m(m.embed.weight.new_zeros(1, 4).long(), targets=m.embed.weight.new_zeros(1, 4).long()).loss)
    except zoo.ZooError as e:
        out["build"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))
"""

SCENARIOS = {
    "default": {},
    # both variables, read by the global registry at first load: allow the built-ins, then block one
    "allow-and-block": {"ZOO_PLUGINS": "zoo.*", "ZOO_DISABLE_PLUGINS": "zoo.variants, nothing-*"},
}


@pytest.fixture(scope="module")
def probes(tmp_path_factory, subprocess_env):
    """Run every scenario's probe concurrently (fresh interpreters are the slow part)."""
    site = tmp_path_factory.mktemp("site")
    dist = site / "zoo_ext_test-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: zoo-ext-test\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[zoo]\next-good = zoo_ext_good\next-broken = zoo_ext_broken\n")
    (site / "zoo_ext_good.py").write_text(textwrap.dedent("""
        import zoo
        from zoo.plugins.norm_layers import RMSNorm
        @zoo.hookimpl
        def register_norm_layers(register):
            register("ext-layer", RMSNorm)
        """))
    (site / "zoo_ext_broken.py").write_text("raise ImportError('zoo_ext_broken needs numpy>=99')\n")
    procs = {}
    for key, extra in SCENARIOS.items():
        env = subprocess_env(PYTHONPATH=str(site), **extra)
        procs[key] = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PROBE)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for key, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"{key}: {err}"
        results[key] = (json.loads(out.strip().splitlines()[-1]), err)
    return results


def test_env_default_loads_all_and_reports_broken_entry_point(probes):
    out, err = probes["default"]
    plugins = out["plugins"]
    status = {n: p["status"] for n, p in plugins.items()}
    assert set(status) == BUILTINS | {"ext-good", "ext-broken"}
    assert all(status[n] == "ok" for n in CORE | {"ext-good"}), status
    assert status["ext-broken"] == "failed"
    assert "ImportError: zoo_ext_broken needs numpy>=99" in plugins["ext-broken"]["error"]
    assert "zoo plugin 'ext-broken' skipped" in err and "numpy>=99" in err
    assert "'ext-good'" not in err
    assert "Traceback" not in err
    assert plugins["ext-good"]["registered"] == {"norm layer": ["ext-layer"]}
    assert "zoo-ext-test 0.1" in plugins["ext-good"]["source"]
    assert isinstance(out["build"], float)  # built with the third-party norm layer
    assert out["imported"] == ["zoo_ext_good"]


def test_env_zoo_plugins_and_disable_plugins(probes):
    out, err = probes["allow-and-block"]
    status = {n: p["status"] for n, p in out["plugins"].items()}
    assert set(status) == BUILTINS | {"ext-good", "ext-broken"}
    assert status["zoo.norm_strategies"] == status["zoo.attention"] == "ok"
    assert status["zoo.variants"] == status["ext-good"] == status["ext-broken"] == "disabled"
    assert all(status[n] != "disabled" for n in BUILTINS - {"zoo.variants"})
    assert all(out["plugins"][n]["error"] is None for n in ("zoo.variants", "ext-good", "ext-broken"))
    assert "ext-layer" not in out["layers"] and "rmsnorm" in out["layers"]
    assert "'ext-" not in err
    assert out["imported"] == []  # a disabled plugin is not even imported
    assert out["variants"] == []
    assert out["build"].startswith("UnknownNameError: unknown variant 'tiny-dense-prenorm'")
