"""Training data: a corpus named by a spec, tokenized once into cached memory-mapped arrays.

Data specs (``--data``):

- ``stdlib`` (the default): the ``.py`` source of the running Python's standard library, present on
  every machine and written by none of us.
- ``PATH``: a text file, or a folder of text files (recursively; suffixes in ``TEXT_SUFFIXES``).
- ``hf:PATH_OR_ID[#CONFIG][:SPLIT][@COLUMN]``: an HF dataset (needs ``datasets``: the ``data``
  extra). ``PATH_OR_ID`` is a folder written by ``save_to_disk``, a folder of jsonl/json/parquet/
  csv/txt files (as ``datasets.load_dataset`` reads it), one such file, or a hub id when a hub is
  reachable. ``CONFIG`` is the hub dataset's configuration, ``SPLIT`` the split to train on
  (default ``train``, or the only split), ``COLUMN`` the text column (default ``text``). For
  example ``hf:./my_dataset``, ``hf:data/rows.jsonl@body``, ``hf:wikitext#wikitext-2-raw-v1:train``.

The train/validation split is deterministic and never mixes a document into both: files go to
validation by a hash of their relative path (about ``VAL_PERCENT``%), HF rows by a hash of their
row index unless the dataset has its own validation split (``validation``, ``valid``, ``val`` or
``dev``), which is then used whole. A corpus of one document (one file, one row) gives its last
``VAL_PERCENT``% of text to validation.

Tokenizer specs (``--tokenizer``): ``byte`` (the default: UTF-8 bytes, byte 0 ends a document) or
``bpe:VOCAB``, a byte-level BPE of at most VOCAB tokens trained with ``tokenizers`` on the train
split only (zoo/train/bpe.py: ``<|endoftext|>`` is id 0 and ends each document). The tokens go into
``cache_dir()/KEY/`` as ``train.uN`` and ``val.uN`` (uint8 for bytes, uint16 or uint32 as the BPE
vocabulary needs), with ``tokenizer.json`` and ``meta.json``. KEY hashes the spec's files (paths,
sizes, modification times) or the hub dataset's fingerprints, and the tokenizer spec: a changed file
or dataset is prepared again, an unchanged one is memory-mapped without being read.

Batches are a pure function of (seed, step): resuming at step s draws exactly the batches an
uninterrupted run would have drawn.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from ..errors import ZooError
from .bpe import MIN_VOCAB, load_bpe, train_bpe
from .tokenizer import TOKENIZER_FILE, ByteTokenizer, Tokenizer

SEPARATOR = 0  # byte 0 ends each document; it does not occur in source text
VAL_PERCENT = 3
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".c", ".h", ".html")
FORMAT = 2  # the cache layout; part of every cache key
HF_PREFIX = "hf:"
HF_SYNTAX = "hf:PATH_OR_ID[#CONFIG][:SPLIT][@COLUMN]"
HF_VALIDATION_SPLITS = ("validation", "valid", "val", "dev")
HF_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
                    ".arrow": "arrow"}
INSTALL_HINT = "pip install 'hybridnorm-zoo[data]' (or pip install datasets)"
BPE_RE = re.compile(r"bpe:(\d+)")

Document = Union[str, bytes]


class DataError(ZooError):
    """A data or tokenizer spec that names nothing readable, or a corpus too small to train on."""


def cache_dir() -> Path:
    """``$ZOO_CACHE/data``, else ``$XDG_CACHE_HOME/hybridnorm-zoo/data`` (``~/.cache`` by default)."""
    root = os.environ.get("ZOO_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hybridnorm-zoo")
    return Path(root) / "data"


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's ``.py`` files (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts
                   and p.is_file())
    return root, files


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def spec_files(spec: str) -> tuple[Path, list[Path]]:
    """Resolve a file spec: ``stdlib``, a text file, or a folder (its text files, recursively)."""
    if spec == "stdlib":
        return stdlib_files()
    path = Path(spec).expanduser()
    if path.is_file():
        return path.parent, [path]
    if _is_saved_dataset(path):
        raise DataError(f"data spec {spec!r} is a saved HF dataset, not a folder of text files; use --data hf:{spec}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"data spec {spec!r}: no text files ({', '.join(TEXT_SUFFIXES)}) in this folder; "
                            "add some or name a file")
        return path, files
    raise DataError(f"data spec {spec!r}: no such file or folder (a spec is 'stdlib', a text file, a folder of "
                    f"text files, or {HF_SYNTAX})")


def _hash(name: str) -> int:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16)


def is_validation(relpath: str) -> bool:
    """Whether the document named ``relpath`` (a relative path or a row index) is in validation."""
    return _hash(relpath) % 100 < VAL_PERCENT


def validation_set(names: list[str]) -> set[int]:
    """Indices of the validation documents among ``names``: those ``is_validation`` picks, or, when it
    picks none of two or more, the one with the smallest hash (so validation is never empty)."""
    picked = {i for i, name in enumerate(names) if is_validation(name)}
    if not picked and len(names) > 1:
        picked = {min(range(len(names)), key=lambda i: _hash(names[i]))}
    return picked


def _split_one(doc: Document) -> Iterator[tuple[str, Document]]:
    cut = len(doc) * (100 - VAL_PERCENT) // 100
    yield "train", doc[:cut]
    yield "val", doc[cut:]


def parse_tokenizer_spec(spec: str) -> Optional[int]:
    """``byte`` -> None; ``bpe:VOCAB`` -> VOCAB."""
    if spec == "byte":
        return None
    match = BPE_RE.fullmatch(spec)
    if not match:
        raise DataError(f"tokenizer spec {spec!r} is neither 'byte' nor 'bpe:VOCAB' (for example bpe:4096)")
    vocab = int(match.group(1))
    if vocab < MIN_VOCAB:
        raise DataError(f"tokenizer spec {spec!r}: a byte-level BPE needs at least {MIN_VOCAB} tokens (256 bytes and "
                        f"the end-of-document token); use bpe:VOCAB with VOCAB >= {MIN_VOCAB}")
    return vocab


@dataclass
class HFSpec:
    """A parsed ``hf:PATH_OR_ID[#CONFIG][:SPLIT][@COLUMN]`` spec."""

    path: str
    config: Optional[str] = None
    split: Optional[str] = None
    column: str = "text"


def parse_hf_spec(spec: str) -> HFSpec:
    """Split an ``hf:`` spec into its parts; the ``@COLUMN`` and ``:SPLIT`` suffixes hold no ``/``."""
    rest, column, split, config = spec[len(HF_PREFIX):], "text", None, None
    if "@" in rest and "/" not in rest.rsplit("@", 1)[1]:
        rest, column = rest.rsplit("@", 1)
    if ":" in rest and "/" not in rest.rsplit(":", 1)[1]:
        rest, split = rest.rsplit(":", 1)
    if "#" in rest:
        rest, config = rest.split("#", 1)
    if not rest or not column or split == "" or config == "":
        raise DataError(f"data spec {spec!r}: empty part; the syntax is {HF_SYNTAX}, e.g. hf:./my_dataset:train@text")
    return HFSpec(rest, config, split, column)


@dataclass
class _Source:
    """A resolved data spec: what identifies its content, and its documents in a fixed order."""

    identity: Any
    unit: str
    documents: Callable[[], Iterator[tuple[str, Document]]]
    count: Callable[[], int]  # documents (files or rows), for the progress bar and ``Corpus.files``


def _listing(root: Path, files: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(p.relative_to(root)), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()]]


