"""Deterministic held-out evaluation: loss, perplexity and bits per byte over a whole split.

Unlike the trainer's quick ``val_loss`` (a few random windows), ``evaluate`` walks the split in
order and predicts every token exactly once, so two runs on the same model and data give the same
number, and numbers from different tokenizers compare through bits per byte. The split is read as
one stream with the document separator (the tokenizer's ``eos_id``, byte 0 for bytes) prepended,
and cut into non-overlapping windows of ``seq_len`` inputs: window k reads ``stream[kT : kT+T]`` and
predicts ``stream[kT+1 : kT+T+1]``. So the first token is predicted from the separator, as a
document start is in training, and each window restarts the context (no sliding overlap: the loss
is a little higher than a sliding-window evaluation would give, never lower).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ZooError
from ..files import write_json
from .data import SEPARATOR, Corpus, DataError, load_corpus, token_dtype
from .tokenizer import ByteTokenizer

SPLITS = ("train", "val")


class EvalError(ZooError):
    """An evaluation that cannot run as asked (bad split, window or cap)."""


@dataclass
class EvalResult:
    """What ``evaluate`` measured; ``loss`` is the mean cross entropy in nats per predicted token."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    data: str
    split: str
    seq_len: int
    windows: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def corpus_tokenizer(corpus: Corpus) -> Any:
    """The corpus's tokenizer; None for an older ``Corpus`` without one (its tokens are bytes)."""
    return getattr(corpus, "tokenizer", None)


def count_bytes(tokens: Sequence[int], tokenizer: Any = None) -> int:
    """UTF-8 bytes that ``tokens`` stand for, an end-of-document token counting as one byte
    (``Corpus.bytes`` counts so too): one per token for bytes.

    This is the hook for non-byte tokenizers: one that knows its pieces' byte lengths may provide
    ``count_bytes(ids) -> int``; otherwise the other tokens are decoded at once (decoding piece by
    piece would split multi-byte characters).
    """
    if _is_bytes(tokenizer):
        return len(tokens)
    if hasattr(tokenizer, "count_bytes"):
        return int(tokenizer.count_bytes(tokens))
    ids = np.asarray(tokens, dtype=np.int64)
    text = ids[ids != tokenizer.eos_id]
    return len(tokenizer.decode(text.tolist()).encode("utf-8")) + int(len(ids) - len(text))


def evaluated_bytes(corpus: Corpus, split: str, n: int) -> int:
    """Bytes of the first ``n`` tokens of ``split``: the count the corpus recorded when that is the whole split."""
    tokenizer = corpus_tokenizer(corpus)
    data = _split_array(corpus, split)
    recorded = (getattr(corpus, "bytes", None) or {}).get(split)
    if not _is_bytes(tokenizer) and recorded is not None and n == len(data):
        return int(recorded)
    return count_bytes(data[:n], tokenizer)


def _split_array(corpus: Corpus, split: str) -> np.ndarray:
    if split not in SPLITS:
        raise EvalError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    data = corpus.train if split == "train" else corpus.val
    if len(data) == 0:
        raise DataError(f"the {split} split of {corpus.spec!r} is empty; give more files or another --data")
    return data


def _check_positive(**values: Optional[int]) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise EvalError(f"{name} must be at least 1, got {value}")


def retokenize(corpus: Corpus, tokenizer: Any, split: str = "val") -> Corpus:
    """``split`` of a byte corpus re-encoded with ``tokenizer`` (in memory), so a model that uses
    another tokenizer is scored on exactly the same text; byte counts come from the byte corpus.

    Documents are the byte runs between separators; each is encoded alone and ends in ``eos_id``.
    """
    if not _is_bytes(corpus_tokenizer(corpus)):
        raise EvalError(f"retokenize needs a byte corpus; {corpus.spec!r} is tokenized with {corpus_tokenizer(corpus)!r}")
    raw = np.asarray(_split_array(corpus, split)).tobytes()
    docs = [d.decode("utf-8", errors="replace") for d in raw.split(bytes([SEPARATOR]))]
    if raw.endswith(bytes([SEPARATOR])):
        docs.pop()
    encode_batch = getattr(tokenizer, "encode_batch", None)
    encoded = encode_batch(docs) if encode_batch else [tokenizer.encode(d) for d in docs]
    ids: list[int] = []
    for doc_ids in encoded:
        ids.extend(doc_ids)
        ids.append(tokenizer.eos_id)
    if not raw.endswith(bytes([SEPARATOR])) and ids:
        ids.pop()
    tokens = np.asarray(ids, dtype=token_dtype(tokenizer.vocab_size))
    empty = np.zeros(0, dtype=tokens.dtype)
    return Corpus(tokens if split == "train" else empty, tokens if split == "val" else empty, tokenizer.vocab_size,
                  corpus.spec, corpus.files, tokenizer=tokenizer, tokenizer_spec="model", bytes={split: len(raw)},
                  unit=getattr(corpus, "unit", "files"))


