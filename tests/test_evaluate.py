"""`zoo.evaluate` and `zoo eval`: deterministic held-out loss, perplexity and bits per byte, checked
against an independent computation, and the results flowing into the model card."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard

import zoo
from zoo.cards import check_cards
from zoo.cli import main
from zoo.train.data import load_corpus
from zoo.train.evaluate import EvalError, count_bytes, evaluate

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

DOCS = Path(__file__).resolve().parents[1] / "docs"
SMALL = ["n_layers=1", "d_model=32", "n_heads=2", "ffn.hidden_size=64", "max_seq_len=32"]
JSON_KEYS = {"model", "variant", "weights", "loss", "perplexity", "bits_per_byte", "tokens", "bytes", "data", "split",
             "seq_len", "windows", "seconds", "tokens_per_s"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def text_folder(tmp_path) -> Path:
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(100):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}  # café {i * j}\n" for j in range(i % 5 + 1))
        (folder / f"mod{i:02d}.py").write_text(body)
    return folder


@pytest.fixture(scope="module")
def model() -> zoo.ZooModel:
    torch.manual_seed(0)
    return zoo.build("tiny-dense-hybridnorm", SMALL)


def hand_nll(model: zoo.ZooModel, tokens: list[int], seq_len: int, first: int = 0) -> float:
    """Summed cross entropy, one window at a time, written independently of zoo.evaluate: the stream is
    the separator followed by the tokens, cut into windows of seq_len inputs."""
    stream = [first, *tokens]
    total = 0.0
    with torch.no_grad():
        for k in range(0, len(tokens), seq_len):
            window = torch.tensor(stream[k:min(k + seq_len, len(tokens)) + 1])
            logp = F.log_softmax(model(window[None, :-1]).logits[0].double(), dim=-1)
            total -= float(logp.gather(-1, window[1:, None]).sum())
    return total


def test_evaluate_equals_hand_computation(model, text_folder):
    corpus = load_corpus(str(text_folder))
    val = [int(t) for t in corpus.val]
    seq_len = 16 if len(val) % 16 else 15
    assert len(val) > 4 * seq_len and len(val) % seq_len, "the split should need full batches and a shorter tail"
    model.train()
    result = evaluate(model, corpus, seq_len=seq_len, batch_size=3, progress=False)
    assert model.training, "evaluate must put the model back in training mode"
    expected = hand_nll(model, val, seq_len) / len(val)
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.tokens == len(val) and result.windows == math.ceil(len(val) / seq_len)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert (result.data, result.split, result.seq_len) == (str(text_folder), "val", seq_len)
    again = evaluate(model, str(text_folder), seq_len=seq_len, batch_size=5, progress=False)
    assert again.loss == pytest.approx(result.loss, rel=1e-6), "the batch size must not change the result"


def test_bits_per_byte_of_byte_tokens_is_loss_over_ln2(model, text_folder):
    result = evaluate(model, str(text_folder), progress=False)
    assert result.seq_len == model.cfg.max_seq_len
    assert result.bytes == result.tokens
    assert result.bits_per_byte == pytest.approx(result.loss / math.log(2), rel=1e-9)


def test_max_tokens_caps_the_prefix(model, text_folder):
    corpus = load_corpus(str(text_folder))
    val = [int(t) for t in corpus.val]
    result = evaluate(model, corpus, seq_len=16, max_tokens=37, progress=False)
    assert (result.tokens, result.windows) == (37, 3)
    assert result.loss == pytest.approx(hand_nll(model, val[:37], 16) / 37, rel=1e-5)
    whole = evaluate(model, corpus, seq_len=16, max_tokens=10 ** 9, progress=False)
    assert whole.tokens == len(val)


class CharTokenizer:
    """One token per character below U+00FF (so 'é' is one token but two UTF-8 bytes); 0 ends a document."""

    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return [min(ord(c), 255) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i)


def test_another_tokenizer_is_scored_per_utf8_byte(model, text_folder):
    corpus = load_corpus(str(text_folder))
    raw = bytes(corpus.val)
    text = raw.replace(b"\0", b"").decode()
    assert "é" in text
    tok = CharTokenizer()
    ids = [i for doc in raw.split(b"\0")[:-1] for i in (*tok.encode(doc.decode()), 0)]
    result = evaluate(model, corpus, seq_len=16, tokenizer=tok, progress=False)
    assert result.tokens == len(ids) < len(raw) == result.bytes
    total = hand_nll(model, ids, 16)
    assert result.loss == pytest.approx(total / len(ids), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(total / (len(raw) * math.log(2)), rel=1e-5)
    capped = evaluate(model, corpus, seq_len=16, tokenizer=tok, max_tokens=50, progress=False)
    assert capped.bytes == count_bytes(ids[:50], tok) == len(tok.decode(ids[:50]).encode()) + ids[:50].count(0)


def test_bad_arguments_raise_one_clear_error(model, text_folder):
    with pytest.raises(EvalError, match="exceeds the model's max_seq_len 32"):
        evaluate(model, str(text_folder), seq_len=64, progress=False)
    with pytest.raises(EvalError, match="unknown split 'test'"):
        evaluate(model, str(text_folder), split="test", progress=False)
    with pytest.raises(EvalError, match="max_tokens must be at least 1"):
        evaluate(model, str(text_folder), max_tokens=0, progress=False)


# ---------------------------------------------------------------------------------------------
# zoo eval
# ---------------------------------------------------------------------------------------------
def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["eval", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_keys_are_documented(capsys, text_folder):
    code, out, err = run_cli(capsys, "tiny-dense-hybridnorm", "--data", str(text_folder), "--max-tokens", "40",
                             "--seq-len", "16", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert set(report) == JSON_KEYS
    assert report["tokens"] == 40 and report["variant"] == "tiny-dense-hybridnorm" and report["data"] == str(text_folder)
    assert report["weights"].startswith("untrained") and "freshly initialized (untrained)" in err
    assert report["bits_per_byte"] == pytest.approx(report["loss"] / math.log(2))
    section = (DOCS / "cli.md").read_text().split("## zoo eval", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([^`\n]+)`", section))
    assert JSON_KEYS <= documented, f"docs/cli.md's zoo eval section lacks {sorted(JSON_KEYS - documented)}"


def test_cli_plain_output(capsys, text_folder):
    code, out, _ = run_cli(capsys, "tiny-dense-hybridnorm", "--data", str(text_folder), "--max-tokens", "40")
    assert code == 0
    for label in ("loss", "perplexity", "bits per byte", "tokens", "seconds"):
        assert re.search(rf"^{label} +\S", out, flags=re.M), (label, out)


def test_cli_bad_data_spec_is_one_line_exit_2(capsys, tmp_path):
    code, out, err = run_cli(capsys, "tiny-dense-hybridnorm", "--data", str(tmp_path / "missing"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("zoo: error: data spec") and "Traceback" not in err


def test_cli_checkpoint_path_and_folder(capsys, tmp_path, text_folder, model):
    ckpt = tmp_path / "run" / "checkpoint" / "model.safetensors"
    ckpt.parent.mkdir(parents=True)
    zoo.save(model, ckpt, variant="tiny-dense-hybridnorm")
    expected = evaluate(model, str(text_folder), seq_len=16, max_tokens=40, progress=False)
    for source in (ckpt, tmp_path / "run"):
        code, out, err = run_cli(capsys, str(source), "--data", str(text_folder), "--max-tokens", "40", "--seq-len", "16",
                                 "--json")
        assert code == 0, err
        report = json.loads(out)
        assert report["weights"] == f"checkpoint {source}" and "untrained" not in err
        assert report["loss"] == pytest.approx(expected.loss, rel=1e-6)
    code, _, err = run_cli(capsys, str(ckpt), "--pretrained")
    assert code == 2 and "--pretrained applies to a variant NAME" in err


def test_cli_write_card_merges_results_and_the_card_renders_them(capsys, tmp_path, text_folder):
    cards = tmp_path / "cards"
    results = cards / "results" / "tiny-dense-hybridnorm.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"val_loss": 1.5, "recipe": "a test recipe", "dataset": "python-stdlib"}))
    code, out, err = run_cli(capsys, "tiny-dense-hybridnorm", "--data", str(text_folder), "--max-tokens", "40",
                             "--json", "--write-card", str(cards))
    assert code == 0, err
    assert f"zoo card tiny-dense-hybridnorm --write --dir {cards}" in err
    data = json.loads(results.read_text())
    assert data["val_loss"] == 1.5 and data["recipe"] == "a test recipe", "training results must be kept"
    report = json.loads(out)
    assert data["eval"]["tokens"] == 40 and data["eval"]["data"] == str(text_folder)
    assert data["eval"]["loss"] == pytest.approx(report["loss"], abs=1e-6)
    assert data["eval"]["bits_per_byte"] == pytest.approx(report["bits_per_byte"], abs=1e-6)

    assert main(["card", "tiny-dense-hybridnorm", "--write", "--dir", str(cards)]) == 0
    capsys.readouterr()
    text = (cards / "tiny-dense-hybridnorm.md").read_text()
    assert "### Evaluation" in text and f"| bits per byte | {data['eval']['bits_per_byte']:.4f} |" in text
    assert "Trained by the zoo's recipe: a test recipe." in text
    metrics = {(r.task_name, r.metric_type): r.metric_value for r in ModelCard(text).data.eval_results}
    assert metrics[("Causal language modeling", "loss")] == 1.5
    assert metrics[("Causal language modeling (zoo eval)", "bits_per_byte")] == round(data["eval"]["bits_per_byte"], 4)
    assert check_cards(cards, ["tiny-dense-hybridnorm"]) == []


def test_cli_write_card_needs_a_variant_name(capsys, tmp_path, text_folder, model):
    ckpt = tmp_path / "anonymous.safetensors"
    zoo.save(model, ckpt)
    if zoo.load(ckpt).variant:
        pytest.skip("checkpoints record a variant name without being given one")
    code, _, err = run_cli(capsys, str(ckpt), "--data", str(text_folder), "--write-card", str(tmp_path / "cards"))
    assert code == 2 and "does not record its variant name" in err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-dense-hybridnorm", "tiny-moe-hybridnorm"])
def test_published_checkpoint_reproduces_its_card(name, tmp_path):
    """`zoo eval NAME --pretrained` on the embedded hub gives the loss its model card states (whole split)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    card = json.loads((root / "model_cards" / "results" / f"{name}.json").read_text())["eval"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}  # a cold pull from the embedded hub
    r = subprocess.run([sys.executable, "-m", "zoo", "eval", name, "--pretrained", "--json"], capture_output=True,
                       text=True, timeout=1200, env=env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["tokens"] == card["tokens"]
    assert got["loss"] == pytest.approx(card["loss"], abs=1e-4)
    assert got["bits_per_byte"] == pytest.approx(card["bits_per_byte"], abs=1e-4)