def _file_source(spec: str) -> _Source:
    root, files = spec_files(spec)
    listing = _listing(root, files)
    val = validation_set([rel for rel, _, _ in listing])

    def documents() -> Iterator[tuple[str, Document]]:
        if len(files) == 1:
            yield from _split_one(_read(files[0]) or b"")
            return
        for i, path in enumerate(files):
            data = _read(path)
            if data is not None:
                yield ("val" if i in val else "train"), data

    return _Source(["files", str(root), listing], "files", documents, lambda: len(files))


def _read(path: Path) -> Optional[bytes]:
    try:
        return path.read_bytes()
    except OSError:  # unreadable (permissions, a broken link): skipped
        return None


def _datasets(spec: str) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"data spec {spec!r} needs the 'datasets' package: {INSTALL_HINT}") from e
    return datasets


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _load_hf(spec: str, hs: HFSpec, path: Optional[Path], progress: bool) -> Any:
    """The dataset as a ``DatasetDict`` (a bare ``Dataset`` becomes its ``train`` split)."""
    ds = _datasets(spec)
    (ds.enable_progress_bars if progress else ds.disable_progress_bars)()
    hf_cache = str(cache_dir() / "hf")
    try:
        if path is None:
            loaded = ds.load_dataset(hs.path, hs.config, cache_dir=hf_cache)
        elif _is_saved_dataset(path):
            loaded = ds.load_from_disk(str(path))
        elif path.is_file():
            builder = HF_FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise DataError(f"data spec {spec!r}: {path.name} is not a dataset file "
                                f"({', '.join(HF_FILE_BUILDERS)}); use one, or a folder of them")
            loaded = ds.load_dataset(builder, data_files=str(path), cache_dir=hf_cache)
        else:
            loaded = ds.load_dataset(str(path), hs.config, cache_dir=hf_cache)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (datasets raises many kinds; each becomes one line)
        where = "from the hub" if path is None else f"from {path}"
        raise DataError(f"data spec {spec!r}: datasets could not load it {where} ({_one_line(e)}); check the name, "
                        f"or write the dataset with save_to_disk and pass hf:FOLDER") from e
    return loaded if isinstance(loaded, ds.DatasetDict) else ds.DatasetDict({"train": loaded})


