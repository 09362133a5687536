"""Byte-level BPE tokenizers, trained with HF ``tokenizers`` (an optional dependency: the ``data`` extra).

The tokenizer is GPT-2 style byte-level BPE: the 256 byte symbols are always in the vocabulary, so
any text round-trips exactly (no unknown token, no normalization). One special token,
``<|endoftext|>``, has id 0 and ends each document in the training data (the ``eos_id`` of
zoo.train.tokenizer's interface); text that happens to contain that string is encoded as plain text, so
only the data pipeline places it. Training is deterministic: the same texts and vocabulary size
give the same ``tokenizer.json``, byte for byte.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Union

from ..errors import ZooError
from ..files import write_text

EOS_TOKEN = "<|endoftext|>"
EOS_NAMES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")  # accepted in a tokenizer.json made elsewhere
MIN_VOCAB = 257  # 256 byte symbols and the end-of-document token
INSTALL_HINT = "pip install 'hybridnorm-zoo[data]' (or pip install tokenizers)"


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise ZooError(f"a BPE tokenizer needs the 'tokenizers' package: {INSTALL_HINT}") from e
    return tokenizers


class BPETokenizer:
    """A ``tokenizers.Tokenizer`` behind the zoo's tokenizer interface (zoo.train.tokenizer.Tokenizer)."""

    def __init__(self, tokenizer: Any) -> None:
        self.backend = tokenizer
        self.backend.encode_special_tokens = True  # not stored in tokenizer.json; literal "<|endoftext|>" is text
        eos = next((tokenizer.token_to_id(name) for name in EOS_NAMES if tokenizer.token_to_id(name) is not None), None)
        if eos is None:
            raise ZooError(f"the tokenizer has no end-of-document token (one of {', '.join(EOS_NAMES)})")
        self.eos_id: int = eos
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special token added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` over many texts at once (in parallel threads of ``tokenizers``; no offsets when it can)."""
        batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``; special tokens (the end-of-document separator) are dropped."""
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def to_str(self) -> str:
        return self.backend.to_str()

    def save(self, path: Union[str, Path]) -> Path:
        """Write ``tokenizer.json`` atomically (concurrent writers of the same file are safe)."""
        return write_text(path, self.to_str())

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def train_bpe(texts: Iterable[str], vocab_size: int, *, progress: bool = False,
              length: Optional[int] = None) -> BPETokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` tokens (``<|endoftext|>`` is id 0) on ``texts``.

    The vocabulary is smaller when the texts run out of pairs to merge. ``length`` (the number of
    texts) only sizes the progress bar.
    """
    if vocab_size < MIN_VOCAB:
        raise ZooError(f"a byte-level BPE needs a vocab_size of at least {MIN_VOCAB} (256 bytes and {EOS_TOKEN}), "
                       f"not {vocab_size}")
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=progress,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer, length=length)
    return BPETokenizer(tokenizer)


def load_bpe(path: Union[str, Path]) -> BPETokenizer:
    """A tokenizer saved by ``BPETokenizer.save`` (or any ``tokenizer.json`` with an end-of-document token)."""
    path = Path(path)
    tk = _tokenizers()
    try:
        backend = tk.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception for unreadable files)
        raise ZooError(f"{path}: not a readable tokenizer.json ({e}); delete it or train a new one") from e
    return BPETokenizer(backend)