def _is_bytes(tokenizer: Any) -> bool:
    return tokenizer is None or isinstance(tokenizer, ByteTokenizer)


def _fingerprint(tokenizer: Any) -> Any:
    to_str = getattr(tokenizer, "to_str", None)
    return to_str() if to_str else id(tokenizer)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, corpus_or_spec: Union[Corpus, str, None] = "stdlib", *, split: str = "val",
             seq_len: Optional[int] = None, batch_size: int = 8, max_tokens: Optional[int] = None,
             progress: bool = True, tokenizer: Any = None) -> EvalResult:
    """Loss (nats/token), perplexity and bits per byte of ``model`` on a corpus split.

    ``corpus_or_spec`` is a ``Corpus`` or a data spec (``stdlib``, a text file or folder, as for
    ``zoo train --data``). ``seq_len`` defaults to the model's ``max_seq_len``. ``max_tokens`` caps
    the predicted tokens at the first N of the split; the default (None) evaluates the whole split
    (the stdlib validation split is about 744K byte tokens). ``tokenizer`` is the model's when it
    is not bytes (``zoo.train.tokenizer.tokenizer_for(checkpoint)``): a byte corpus is then re-encoded
    with it (``retokenize``).
    """
    cfg = model.cfg
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    _check_positive(seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)
    if seq_len > cfg.max_seq_len:
        raise EvalError(f"seq_len {seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    if split not in SPLITS:
        raise EvalError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    corpus = corpus_or_spec if isinstance(corpus_or_spec, Corpus) else load_corpus(corpus_or_spec or "stdlib")
    if not _is_bytes(tokenizer) and _is_bytes(corpus_tokenizer(corpus)):
        corpus = retokenize(corpus, tokenizer, split)
    elif not _is_bytes(tokenizer) and _fingerprint(tokenizer) != _fingerprint(corpus_tokenizer(corpus)):
        raise EvalError(f"{corpus.spec!r} is tokenized with another tokenizer than the model's; pass the byte corpus "
                        "(a data spec) and the model's tokenizer, and the text is re-encoded with it")
    if corpus.vocab_size > cfg.vocab_size:
        raise EvalError(f"the corpus's tokenizer has {corpus.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}")
    eos = getattr(corpus_tokenizer(corpus), "eos_id", SEPARATOR)
    data = _split_array(corpus, split)
    n = len(data) if max_tokens is None else min(max_tokens, len(data))
    device = next(model.parameters()).device
    starts = list(range(0, n, seq_len))
    full = [s for s in starts if s + seq_len <= n]
    tail = [s for s in starts if s + seq_len > n]
    was_training = model.training
    model.eval()
    total = 0.0
    began = time.perf_counter()
    bar = tqdm(total=n, desc=f"eval {corpus.spec}:{split}", unit="tok", unit_scale=True, disable=not progress,
               file=sys.stderr, leave=False)
    try:
        for i in range(0, len(full), batch_size):
            total += _windows_nll(model, data, full[i:i + batch_size], seq_len, eos, device)
            bar.update(len(full[i:i + batch_size]) * seq_len)
        for s in tail:
            total += _windows_nll(model, data, [s], n - s, eos, device)
            bar.update(n - s)
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - began
    n_bytes = evaluated_bytes(corpus, split, n)
    loss = total / n
    return EvalResult(loss=loss, perplexity=_exp(loss), bits_per_byte=total / (max(n_bytes, 1) * math.log(2)),
                      tokens=n, bytes=n_bytes, data=corpus.spec, split=split, seq_len=seq_len, windows=len(starts),
                      seconds=seconds)


def _windows_nll(model: torch.nn.Module, data: np.ndarray, starts: list[int], length: int, eos: int,
                 device: torch.device) -> float:
    """Summed negative log-likelihood of ``data[s:s+length]`` for each start, each given only what precedes it in its window."""
    rows = []
    for s in starts:
        targets = np.asarray(data[s:s + length], dtype=np.int64)
        first = np.int64(eos) if s == 0 else np.int64(data[s - 1])
        rows.append(np.concatenate([[first], targets]))
    tokens = torch.from_numpy(np.stack(rows)).to(device)
    logits = model(tokens[:, :-1]).logits
    return float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction="sum"))


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def write_card_results(name: str, result: EvalResult, cards_dir: Union[str, Path], weights: str) -> Path:
    """Merge ``{"eval": ...}`` into ``cards_dir/results/NAME.json``, keeping what training wrote there."""
    path = Path(cards_dir) / "results" / f"{name}.json"
    try:
        existing = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: cannot read the existing results ({e}); fix or remove it") from None
    if not isinstance(existing, dict):
        raise EvalError(f"{path}: expected a JSON object of results; fix or remove it")
    existing["eval"] = {"loss": round(result.loss, 6), "perplexity": round(result.perplexity, 4),
                        "bits_per_byte": round(result.bits_per_byte, 6), "tokens": result.tokens, "bytes": result.bytes,
                        "data": result.data, "split": result.split, "seq_len": result.seq_len, "weights": weights}
    return write_json(path, existing)