def _hf_splits(spec: str, hs: HFSpec, dsd: Any) -> tuple[str, Optional[str]]:
    names = list(dsd)
    listed = ", ".join(names)
    if hs.split is not None:
        if hs.split not in dsd:
            raise DataError(f"data spec {spec!r}: no split {hs.split!r} (splits: {listed}); name one with hf:PATH:SPLIT")
        train = hs.split
    elif "train" in dsd or len(names) == 1:
        train = "train" if "train" in dsd else names[0]
    else:
        raise DataError(f"data spec {spec!r}: no 'train' split (splits: {listed}); name one with hf:PATH:SPLIT")
    val = next((s for s in HF_VALIDATION_SPLITS if s in dsd and s != train), None)
    for split in filter(None, (train, val)):
        features = dsd[split].features
        if hs.column not in features:
            raise DataError(f"data spec {spec!r}: no column {hs.column!r} in split {split!r} (columns: "
                            f"{', '.join(features)}); name the text column with hf:PATH@COLUMN")
        dtype = getattr(features[hs.column], "dtype", type(features[hs.column]).__name__)
        if dtype not in ("string", "large_string"):
            raise DataError(f"data spec {spec!r}: column {hs.column!r} holds {dtype}, not text; name a text column "
                            "with hf:PATH@COLUMN")
    return train, val


