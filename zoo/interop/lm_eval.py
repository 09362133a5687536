"""EleutherAI's lm-evaluation-harness (``lm_eval`` 0.4.13) evaluates zoo models through this adapter.

Importing the module registers the model type ``zoo`` with lm_eval. lm_eval 0.4.13 finds models
only in its own table or in modules already imported (it reads no entry points), so run it through
this module, which registers ``zoo`` and then hands its arguments to lm_eval's own CLI::

    python -m zoo.interop.lm_eval --model zoo --model_args name=tiny-dense-hybridnorm --tasks TASK
    zoo-lm-eval --model_args checkpoint=runs/x/checkpoint/model.safetensors --tasks TASK

(``--model zoo`` is the default there.) From Python: ``import zoo.interop.lm_eval`` and then
``lm_eval.simple_evaluate(model="zoo", model_args=...)``, or pass ``ZooLM(...)`` itself.

Model arguments: ``name`` (a variant, freshly initialized unless ``pretrained=true``),
``checkpoint`` (a zoo checkpoint, a folder holding one, or a run folder; zoo/sources.py),
``pretrained``, ``batch_size``, ``device`` (default: CUDA when present, else CPU), ``max_length``
(default: the model's ``max_seq_len``), ``dtype``, ``seed`` (of a fresh variant's init). Text goes through ``zoo.train.tokenizer.tokenizer_for``: bytes,
or the ``tokenizer.json`` beside a checkpoint; its end-of-document token is the prefix of an empty
context and of a rolling window, and stops generation.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import ZooError
from ..sources import ModelSource, load_source, resolve_source
from ..train.tokenizer import tokenizer_for

INSTALL_HINT = "pip install 'hybridnorm-zoo[lm-eval]' (or pip install lm_eval==0.4.13)"

try:
    import lm_eval.models  # noqa: F401  (lm_eval's own table first: get_model imports it only into an empty registry)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ZooError(f"the lm_eval adapter needs lm-evaluation-harness: {INSTALL_HINT}") from e

log = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 8

Request = tuple[Optional[tuple[str, str]], list[int], list[int]]


_BOOL_WORDS = ("", "0", "1", "true", "false", "yes", "no", "on", "off")


def _bool(value: Union[bool, str, None]) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _batch_size(value: Union[int, str, None]) -> int:
    """lm_eval passes ``1`` by default and may pass ``auto`` or ``auto:N``; the zoo uses a fixed size."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise ZooError(f"batch_size must be at least 1, got {size}")
    return size


def _device(value: Optional[str]) -> torch.device:
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(value)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("zoo: device %s asked for but CUDA is not available; using the CPU", value)
        return torch.device("cpu")
    return device


