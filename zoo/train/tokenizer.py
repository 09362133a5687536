"""Tokenizers: bytes by default (the tiny variants' 256-token vocabulary).

A tokenizer turns text into ids and back: ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``vocab_size`` and ``eos_id`` (the id that ends a document in the training data). A run or a
published checkpoint that used another tokenizer keeps it beside the weights as
``tokenizer.json``; ``tokenizer_for`` finds it there, else falls back to bytes. The other tokenizer
is a byte-level BPE (zoo/train/bpe.py) that ``zoo train --tokenizer bpe:VOCAB`` trains on the train split
(zoo/train/data.py); its ``<|endoftext|>`` (id 0) plays the part of byte 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol, Union

from ..errors import ZooError
from .bpe import load_bpe

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; byte 0 (which source text never holds) ends a document."""

    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")


def tokenizer_for(source: Union[None, str, Path] = None, vocab_size: Optional[int] = None) -> Tokenizer:
    """The tokenizer of a checkpoint (its folder's ``tokenizer.json``) or, failing that, bytes.

    ``vocab_size`` is the model's: a byte tokenizer needs at least 256 ids.
    """
    if source is not None:
        path = Path(source).expanduser()
        folder = path if path.is_dir() else path.parent
        if (folder / TOKENIZER_FILE).is_file():
            return load_bpe(folder / TOKENIZER_FILE)
    if vocab_size is not None and vocab_size < ByteTokenizer.vocab_size:
        raise ZooError(f"no {TOKENIZER_FILE} beside {source} and the model's vocab_size {vocab_size} is too small for bytes (256)")
    return ByteTokenizer()
