"""A third-party norm plugin as its own pip-installed package, next to a broken one.

Both packages are installed once (one ``pip install --target``) into a private folder that the
child processes see through PYTHONPATH; the venv itself is never modified.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ZOO = str(Path(sys.executable).parent / "zoo")

GOOD_PYPROJECT = """
    [build-system]
    requires = ["setuptools>=64"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "my-zoo-norm"
    version = "0.1.0"
    description = "A scaled pre-norm strategy for hybridnorm-zoo"
    requires-python = ">=3.10"

    [project.entry-points.zoo]
    my-norm = "my_zoo_norm"

    [tool.setuptools]
    py-modules = ["my_zoo_norm"]
"""

GOOD_MODULE = '''
    """Scaled pre-norm: h = x + s A(N(x)); x' = h + s F(N(h)), with s from norm_options.scale."""
    from dataclasses import dataclass

    import zoo


    class ScaledPreNorm(zoo.NormStrategy):
        @dataclass
        class Options:
            scale: float = 1.0

        def __init__(self, cfg, layer, make_norm, options):
            super().__init__(cfg, layer, make_norm, options)
            self.scale = options.scale
            self.attn_norm = make_norm(cfg.d_model)
            self.ffn_norm = make_norm(cfg.d_model)

        def forward(self, x, attn, ffn):
            h = x + self.scale * attn(self.attn_norm(x))
            return h + self.scale * ffn(self.ffn_norm(h))


    @zoo.hookimpl
    def register_norm_strategies(register):
        register("scaled-prenorm", ScaledPreNorm)
'''

BROKEN_PYPROJECT = """
    [build-system]
    requires = ["setuptools>=64"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "zoo-broken-plugins"
    version = "0.0.1"

    [project.entry-points.zoo]
    broken-import = "zoo_broken_import"
    broken-hook = "zoo_broken_hook"

    [tool.setuptools]
    py-modules = ["zoo_broken_import", "zoo_broken_hook"]
"""

BROKEN_IMPORT = 'raise ImportError("zoo_broken_import needs the package not-installed-anywhere")\n'

BROKEN_HOOK = '''
    import zoo
    from zoo.plugins.norm_strategies import PreNorm


    @zoo.hookimpl
    def register_norm_layers(register):
        register("broken-layer", lambda dim, eps=1e-5: None)


    @zoo.hookimpl
    def register_norm_strategies(register):
        raise RuntimeError("the broken hook exploded")
'''

TRAIN = """
    import json, warnings
    import torch
    import zoo
    from zoo.registry import REGISTRY

    torch.manual_seed(0)
    model = zoo.build("tiny-dense-prenorm", ["norm_strategy=scaled-prenorm", "norm_options.scale=0.5"])
    strategy = model.blocks[0].strategy
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(0, 256, (4, 33))
    x, y = batch[:, :-1], batch[:, 1:]
    losses = []
    for step in range(30):
        loss = model(x, targets=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(json.dumps({
        "first": losses[0], "last": losses[-1], "finite": all(l == l for l in losses),
        "strategy": type(strategy).__module__ + "." + type(strategy).__name__, "scale": strategy.scale,
        "owner": REGISTRY.owner("norm strategy", "scaled-prenorm"),
        "has_broken_layer": "broken-layer" in REGISTRY.names("norm layer"),
    }))
"""


def _write(root: Path, files: dict[str, str]) -> Path:
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    return root


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("third_party")
    good = _write(tmp / "my-zoo-norm", {"pyproject.toml": GOOD_PYPROJECT, "my_zoo_norm.py": GOOD_MODULE})
    broken = _write(tmp / "zoo-broken-plugins", {"pyproject.toml": BROKEN_PYPROJECT, "zoo_broken_import.py": BROKEN_IMPORT,
                                                 "zoo_broken_hook.py": BROKEN_HOOK})
    target = tmp / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--disable-pip-version-check", "-q", "--target", str(target), str(good), str(broken)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / "my_zoo_norm.py").exists()
    assert list(target.glob("my_zoo_norm-0.1.0.dist-info/entry_points.txt"))
    return target


@pytest.fixture(scope="module")
def runs(site, subprocess_env):
    """Train with the plugin and list the plugins, concurrently, all with the packages on PYTHONPATH."""
    env = subprocess_env(PYTHONPATH=str(site))
    commands = {
        "train": [sys.executable, "-c", textwrap.dedent(TRAIN)],
        "plugins": [ZOO, "plugins", "--json"],
        "plugins-disabled": [ZOO, "plugins", "--json"],
    }
    envs = {"plugins-disabled": subprocess_env(PYTHONPATH=str(site), ZOO_DISABLE_PLUGINS="broken-*")}
    procs = {key: subprocess.Popen(cmd, env=envs.get(key, env), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for key, cmd in commands.items()}
    results = {}
    for key, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[key] = subprocess.CompletedProcess(commands[key], p.returncode, out, err)
    return results


def test_the_venv_is_untouched():
    """The packages live only in the private --target folder."""
    import importlib.metadata

    names = {d.metadata["Name"] for d in importlib.metadata.distributions()}
    assert "my-zoo-norm" not in names and "zoo-broken-plugins" not in names


def test_installed_plugin_builds_and_trains(runs):
    r = runs["train"]
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["strategy"] == "my_zoo_norm.ScaledPreNorm"
    assert out["scale"] == 0.5  # its Options were filled from norm_options
    assert out["owner"] == "my-norm"
    assert out["finite"]
    assert out["last"] < out["first"] - 1.0, out  # 30 AdamW steps on one batch: the loss drops well
    assert not out["has_broken_layer"]  # a failing plugin is skipped whole


def test_broken_plugins_are_reported_by_name_on_stderr(runs):
    err = runs["train"].stderr
    assert "Traceback" not in err
    assert "zoo plugin 'broken-import' skipped" in err
    assert "ImportError: zoo_broken_import needs the package not-installed-anywhere" in err
    assert "zoo plugin 'broken-hook' skipped" in err
    assert "RuntimeError: the broken hook exploded" in err
    assert "my-norm" not in err


def test_plugins_json_lists_the_third_party_plugin(runs):
    r = runs["plugins"]
    assert r.returncode == 0, r.stderr
    records = {rec["name"]: rec for rec in json.loads(r.stdout)}
    my = records["my-norm"]
    assert my["status"] == "ok" and my["error"] is None
    assert my["registered"] == {"norm strategy": ["scaled-prenorm"]}
    assert "my_zoo_norm" in my["source"] and "my-zoo-norm 0.1.0" in my["source"]
    for name in ("zoo.norm_layers", "zoo.norm_strategies", "zoo.attention", "zoo.variants"):
        assert records[name]["status"] == "ok"


def test_plugins_json_shows_failed_plugins_with_their_errors(runs):
    r = runs["plugins"]
    records = {rec["name"]: rec for rec in json.loads(r.stdout)}
    imp, hook = records["broken-import"], records["broken-hook"]
    assert imp["status"] == "failed" and "ImportError" in imp["error"] and "not-installed-anywhere" in imp["error"]
    assert hook["status"] == "failed" and "RuntimeError: the broken hook exploded" in hook["error"]
    assert imp["registered"] == {} and hook["registered"] == {}
    assert "zoo-broken-plugins 0.0.1" in imp["source"]
    # the CLI reports them as one-line warnings, not tracebacks
    assert "zoo: warning: zoo plugin 'broken-import' skipped" in r.stderr
    assert "zoo: warning: zoo plugin 'broken-hook' skipped" in r.stderr
    assert "Traceback" not in r.stderr


def test_disabling_the_broken_plugins_silences_them(runs):
    r = runs["plugins-disabled"]
    assert r.returncode == 0, r.stderr
    records = {rec["name"]: rec for rec in json.loads(r.stdout)}
    assert records["broken-import"]["status"] == records["broken-hook"]["status"] == "disabled"
    assert records["my-norm"]["status"] == "ok"
    assert "'broken-" not in r.stderr
