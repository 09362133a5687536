"""Data: file and HF dataset sources, the deterministic split, the memory-mapped cache, BPE tokenizers."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from zoo.train import data as zd
from zoo.train.data import DataError, load_corpus

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SMALL = ["d_model=64", "n_layers=2", "n_heads=2", "ffn.hidden_size=128"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test prepares its corpora in a cache of its own."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


@pytest.fixture
def folder(tmp_path):
    """40 small source files, each with a marker line found in no other file."""
    root = tmp_path / "corpus"
    (root / "pkg").mkdir(parents=True)
    for i in range(40):
        sub = root / "pkg" if i % 2 else root
        (sub / f"m{i}.py").write_text(f"# MARKER-{i:03d}\n" + "".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(40)))
    return root


def split_text(corpus, split):
    return bytes(np.asarray(corpus.tokens(split))).decode()


def bpe_docs(corpus, split):
    """The documents of a BPE split: the array cut at each end-of-document token, decoded."""
    ids, eos = np.asarray(corpus.tokens(split)).tolist(), corpus.tokenizer.eos_id
    assert ids[-1] == eos
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == eos:
            docs.append(corpus.tokenizer.decode(ids[start:i]))
            start = i + 1
    return docs


# ------------------------------------------------------------------------------------------------
# Files: split and cache
# ------------------------------------------------------------------------------------------------
def test_by_file_split_is_deterministic_and_disjoint(folder, tmp_path, monkeypatch):
    a = load_corpus(str(folder))
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "other-cache"))
    b = load_corpus(str(folder))
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    train, val = split_text(a, "train"), split_text(a, "val")
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py"))
    expect_val = {names[i] for i in zd.validation_set(names)}
    assert expect_val, "validation is never empty"
    for rel in names:
        marker = (folder / rel).read_text().splitlines()[0]
        assert (marker in val) == (rel in expect_val) and (marker in train) != (marker in val), rel
    assert a.files == 40 and a.unit == "files" and a.train.dtype == np.uint8 and a.vocab_size == 256
    assert train.count("\0") == 40 - len(expect_val) and val.count("\0") == len(expect_val)
    assert a.bytes == {"train": len(a.train), "val": len(a.val)}  # one byte per token


def test_validation_set_is_never_empty_and_follows_the_hash():
    assert zd.validation_set([f"f{i}.py" for i in range(6)]) == {0}  # f0.py hashes into the 3%
    names = ["a.py", "b.py"]
    assert not any(map(zd.is_validation, names))
    assert zd.validation_set(names) == {min(range(2), key=lambda i: zd._hash(names[i]))}
    assert zd.validation_set(["only.py"]) == set()


def test_a_single_file_gives_its_last_three_percent_to_validation(tmp_path):
    path = tmp_path / "one.txt"
    text = "".join(f"line {i}\n" for i in range(1000))
    path.write_text(text)
    corpus = load_corpus(str(path))
    cut = len(text) * 97 // 100
    assert split_text(corpus, "train") == text[:cut] + "\0" and split_text(corpus, "val") == text[cut:] + "\0"
    assert corpus.files == 1


def test_the_cache_is_reused_without_reading_and_rebuilt_when_a_file_changes(folder, cache, monkeypatch):
    first = load_corpus(str(folder))
    [entry] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    meta_mtime = (entry / "meta.json").stat().st_mtime_ns

    def no_reading(path):
        raise AssertionError(f"read {path} although the corpus is cached")

    with monkeypatch.context() as m:
        m.setattr(zd, "_read", no_reading)
        again = load_corpus(str(folder))
    assert isinstance(again.train, np.memmap) and np.array_equal(first.train, again.train)
    assert (entry / "meta.json").stat().st_mtime_ns == meta_mtime
    (folder / "m3.py").write_text("# CHANGED\n" * 50)
    changed = load_corpus(str(folder))
    assert "# CHANGED" in split_text(changed, "train") + split_text(changed, "val")
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


def test_batches_are_a_function_of_seed_and_step(folder):
    corpus = load_corpus(str(folder))
    x1, y1 = corpus.batch("train", 3, 7, 4, 16)
    x2, y2 = corpus.batch("train", 3, 7, 4, 16)
    assert x1.equal(x2) and y1.equal(y2) and x1[:, 1:].equal(y1[:, :-1])


# ------------------------------------------------------------------------------------------------
# HF datasets
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def datasets():
    return pytest.importorskip("datasets")


def rows(n, prefix="row"):
    return [f"{prefix} {i}: " + "words and more words " * 5 for i in range(n)]


def test_hf_saved_dataset_without_validation_splits_by_row_index(tmp_path, datasets):
    texts = rows(200)
    datasets.Dataset.from_dict({"text": texts, "n": list(range(200))}).save_to_disk(str(tmp_path / "ds"))
    corpus = load_corpus(f"hf:{tmp_path / 'ds'}")
    val_rows = zd.validation_set([str(i) for i in range(200)])
    assert 0 < len(val_rows) < 20
    assert split_text(corpus, "val") == "".join(texts[i] + "\0" for i in sorted(val_rows))
    assert split_text(corpus, "train") == "".join(t + "\0" for i, t in enumerate(texts) if i not in val_rows)
    assert corpus.files == 200 and corpus.unit == "rows"


def test_hf_dataset_dict_uses_its_validation_split(tmp_path, datasets):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": rows(30)}),
                          "validation": datasets.Dataset.from_dict({"body": rows(4, "val")})}).save_to_disk(str(tmp_path / "dd"))
    corpus = load_corpus(f"hf:{tmp_path / 'dd'}@body")
    assert split_text(corpus, "train") == "".join(t + "\0" for t in rows(30))
    assert split_text(corpus, "val") == "".join(t + "\0" for t in rows(4, "val"))
    picked = load_corpus(f"hf:{tmp_path / 'dd'}:validation@body")  # a named split, with no other for validation
    val_rows = zd.validation_set([str(i) for i in range(4)])
    assert split_text(picked, "val") == "".join(rows(4, "val")[i] + "\0" for i in sorted(val_rows))
    assert split_text(picked, "train") == "".join(t + "\0" for i, t in enumerate(rows(4, "val")) if i not in val_rows)


def test_hf_jsonl_folder_with_and_without_a_validation_file(tmp_path, datasets):
    both = tmp_path / "jsonl"
    both.mkdir()
    (both / "train.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in rows(50)))
    (both / "validation.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in rows(3, "v")))
    corpus = load_corpus(f"hf:{both}@content")
    assert split_text(corpus, "val") == "".join(t + "\0" for t in rows(3, "v"))
    one = tmp_path / "plain"
    one.mkdir()
    (one / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows(120)))
    corpus = load_corpus(f"hf:{one}")
    val_rows = zd.validation_set([str(i) for i in range(120)])
    assert split_text(corpus, "val") == "".join(rows(120)[i] + "\0" for i in sorted(val_rows))
    file_corpus = load_corpus(f"hf:{one / 'data.jsonl'}")
    assert np.array_equal(file_corpus.val, corpus.val)


def test_hf_cache_key_follows_the_dataset(tmp_path, datasets, cache):
    path = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": rows(50)}).save_to_disk(str(path))
    load_corpus(f"hf:{path}")
    load_corpus(f"hf:{path}")
    assert len([p for p in cache.iterdir() if not p.name.startswith(".") and p.name != "hf"]) == 1
    datasets.Dataset.from_dict({"text": rows(60)}).save_to_disk(str(tmp_path / "ds2"))
    shutil.rmtree(path)
    shutil.move(str(tmp_path / "ds2"), str(path))
    assert load_corpus(f"hf:{path}").files == 60


def test_hf_errors_name_the_spec_and_what_to_do(tmp_path, datasets):
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows(5), "n": list(range(5))}),
                          "test": datasets.Dataset.from_dict({"text": rows(2), "n": [0, 1]})}).save_to_disk(str(dd))
    cases = {
        f"hf:{dd}@body": f"data spec 'hf:{dd}@body': no column 'body' in split 'train' (columns: text, n); "
                         "name the text column with hf:PATH@COLUMN",
        f"hf:{dd}@n": f"data spec 'hf:{dd}@n': column 'n' holds int64, not text; name a text column with hf:PATH@COLUMN",
        f"hf:{dd}:dev": f"data spec 'hf:{dd}:dev': no split 'dev' (splits: train, test); name one with hf:PATH:SPLIT",
        "hf:./no-such-dataset": "data spec 'hf:./no-such-dataset': no such dataset folder or file './no-such-dataset'; "
                                "name a folder written by save_to_disk, a folder or file of jsonl/json/parquet/csv/txt, "
                                "or a hub id",
        "hf:": "data spec 'hf:': empty part; the syntax is hf:PATH_OR_ID[#CONFIG][:SPLIT][@COLUMN], "
               "e.g. hf:./my_dataset:train@text",
        str(dd): f"data spec {str(dd)!r} is a saved HF dataset, not a folder of text files; use --data hf:{dd}",
    }
    for spec, message in cases.items():
        with pytest.raises(DataError) as err:
            load_corpus(spec)
        assert str(err.value) == message


def test_parse_hf_spec():
    assert zd.parse_hf_spec("hf:org/name") == zd.HFSpec("org/name")
    assert zd.parse_hf_spec("hf:wikitext#wikitext-2-raw-v1:train@page") == zd.HFSpec("wikitext", "wikitext-2-raw-v1", "train", "page")
    assert zd.parse_hf_spec("hf:./data/rows.jsonl@body") == zd.HFSpec("./data/rows.jsonl", None, None, "body")
    assert zd.parse_hf_spec("hf:../x@v2/y:z/w") == zd.HFSpec("../x@v2/y:z/w")


def test_missing_datasets_package_gives_an_install_hint(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError) as err:
        load_corpus(f"hf:{tmp_path / 'ds'}")
    assert str(err.value) == (f"data spec 'hf:{tmp_path / 'ds'}' needs the 'datasets' package: "
                              "pip install 'hybridnorm-zoo[data]' (or pip install datasets)")


# ------------------------------------------------------------------------------------------------
# Bad specs
# ------------------------------------------------------------------------------------------------
def test_bad_specs_give_one_line_data_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = {
        ("nowhere", "byte"): "data spec 'nowhere': no such file or folder (a spec is 'stdlib', a text file, a folder of "
                             "text files, or hf:PATH_OR_ID[#CONFIG][:SPLIT][@COLUMN])",
        (str(tmp_path / "empty"), "byte"): f"data spec {str(tmp_path / 'empty')!r}: no text files ("
                                           f"{', '.join(zd.TEXT_SUFFIXES)}) in this folder; add some or name a file",
        ("stdlib", "bpe"): "tokenizer spec 'bpe' is neither 'byte' nor 'bpe:VOCAB' (for example bpe:4096)",
        ("stdlib", "wordpiece:100"): "tokenizer spec 'wordpiece:100' is neither 'byte' nor 'bpe:VOCAB' (for example bpe:4096)",
        ("stdlib", "bpe:100"): "tokenizer spec 'bpe:100': a byte-level BPE needs at least 257 tokens (256 bytes and the "
                               "end-of-document token); use bpe:VOCAB with VOCAB >= 257",
    }
    for (spec, tokenizer), message in cases.items():
        with pytest.raises(DataError) as err:
            load_corpus(spec, tokenizer=tokenizer)
        assert str(err.value) == message


def test_too_short_a_split_says_what_to_do(tmp_path):
    (tmp_path / "tiny.txt").write_text("x" * 100)
    corpus = load_corpus(str(tmp_path / "tiny.txt"))
    with pytest.raises(DataError, match=r"has 4 tokens, fewer than a sequence of 33; use more data or a shorter --seq-len"):
        corpus.batch("val", 0, 0, 2, 32)


# ------------------------------------------------------------------------------------------------
# BPE
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def bpe():
    pytest.importorskip("tokenizers")
    from zoo.train import bpe
    return bpe


def test_bpe_round_trips_any_text_and_keeps_eos_for_the_data(bpe, folder):
    texts = [p.read_text() for p in sorted(folder.rglob("*.py"))]
    tok = bpe.train_bpe(texts, 400)
    assert tok.eos_id == 0 and 300 < tok.vocab_size <= 400
    for text in ["def f(x):\n    return x\n", "naïve ☃ 日本語 \x00\t\r\n  ", "a literal <|endoftext|> is text", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and (tok.eos_id not in ids)
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 2
    assert tok.decode([5, tok.eos_id, 6]) == tok.decode([5, 6])


def test_bpe_training_is_deterministic(bpe, folder):
    texts = [p.read_text() for p in sorted(folder.rglob("*.py"))]
    assert bpe.train_bpe(texts, 350).to_str() == bpe.train_bpe(iter(texts), 350).to_str()


def test_bpe_corpus_memmaps_separates_documents_and_trains_on_train_only(bpe, folder, cache):
    corpus = load_corpus(str(folder), tokenizer="bpe:500")
    assert corpus.tokenizer_spec == "bpe:500" and isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.uint16
    assert zd.token_dtype(256) == np.uint8 and zd.token_dtype(65536) == np.uint16 and zd.token_dtype(65537) == np.uint32
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py"))
    val = zd.validation_set(names)
    assert bpe_docs(corpus, "val") == [(folder / names[i]).read_text() for i in sorted(val)]
    assert bpe_docs(corpus, "train") == [(folder / n).read_text() for i, n in enumerate(names) if i not in val]
    [entry] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    saved = (entry / "tokenizer.json").read_text()
    assert saved == corpus.tokenizer.to_str()
    train_only = bpe.train_bpe([(folder / n).read_text() for i, n in enumerate(names) if i not in val], 500)
    assert saved == train_only.to_str()
    assert corpus.bytes["val"] == sum(len((folder / names[i]).read_bytes()) + 1 for i in val)
    assert 1.5 < corpus.bytes["train"] / len(corpus.train) < 8  # bytes per token
    assert corpus.vocab_size == corpus.tokenizer.vocab_size == json.loads((entry / "meta.json").read_text())["vocab_size"]


def test_train_with_bpe_saves_the_tokenizer_beside_the_checkpoint(bpe, folder, tmp_path):
    import zoo
    from zoo.train import TrainConfig, train
    from zoo.train.tokenizer import tokenizer_for
    tc = TrainConfig(steps=3, batch_size=2, seq_len=32, warmup_steps=1, eval_every=3, eval_batches=1,
                     data=str(folder), tokenizer="bpe:512")
    result = train("tiny-dense-prenorm", [*SMALL, "vocab_size=512"], tc, out_dir=tmp_path / "run", progress=False)
    assert result.steps == 3 and result.final_val_loss is not None
    corpus = load_corpus(str(folder), tokenizer="bpe:512")
    for where in (tmp_path / "run", tmp_path / "run" / "checkpoint" / "model.safetensors"):
        found = tokenizer_for(where)
        assert isinstance(found, bpe.BPETokenizer) and found.to_str() == corpus.tokenizer.to_str()
    assert json.loads((tmp_path / "run" / "train.json").read_text())["tokenizer"] == "bpe:512"
    assert zoo.load(tmp_path / "run" / "checkpoint" / "model.safetensors").cfg.vocab_size == 512
    tc.tokenizer = "byte"  # a later byte run in the same folder must not leave the BPE behind
    train("tiny-dense-prenorm", SMALL, tc, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "tokenizer.json").exists()
    assert not (tmp_path / "run" / "checkpoint" / "tokenizer.json").exists()


def test_zoo_train_names_the_vocab_size_to_set(bpe, folder, tmp_path, subprocess_env):
    r = subprocess.run([sys.executable, "-m", "zoo", "train", "tiny-dense-prenorm", "--data", str(folder), "--tokenizer",
                        "bpe:400", "--steps", "1", "--out", str(tmp_path / "run")],
                       env=subprocess_env(ZOO_CACHE=str(tmp_path / "cache")), capture_output=True, text=True, timeout=300)
    vocab = load_corpus(str(folder), tokenizer="bpe:400").vocab_size
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"zoo: error: the tokenizer (bpe:400) has {vocab} tokens but the model's "
                                                 f"vocab_size is 256; add --set vocab_size={vocab} (or more)")
