"""Training data: the embedded corpus (the running Python's standard library source), text files
and folders; byte-level tokens prepared once into a cached memory-mapped array.

The split is by file and deterministic (a hash of each file's relative path), so validation text
is never trained on. Batches are a pure function of (seed, step): resuming at step s draws exactly
the batches an uninterrupted run would have drawn.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import ZooError

SEPARATOR = 0  # byte 0 ends each document; it does not occur in source text
VAL_PERCENT = 3
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".c", ".h", ".html")


class DataError(ZooError):
    """A data spec that names nothing readable, or a corpus too small to train on."""


def cache_dir() -> Path:
    root = os.environ.get("ZOO_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hybridnorm-zoo")
    return Path(root) / "data"


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's ``.py`` files (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts
                   and p.is_file())
    return root, files


def spec_files(spec: str) -> tuple[Path, list[Path]]:
    """Resolve a data spec: ``stdlib``, a text file, or a folder (its text files, recursively)."""
    if spec == "stdlib":
        return stdlib_files()
    path = Path(spec).expanduser()
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no text files ({', '.join(TEXT_SUFFIXES)}) in this folder")
        return path, files
    raise DataError(f"data spec {spec!r} is neither 'stdlib' nor an existing file or folder")


def is_validation(relpath: str) -> bool:
    return int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


@dataclass
class Corpus:
    """Byte tokens of a corpus, split into train and validation, memory-mapped from the cache."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    spec: str
    files: int

    def batch(self, split: str, seed: int, step: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows (input, next-token target), determined by (seed, step) alone."""
        data = self.train if split == "train" else self.val
        if len(data) <= seq_len + 1:
            raise DataError(f"the {split} split of {self.spec!r} has {len(data)} tokens, fewer than a sequence of {seq_len + 1}")
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step + (0 if split == "train" else 7_919))
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen).tolist()
        rows = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64)
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]


def load_corpus(spec: str = "stdlib", *, refresh: bool = False) -> Corpus:
    """Tokenize (bytes) once into ``cache_dir()``; later calls memory-map the cached arrays."""
    root, files = spec_files(spec)
    listing = [(str(p.relative_to(root)), p.stat().st_size) for p in files]
    key = hashlib.sha256(json.dumps([str(root), listing]).encode()).hexdigest()[:16]
    base = cache_dir() / key
    paths = {split: base.with_suffix(f".{split}.u8") for split in ("train", "val")}
    if refresh or not all(p.exists() for p in paths.values()):
        base.parent.mkdir(parents=True, exist_ok=True)
        chunks: dict[str, list[bytes]] = {"train": [], "val": []}
        for (rel, _), path in zip(listing, files):
            try:
                data = path.read_bytes().replace(b"\0", b"")
            except OSError:
                continue
            chunks["val" if is_validation(rel) and len(files) > 1 else "train"].append(data + bytes([SEPARATOR]))
        if len(files) == 1:  # one file: its last VAL_PERCENT for validation
            text = chunks["train"][0]
            cut = len(text) * (100 - VAL_PERCENT) // 100
            chunks = {"train": [text[:cut]], "val": [text[cut:]]}
        for split, parts in chunks.items():
            tmp = paths[split].with_suffix(".tmp")
            tmp.write_bytes(b"".join(parts))
            os.replace(tmp, paths[split])
    arrays = {s: np.memmap(p, dtype=np.uint8, mode="r") if p.stat().st_size else np.zeros(0, np.uint8) for s, p in paths.items()}
    return Corpus(arrays["train"], arrays["val"], 256, spec, len(files))


def describe(corpus: Corpus) -> str:
    return f"{corpus.spec}: {corpus.files} files, {len(corpus.train):,} train / {len(corpus.val):,} validation byte tokens"


def corpus_for(spec: Optional[str]) -> Corpus:
    return load_corpus(spec or "stdlib")
