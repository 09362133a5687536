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
        assert set(r) == {"name", "source", "status", "error", "registered", "dist", "version", "conflicts"}
        assert r["status"] == "ok" and r["error"] is None and r["conflicts"] == []
        assert (r["dist"], r["version"]) == ("hybridnorm-zoo", zoo.__version__)
        assert "hybridnorm-zoo" in r["source"]
    assert {"prenorm", "postnorm", "hybridnorm", "hybridnorm-star"} <= set(
        records["zoo.norm_strategies"]["registered"]["norm strategy"])
    assert records["zoo.norm_layers"]["registered"] == {"norm layer": ["rmsnorm", "layernorm", "dyt"]}
    assert records["zoo.attention"]["registered"] == {"attention": ["mha", "mla"]}
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


def _broken_checkpoints(folder: Path) -> dict[str, Path]:
    """A checkpoint whose header makes two tensors overlap, and an index whose weight_map leaves its folder."""
    import struct
    good = folder / "good" / "model.safetensors"
    zoo.save(zoo.build("tiny-dense-hybridnorm"), good)
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    first, second = header[names[0]], header[names[1]]
    size = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    overlap = folder / "overlap" / "model.safetensors"
    overlap.parent.mkdir()
    overlap.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    index = folder / "escape" / "model.safetensors.index.json"
    index.parent.mkdir()
    index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, "../../etc/passwd")}))
    return {"overlap": overlap, "escape": index}


BAD_INPUTS = {
    "head_dim": (["train", "tiny-dense-hybridnorm", "--set", "head_dim=-2"], "head_dim must be positive or null, got -2"),
    "batch": (["train", "tiny-dense-hybridnorm", "--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    "seq": (["train", "tiny-dense-hybridnorm", "--seq-len", "0"], "--seq-len must be at least 1, not 0"),
    "lr-negative": (["train", "tiny-dense-hybridnorm", "--lr", "-1"], "--lr must be a positive number, not -1.0"),
    "lr-nan": (["train", "tiny-dense-hybridnorm", "--lr", "nan"], "--lr must be a positive number, not nan"),
    "eval-every": (["train", "tiny-dense-hybridnorm", "--eval-every", "0"], "--eval-every must be at least 1, not 0"),
    "checkpoint-every": (["train", "tiny-dense-hybridnorm", "--checkpoint-every", "0"],
                         "--checkpoint-every must be at least 1, not 0"),
    "steps": (["train", "tiny-dense-hybridnorm", "--steps", "-1"], "--steps must be at least 1, not -1"),
    "warmup": (["train", "tiny-dense-hybridnorm", "--warmup", "-5"], "--warmup must be 0 or more, not -5"),
    "info-seq": (["info", "tiny-dense-hybridnorm", "--seq-len", "-4"], "the sequence length must be at least 1, not -4"),
    "publish-to-file": (["publish", "tiny-dense-hybridnorm", "--to", "{file}"], "is a file; give the folder"),
    "overlap": (["eval", "{overlap}"], "overlap in the data"),
    "escape": (["eval", "{escape}"], "which is not a file beside the index"),
    "serve-connections": (["serve", "{tmp}", "--port", "0", "--max-connections", "0"],
                          "invalid --max-connections 0: it must be at least 1"),
    "serve-idle": (["serve", "{tmp}", "--port", "0", "--idle-timeout", "-1"],
                   "invalid --idle-timeout -1.0: it must be a positive number of seconds"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_exit_2_with_one_line(case, tmp_path, capsys, monkeypatch):
    """Inputs that once ended in a traceback or were accepted silently: one `zoo: error:` line, exit 2 (run in
    this process through the CLI's entry point; test_errors_are_one_line_without_traceback covers the script)."""
    import zoo.cli
    args, message = BAD_INPUTS[case]
    paths = {"file": tmp_path / "a-file", "tmp": tmp_path, **(_broken_checkpoints(tmp_path) if case in ("overlap", "escape") else {})}
    paths["file"].write_text("")
    argv = [a.format(**paths) for a in args]
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = zoo.cli.main([*argv, *(["--out", str(tmp_path / "run")] if argv[0] == "train" else [])])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("zoo: error: "), err
    assert message in err, err


def test_moe_overrides_on_a_dense_variant_are_named_as_ignored(subprocess_env):
    r = subprocess.run([ZOO, "info", "tiny-dense-hybridnorm", "--set", "moe.top_k=99", "--set", "moe.num_experts=4"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert ("zoo: warning: tiny-dense-hybridnorm is dense (ffn.type: dense); it ignores moe.num_experts, moe.top_k"
            in r.stderr), r.stderr
    r = subprocess.run([ZOO, "info", "tiny-moe-hybridnorm", "--set", "moe.top_k=99"], env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "moe.top_k (99) must be between 1 and moe.num_experts (8)" in r.stderr
