"""One resolver for "which model?": every command that takes a model, with every form of naming one.

Forms: a variant NAME (fresh), NAME with --pretrained (published weights from the embedded hub), a
CHECKPOINT file, a folder holding one (a published repository), a RUN folder of zoo train, a
checkpoint inside a run; and the mistakes: a missing path, --pretrained with a path, an unknown or
malformed name. Commands: train --resume, eval, generate, convert --to-hf, publish, the lm-eval adapter.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.sources import ModelSource, load_source, resolve_source

NAME = "tiny-dense-prenorm"  # exports to transformers (Llama), so convert takes every form
PUBLISHED = "tiny-dense-hybridnorm"  # in the embedded hub
SMALL = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--checkpoint-every", "2"]


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    for var in ("ZOO_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("texts")
    for i in range(40):
        (folder / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j}\n" for j in range(6)))
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, text) -> Path:
    """A run folder of two steps of zoo train, and a published repository of its checkpoint beside it."""
    out = tmp_path_factory.mktemp("run") / NAME
    assert main(["train", NAME, "--out", str(out), "--data", str(text), *SMALL]) == 0
    return out


@pytest.fixture(scope="module")
def repo(run) -> Path:
    return zoo.publish(run, run.parent / "hub")


def forms(run: Path, repo: Path) -> dict[str, tuple[list[str], str]]:
    """form -> (command-line words, the kind the resolver must find)."""
    return {"name": ([NAME], "variant"), "pretrained": ([PUBLISHED, "--pretrained"], "pretrained"),
            "checkpoint": ([str(run / "checkpoint" / "model.safetensors")], "checkpoint"),
            "repository": ([str(repo)], "checkpoint"), "run": ([str(run)], "run")}


def test_each_form_resolves_to_its_kind_and_weights(run, repo):
    for form, (words, kind) in forms(run, repo).items():
        source = resolve_source(words[0], pretrained="--pretrained" in words)
        assert source.kind == kind, form
        assert source.trained == (kind != "variant"), form
        if kind != "variant":
            assert source.checkpoint.name == "model.safetensors" and source.checkpoint.is_file(), form
            assert source.variant == (PUBLISHED if kind == "pretrained" else NAME), form
    assert resolve_source(run).run == run and resolve_source(run).checkpoint == run / "checkpoint" / "model.safetensors"
    trained = zoo.load(run / "checkpoint" / "model.safetensors")
    for form in ("checkpoint", "repository", "run"):
        words, _ = forms(run, repo)[form]
        loaded = load_source(resolve_source(words[0]))
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values())), form
    a, b = (load_source(resolve_source(NAME), seed=3) for _ in range(2))
    assert torch.equal(a.embed.weight, b.embed.weight)  # a NAME is seeded


@pytest.mark.parametrize("text_given, pretrained, error", [
    ("runs/missing/checkpoint", False, "checkpoint not found: runs/missing/checkpoint"),
    ("missing.safetensors", False, "checkpoint not found: missing.safetensors"),
    ("tiny-dense-prenrom", False, "unknown variant 'tiny-dense-prenrom'. Did you mean 'tiny-dense-prenorm'?"),
    ("Bad_Name", False, "invalid variant name 'Bad_Name'"),
], ids=["missing-folder", "missing-file", "unknown-name", "malformed-name"])
def test_mistakes_are_one_clear_error(text_given, pretrained, error):
    with pytest.raises(zoo.ZooError) as info:
        resolve_source(text_given, pretrained=pretrained)
    assert error in str(info.value)


def test_pretrained_with_a_path_or_an_unpublished_name_is_refused(run, tmp_path):
    with pytest.raises(zoo.ZooError, match="--pretrained applies to a variant NAME"):
        resolve_source(run, pretrained=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(zoo.ZooError, match="is a folder without model.safetensors or checkpoint/model.safetensors"):
        resolve_source(tmp_path / "empty")
    with pytest.raises(zoo.hub.HubError, match="zoo/tiny-dense-prenorm is not in the zoo's embedded hub"):
        resolve_source(NAME, pretrained=True)


def _cli(capsys, *words: str) -> tuple[int, str, str]:
    code = main(list(words))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("form", ["name", "pretrained", "checkpoint", "repository", "run"])
def test_eval_takes_every_form(capsys, run, repo, text, form):
    words, kind = forms(run, repo)[form]
    code, out, err = _cli(capsys, "eval", *words, "--data", str(text), "--max-tokens", "64", "--seq-len", "32", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["weights"].startswith({"variant": "untrained", "pretrained": "published"}.get(kind, "checkpoint"))
    assert ("untrained" in err) == (kind == "variant")
    assert report["variant"] == (PUBLISHED if kind == "pretrained" else NAME)


@pytest.mark.parametrize("form", ["name", "pretrained", "checkpoint", "repository", "run"])
def test_generate_takes_every_form(capsys, run, repo, form):
    words, kind = forms(run, repo)[form]
    code, out, err = _cli(capsys, "generate", *words, "--prompt", "def ", "--max-new-tokens", "3")
    assert code == 0, err
    assert out.startswith("def ") and ("freshly initialized" in err) == (kind == "variant")


@pytest.mark.parametrize("form", ["name", "pretrained", "checkpoint", "repository", "run"])
def test_publish_takes_every_form(capsys, run, repo, tmp_path, form):
    words, kind = forms(run, repo)[form]
    code, out, err = _cli(capsys, "publish", *words, "--to", str(tmp_path / "out"))
    assert code == 0, err
    name = PUBLISHED if kind == "pretrained" else NAME
    card = (tmp_path / "out" / name / "README.md").read_text()
    assert ("**untrained**" in card) == (kind == "variant")
    published = zoo.load(tmp_path / "out" / name)
    if kind != "variant":
        want = zoo.load(resolve_source(words[0], pretrained=kind == "pretrained").checkpoint)
        assert torch.equal(published.embed.weight, want.embed.weight)


@pytest.mark.parametrize("form", ["name", "pretrained", "checkpoint", "repository", "run"])
def test_convert_to_hf_takes_every_form(capsys, run, repo, tmp_path, form):
    words, kind = forms(run, repo)[form]
    code, out, err = _cli(capsys, "convert", "--to-hf", *words, "--to", str(tmp_path / "hf"))
    if kind == "pretrained":  # found and pulled; HybridNorm has no transformers equivalent, which is the refusal
        assert code == 2 and "tiny-dense-hybridnorm (hybridnorm, dense) has no Hugging Face transformers" in err
        return
    assert code == 0, err
    assert ("freshly initialized" in out) == (kind == "variant")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_train_resume_takes_a_name_a_run_or_its_checkpoint(capsys, run, tmp_path, text):
    """--resume continues a run given by NAME (and --out), by its folder, or by its checkpoint, with the settings
    it was started with (train.json) and --steps to go on; anything else is refused."""
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    steps = 2
    for words in (["train", NAME, "--out", str(copy), "--resume"], ["train", str(copy), "--resume"],
                  ["train", str(copy / "checkpoint" / "model.safetensors"), "--resume"]):
        steps += 1
        code, out, err = _cli(capsys, *words, "--steps", str(steps))
        assert code == 0, err
        assert f"trained {NAME} for {steps} steps" in out
        metrics = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(steps))
    assert zoo.load(copy / "checkpoint" / "model.safetensors").variant == NAME
    for words, error in ((["train", str(copy)], "is a run folder: zoo train starts a variant NAME, or continues a run"),
                         (["train", str(copy), "--resume", "--out", str(tmp_path / "x")], "a run continues in its own"),
                         (["train", str(run.parent / "hub" / NAME), "--resume"], "is a checkpoint: zoo train starts")):
        code, _, err = _cli(capsys, *words)
        assert code == 2 and error in err, err


def test_the_lm_eval_adapter_takes_every_form(run, repo):
    from zoo.interop import lm_eval as lm_eval_adapter
    for form, (words, kind) in forms(run, repo).items():
        args = {"pretrained": True} if kind == "pretrained" else {}
        key = "name" if kind in ("variant", "pretrained") else "checkpoint"
        lm = lm_eval_adapter.ZooLM(**{key: words[0]}, **args)
        assert isinstance(lm.source, ModelSource) and lm.source.kind == kind, form
        assert lm.get_model_info()["model_name"] == (PUBLISHED if kind == "pretrained" else NAME)
    with pytest.raises(zoo.ZooError, match="--pretrained applies to a variant NAME|pretrained=true applies"):
        lm_eval_adapter.ZooLM(checkpoint=str(run), pretrained=True)