def _hf_source(spec: str, progress: bool) -> _Source:
    hs = parse_hf_spec(spec)
    local = Path(hs.path).expanduser()
    looks_local = hs.path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.exists():
        raise DataError(f"data spec {spec!r}: no such dataset folder or file {hs.path!r}; name a folder written by "
                        "save_to_disk, a folder or file of jsonl/json/parquet/csv/txt, or a hub id")
    loaded: dict[str, Any] = {}

    def dataset() -> Any:
        if "dsd" not in loaded:
            loaded["dsd"] = _load_hf(spec, hs, local.resolve() if looks_local else None, progress)
        return loaded["dsd"]

    if looks_local:
        root = local.resolve()
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        content: Any = _listing(root if root.is_dir() else root.parent, files)
    else:
        dsd = dataset()
        content = {name: split._fingerprint for name, split in dsd.items()}
    identity = ["hf", str(local.resolve()) if looks_local else hs.path, hs.config, hs.split, hs.column, content]

    def rows(split: Any) -> Iterator[Optional[str]]:
        for batch in split.select_columns([hs.column]).iter(batch_size=1024):
            yield from batch[hs.column]

    def documents() -> Iterator[tuple[str, Document]]:
        dsd = dataset()
        train, val = _hf_splits(spec, hs, dsd)
        if val is not None:
            yield from (("train", t) for t in rows(dsd[train]) if t is not None)
            yield from (("val", t) for t in rows(dsd[val]) if t is not None)
            return
        n = len(dsd[train])
        if n == 1:
            text = next(rows(dsd[train])) or ""
            yield from _split_one(text)
            return
        picked = validation_set([str(i) for i in range(n)])
        yield from ((("val" if i in picked else "train"), t) for i, t in enumerate(rows(dsd[train])) if t is not None)

    def count() -> int:
        dsd = dataset()
        train, val = _hf_splits(spec, hs, dsd)
        return len(dsd[train]) + (len(dsd[val]) if val else 0)

    return _Source(identity, "rows", documents, count)


def resolve(spec: str, progress: bool = False) -> _Source:
    """The source that a data spec names (``DataError`` when it names nothing usable)."""
    return _hf_source(spec, progress) if spec.startswith(HF_PREFIX) else _file_source(spec)


