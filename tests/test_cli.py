"""The real `zoo` console script, run in subprocesses (all started at once: imports dominate)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import zoo

REPO = Path(__file__).resolve().parents[1]
ZOO = str(Path(sys.executable).parent / "zoo")

COMMANDS = {
    "list": [ZOO, "list", "tiny-dense-*", "--json"],
    "info-big": [ZOO, "info", "olmo2-1b-hybridnorm", "--json"],
    "info-set": [ZOO, "info", "tiny-dense-prenorm", "--set", "n_layers=2", "--set", "norm_strategy=hybridnorm",
                 "--seq-len", "16", "--json"],
    "plugins": [ZOO, "plugins", "--json"],
    "err-variant": [ZOO, "info", "tiny-dense-prenrom"],
    "err-key": [ZOO, "info", "tiny-dense-prenorm", "--set", "d_modle=64"],
    "err-value": [ZOO, "info", "tiny-dense-prenorm", "--set", "n_layers=abc", "--json"],
    "help": [ZOO, "--help"],
    "info-help": [sys.executable, "-m", "zoo", "info", "--help"],  # also checks zoo/__main__.py
}


@pytest.fixture(scope="module")
def results(subprocess_env):
    assert Path(ZOO).exists(), f"console script not installed at {ZOO}"
    env = subprocess_env()
    procs = {key: subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, cmd in COMMANDS.items()}
    out = {}
    for key, p in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        out[key] = subprocess.CompletedProcess(COMMANDS[key], p.returncode, stdout, stderr)
    return out


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args}: rc={result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def test_console_script_is_on_path(subprocess_env):
    assert shutil.which("zoo", path=subprocess_env()["PATH"]) == ZOO


def test_list_json(results):
    rows = json.loads(_ok(results["list"]).stdout)
    assert [r["name"] for r in rows] == zoo.list_models("tiny-dense-*")
    for row in rows:
        assert set(row) == {"name", "norm_strategy", "ffn", "total_params", "active_params"}
        assert row["ffn"] == "dense"
        assert row["norm_strategy"] == zoo.get_config(row["name"]).norm_strategy
        assert isinstance(row["total_params"], int) and row["total_params"] > 0
        assert row["active_params"] == row["total_params"]
    prenorm = next(r for r in rows if r["name"] == "tiny-dense-prenorm")
    assert prenorm["total_params"] == zoo.stats("tiny-dense-prenorm", seq_len=1).total_params


def test_info_json_for_the_paper_model(results):
    info = json.loads(_ok(results["info-big"]).stdout)
    assert info["name"] == "olmo2-1b-hybridnorm"
    assert info["total_params"] == pytest.approx(1.18e9, rel=0.01)
    assert info["active_params"] == info["total_params"]
    assert info["flops_per_token"] > 0
    assert info["train_flops_per_token"] == 3 * info["flops_per_token"]
    assert info["seq_len"] == 4096
    cfg = info["config"]
    assert cfg["norm_strategy"] == "hybridnorm"
    assert (cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"]) == (2048, 16, 32, 8)
    assert cfg["attention"]["rope_theta"] == 500000.0
    assert cfg == zoo.get_config("olmo2-1b-hybridnorm").to_dict()


def test_info_applies_overrides(results):
    info = json.loads(_ok(results["info-set"]).stdout)
    assert info["config"]["n_layers"] == 2
    assert info["config"]["norm_strategy"] == "hybridnorm"
    assert info["seq_len"] == 16
    expected = zoo.stats("tiny-dense-prenorm", ["n_layers=2", "norm_strategy=hybridnorm"], seq_len=16)
    assert info["total_params"] == expected.total_params
    assert info["flops_per_token"] == expected.flops_per_token
    assert info["total_params"] < zoo.stats("tiny-dense-prenorm", seq_len=1).total_params


def test_plugins_json(results):
    records = {r["name"]: r for r in json.loads(_ok(results["plugins"]).stdout)}
    builtins = ("zoo.norm_layers", "zoo.norm_strategies", "zoo.attention", "zoo.routers", "zoo.variants")
    assert set(builtins) <= set(records)
    for name in builtins:
        r = records[name]
        assert set(r) == {"name", "source", "status", "error", "registered"}
        assert r["status"] == "ok" and r["error"] is None
        assert "hybridnorm-zoo" in r["source"]
    assert {"prenorm", "postnorm", "hybridnorm", "hybridnorm-star"} <= set(
        records["zoo.norm_strategies"]["registered"]["norm strategy"])
    assert records["zoo.norm_layers"]["registered"] == {"norm layer": ["rmsnorm", "layernorm", "dyt"]}
    assert records["zoo.attention"]["registered"] == {"attention": ["mha"]}
    variants = records["zoo.variants"]["registered"]["variant"]
    assert set(zoo.list_models("tiny-dense-*")) <= set(variants)
    assert "olmo2-1b-hybridnorm" in variants


@pytest.mark.parametrize("key, needles", [
    ("err-variant", ["unknown variant 'tiny-dense-prenrom'", "Did you mean 'tiny-dense-prenorm'?"]),
    ("err-key", ["'d_modle'", "did you mean 'd_model'"]),
    ("err-value", ["'n_layers'", "abc"]),
])
def test_errors_are_one_line_without_traceback(results, key, needles):
    r = results[key]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("zoo: error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    for needle in needles:
        assert needle in r.stderr, r.stderr
    assert r.stdout == ""


def test_help(results):
    r = _ok(results["help"])
    assert "usage: zoo" in r.stdout
    for command in ("list", "info", "plugins"):
        assert command in r.stdout
    assert "examples:" in r.stdout and "zoo info olmo2-1b-hybridnorm" in r.stdout
    assert "ZOO_PLUGINS" in r.stdout and "ZOO_DISABLE_PLUGINS" in r.stdout


def test_info_help(results):
    r = _ok(results["info-help"])
    assert "usage: zoo info" in r.stdout  # prog is "zoo" under python -m zoo too
    for option in ("--set", "KEY=VALUE", "--seq-len", "--json", "name"):
        assert option in r.stdout


def test_closed_stdout_gives_no_traceback(subprocess_env):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (say, `head`) has gone away
    try:
        r = subprocess.run([ZOO, "plugins", "--json"], env=subprocess_env(), stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in r.stderr, r.stderr