@register_model("zoo")
class ZooLM(TemplateLM):
    """A zoo model (variant name or checkpoint) behind lm_eval's ``LM`` interface."""

    def __init__(self, name: Optional[str] = None, checkpoint: Optional[str] = None, pretrained: Union[bool, str] = False,
                 batch_size: Union[int, str, None] = None, device: Optional[str] = None, max_length: Optional[int] = None,
                 dtype: Optional[str] = None, seed: int = 0, model: Optional[torch.nn.Module] = None,
                 tokenizer: Any = None, **unused: Any) -> None:
        super().__init__()
        unused.pop("max_batch_size", None)
        if isinstance(pretrained, str) and pretrained.strip().lower() not in _BOOL_WORDS and name is None and checkpoint is None:
            name, pretrained = pretrained, True  # pretrained=NAME, as lm_eval's hf model spells it
        if unused:
            raise ZooError(f"unknown zoo model_args {sorted(unused)}; use name, checkpoint, pretrained, batch_size, "
                           "device, max_length, dtype, seed")
        if model is not None:
            source = ModelSource("given", "given", getattr(model, "variant", None))
        else:
            if (name is None) == (checkpoint is None):
                raise ZooError("give the zoo model as model_args name=VARIANT or checkpoint=PATH (exactly one)")
            if checkpoint is not None and _bool(pretrained):
                raise ZooError("pretrained=true applies to name=VARIANT; a checkpoint is loaded as it is")
            source = resolve_source(str(checkpoint if checkpoint is not None else name), pretrained=_bool(pretrained))
            model = load_source(source, seed=int(seed))
        tok = tokenizer or tokenizer_for(source.checkpoint, model.cfg.vocab_size)
        self._device = _device(device)
        self.model = model.to(self._device)
        if dtype is not None:
            if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
                raise ZooError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
            self.model.to(getattr(torch, str(dtype)))
        self.model.eval()
        self.source = source
        self.weights = "given" if source.kind == "given" else source.describe(int(seed))
        self.tokenizer_ = tok
        self.batch_size = _batch_size(batch_size)
        limit = self.model.cfg.max_seq_len
        self._max_length = limit if max_length is None else int(max_length)
        if not 1 < self._max_length <= limit:
            raise ZooError(f"max_length must lie in 2..{limit} (the model's max_seq_len), got {self._max_length}")

    # ---- lm_eval's construction: model_args win over the CLI's defaults (batch_size=1, device=cuda:0)
    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: Optional[dict[str, Any]] = None) -> "ZooLM":
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict[str, Any]] = None) -> "ZooLM":
        from lm_eval.utils import simple_parse_args_string
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---- tokenization
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer_.eos_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer_).__name__

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer_.encode(string))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer_.decode([int(t) for t in tokens])

    def get_model_info(self) -> dict[str, Any]:
        return {"model_name": self.source.variant or "zoo", "zoo_weights": self.weights,
                "model_num_parameters": sum(p.numel() for p in self.model.parameters())}

    # ---- scoring
    def _forward_logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        """Log-softmax (float32) of right-padded rows; causal attention leaves the padding unseen."""
        width = max(len(r) for r in rows)
        batch = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        with torch.inference_mode():
            logits = self.model(batch.to(self._device)).logits
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: Optional[int] = None) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation given its context, and whether greedy decoding yields it."""
        for _, context, continuation in requests:
            if not continuation:
                raise ZooError("an lm_eval request has an empty continuation; there is nothing to score")
            if len(continuation) > self.max_length:
                raise ZooError(f"a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}")
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        out: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        size = override_bs or self.batch_size
        with tqdm(total=len(requests), disable=disable_tqdm, desc="zoo loglikelihood") as bar:
            for start in range(0, len(order), size):
                chunk = order[start:start + size]
                rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in chunk]
                logprobs = self._forward_logprobs(rows)
                for j, i in enumerate(chunk):
                    cont = requests[i][2]
                    end = len(rows[j])
                    lp = logprobs[j, end - len(cont):end]
                    target = torch.tensor(cont, device=lp.device)
                    answer = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
                    out[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(chunk))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of ``max_length`` (lm_eval's rolling scheme:
        the first window starts from the end-of-document token, later ones from one token of context)."""
        windows: list[Request] = []
        owners: list[int] = []
        for k, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owners, scores):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations (greedy unless ``do_sample``) cut at the first stop sequence, through ``model.generate``
        with its KV cache: prompts of a batch are left-padded with an attention mask."""
        out: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="zoo generate_until") as bar:
            for indices in groups.values():
                kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], default_max_gen_toks=256)
                until = handle_stop_sequences(kwargs.get("until"), eos=None)
                max_new = max(0, min(int(kwargs["max_gen_toks"]), self.max_length - 1))
                temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
                encoded = {i: self.tok_encode(requests[i].args[0]) or [self.eot_token_id] for i in indices}
                indices = sorted(indices, key=lambda i: -len(encoded[i]))
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start:start + self.batch_size]
                    texts = self._generate([encoded[i][-(self.max_length - max_new):] for i in chunk], max_new,
                                           temperature, until)
                    for i, text in zip(chunk, texts):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(chunk))
        return out  # type: ignore[return-value]

    def _generate(self, prompts: list[list[int]], max_new: int, temperature: float, until: list[str]) -> list[str]:
        if max_new == 0:
            return [""] * len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        padded = not bool(mask.all())
        tokens = self.model.generate(ids.to(self._device), max_new, temperature=temperature,
                                     attention_mask=mask.to(self._device) if padded else None, eos_id=self.eot_token_id)
        texts = []
        for row in tokens[:, width:].tolist():
            if self.eot_token_id in row:
                row = row[:row.index(self.eot_token_id)]
            text = self.tok_decode(row)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            texts.append(text)
        return texts


def main(argv: Optional[list[str]] = None) -> None:
    """lm_eval's command line with the ``zoo`` model registered (and ``--model zoo`` as the default)."""
    from lm_eval.__main__ import cli_evaluate
    args = list(sys.argv[1:] if argv is None else argv)
    has_model = any(a in ("--model", "-M") or a.startswith("--model=") for a in args)
    if args and not has_model and args[0] not in ("ls", "validate", "-h", "--help"):
        args = ["run", "--model", "zoo", *args[1:]] if args[0] == "run" else ["--model", "zoo", *args]
    sys.argv = [sys.argv[0] if sys.argv else "zoo-lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