@dataclass
class Corpus:
    """Tokens of a corpus, split into train and validation, memory-mapped from the cache.

    ``files`` counts the documents (files, or rows of an HF dataset: ``unit``). ``bytes`` holds each
    split's UTF-8 byte count, an end-of-document token counting as one byte, so that a byte-level
    corpus has exactly one byte per token and bits per byte compare across tokenizers.
    """

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    spec: str
    files: int
    tokenizer: Tokenizer = field(default_factory=ByteTokenizer)
    tokenizer_spec: str = "byte"
    bytes: dict[str, int] = field(default_factory=dict)
    unit: str = "files"

    def tokens(self, split: str) -> np.ndarray:
        return self.train if split == "train" else self.val

    def save_tokenizer(self, folder: Union[str, Path]) -> Optional[Path]:
        """Write ``tokenizer.json`` into ``folder`` (a run or checkpoint folder) unless the tokenizer is
        bytes; then a stale one is removed, since ``tokenizer_for`` would take it for this run's."""
        path = Path(folder) / TOKENIZER_FILE
        if isinstance(self.tokenizer, ByteTokenizer):
            path.unlink(missing_ok=True)
            return None
        return self.tokenizer.save(path)  # type: ignore[attr-defined]

    def batch(self, split: str, seed: int, step: int, batch_size: int, seq_len: int,
              rows: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows (input, next-token target), determined by (seed, step) alone; ``rows``: only
        those rows of the batch (a rank's part), read from the data and nothing else."""
        data = self.tokens(split)
        if len(data) <= seq_len + 1:
            raise DataError(f"the {split} split of {self.spec!r} has {len(data)} tokens, fewer than a sequence of {seq_len + 1}; "
                            "use more data or a shorter --seq-len")
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step + (0 if split == "train" else 7_919))
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen).tolist()
        if rows is not None:
            starts = [starts[r] for r in rows]
        rows = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64)
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds ids below ``vocab_size``."""
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)


def _texts(documents: Iterator[tuple[str, Document]], split: str) -> Iterator[str]:
    for name, doc in documents:
        if name == split:
            yield doc.decode("utf-8", errors="replace") if isinstance(doc, bytes) else doc


def _prepare(source: _Source, spec: str, vocab: Optional[int], folder: Path, progress: bool) -> None:
    """Tokenize every document of ``source`` into ``folder`` (train.uN, val.uN, tokenizer.json, meta.json)."""
    tokenizer: Any = ByteTokenizer()
    if vocab is not None:
        if progress:
            print(f"training a byte-level BPE of {vocab} tokens on the train split of {spec!r} (once; cached)",
                  file=sys.stderr, flush=True)
        tokenizer = train_bpe(_texts(source.documents(), "train"), vocab, progress=progress)
        tokenizer.save(folder / TOKENIZER_FILE)
    dtype = token_dtype(tokenizer.vocab_size)
    suffix = f"u{dtype.itemsize * 8}"
    counts = {"train": 0, "val": 0}
    nbytes = {"train": 0, "val": 0}
    pending: dict[str, list[str]] = {"train": [], "val": []}
    sinks = {split: open(folder / f"{split}.{suffix}", "wb") for split in counts}

    def flush(split: str) -> None:
        if not pending[split]:
            return
        for ids in tokenizer.encode_batch(pending[split]):
            ids.append(tokenizer.eos_id)
            np.asarray(ids, dtype=dtype).tofile(sinks[split])
            counts[split] += len(ids)
        pending[split].clear()

    docs = source.count()
    try:
        bar = tqdm(total=docs, desc=f"tokenizing {spec}", unit=source.unit[:-1], disable=not progress or docs < 2,
                   dynamic_ncols=True)
        for split, doc in source.documents():
            bar.update(1)
            if vocab is None:
                data = (doc.encode("utf-8") if isinstance(doc, str) else doc).replace(b"\0", b"") + bytes([SEPARATOR])
                sinks[split].write(data)
                counts[split] += len(data)
                nbytes[split] += len(data)
                continue
            text = doc.decode("utf-8", errors="replace") if isinstance(doc, bytes) else doc
            nbytes[split] += len(text.encode("utf-8")) + 1
            pending[split].append(text)
            if len(pending[split]) >= 256:
                flush(split)
        for split in pending:
            flush(split)
        bar.close()
    finally:
        for sink in sinks.values():
            sink.close()
    meta = {"format": FORMAT, "spec": spec, "tokenizer": "byte" if vocab is None else f"bpe:{vocab}",
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "dtype": dtype.name, "suffix": suffix,
            "unit": source.unit, "documents": docs, "tokens": counts, "bytes": nbytes}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def corpus_key(source: _Source, tokenizer: str) -> str:
    """The cache key: the source's identity (files with sizes and times, or fingerprints) and tokenizer."""
    return hashlib.sha256(json.dumps([FORMAT, VAL_PERCENT, source.identity, tokenizer]).encode()).hexdigest()[:16]


def load_corpus(spec: str = "stdlib", *, tokenizer: str = "byte", refresh: bool = False,
                progress: bool = False) -> Corpus:
    """Tokenize once into ``cache_dir()/KEY/``; later calls memory-map the cached arrays.

    ``progress`` shows BPE training and tokenizing progress on stderr (only when preparing).
    """
    vocab = parse_tokenizer_spec(tokenizer)
    source = resolve(spec, progress)
    folder = cache_dir() / corpus_key(source, tokenizer)
    if refresh and folder.exists():
        trash = folder.with_name(f".{folder.name}.{os.getpid()}.old")
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if not (folder / "meta.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _prepare(source, spec, vocab, tmp, progress)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process (a torchrun rank) finished the same folder first
                if not (folder / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _open(folder, spec)


def _open(folder: Path, spec: str) -> Corpus:
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for split in ("train", "val"):
        path = folder / f"{split}.{meta['suffix']}"
        arrays[split] = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
    tokenizer: Tokenizer = ByteTokenizer()
    if meta["tokenizer"] != "byte":
        tokenizer = load_bpe(folder / TOKENIZER_FILE)
    return Corpus(arrays["train"], arrays["val"], meta["vocab_size"], spec, meta["documents"], tokenizer,
                  meta["tokenizer"], meta["bytes"], meta["unit"])
