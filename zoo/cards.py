"""Model cards, generated from a variant's config and measured results; never written by hand.

``render_card`` returns an HF-style README (YAML front matter + Markdown). ``zoo card --check``
compares every variant's card under ``model_cards/`` with a fresh render, so a card cannot drift
from its config. Measured results come from ``model_cards/results/<name>.json`` when a training
run wrote one (keys: ``val_loss``, ``train_loss``, ``tokens``, ``dataset``, ``recipe``), and
``zoo eval --write-card`` adds an ``eval`` entry (``loss``, ``perplexity``, ``bits_per_byte``, ``tokens``,
``data``, ``split``, ``seq_len``, ``weights``) shown under Results and in the model-index.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Optional

import yaml

from .builder import empty_model, get_config, model_stats
from .config import ModelConfig
from .registry import REGISTRY
from .text import human

LICENSE = "apache-2.0"
CITATION = """@inproceedings{zhuo2025hybridnorm,
  title     = {HybridNorm: Towards Stable and Efficient Transformer Training via Hybrid Normalization},
  author    = {Zhuo, Zhijian and Zeng, Yutao and Wang, Ya and Zhang, Sijun and Yang, Jian and Li, Xiaoqing and Zhou, Xun and Ma, Jinwen},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2025},
  note      = {arXiv:2503.04598}
}"""


def _qkv_norms(cfg: ModelConfig) -> str:
    """What each layer's attention normalizes, read from the built model (a strategy may set it per layer):
    one statement when all layers agree, else one per run of equal layers."""
    model = empty_model(cfg)
    said = []
    for block in model.blocks:
        strategy = block.strategy
        qkv = ", ".join(strategy.qkv_norm) if strategy.qkv_norm else "none"
        said.append(f"{qkv} (width: {strategy.qkv_norm_width})" if strategy.qkv_norm else "none")
    runs: list[tuple[int, int, str]] = []
    for layer, text in enumerate(said):
        if runs and runs[-1][2] == text:
            runs[-1] = (runs[-1][0], layer, text)
        else:
            runs.append((layer, layer, text))
    if len(runs) == 1:
        return runs[0][2]
    return "; ".join(f"layer{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''}: {text}" for a, b, text in runs)


def _placement(cfg: ModelConfig) -> str:
    strategy = REGISTRY.get("norm strategy", cfg.norm_strategy)
    doc = inspect.getdoc(strategy) or f"{cfg.norm_strategy} (no description)"
    final = cfg.final_norm if cfg.final_norm is not None else strategy.final_norm
    embed = cfg.embed_norm if cfg.embed_norm is not None else strategy.embed_norm
    return (f"{doc}\n\nHere `N` is `{cfg.norm_layer}` (eps {cfg.norm_eps:g}), `A` attention, `F` the FFN. "
            f"Normalized inside attention: {_qkv_norms(cfg)}. "
            f"Final norm before the LM head: {'yes' if final else 'no'}. Embedding norm: {'yes' if embed else 'no'}.")


def _architecture(cfg: ModelConfig, st: Any) -> str:
    attn = cfg.attention
    window = attn.sliding_window if attn.sliding_window is not None else "none"
    if cfg.is_moe:
        m = cfg.moe
        ffn = (f"MoE: {m.num_experts} SwiGLU experts of hidden {m.hidden_size}, top-{m.top_k}, router `{m.router}` "
               f"{json.dumps(m.router_options, sort_keys=True)}, dropless, LB weight {m.lb_weight:g} "
               f"(1 at perfect balance), z-loss weight {m.z_weight:g}, shared experts {m.shared_experts}")
    else:
        ffn = f"dense SwiGLU, hidden {cfg.ffn.hidden_size}"
    rows = [
        ("layers", cfg.n_layers), ("d_model", cfg.d_model),
        ("heads (query / key-value)", f"{cfg.n_heads} / {cfg.kv_heads}, head size {cfg.head_size}"),
        ("attention", f"`{attn.type}`, RoPE theta {attn.rope_theta:g}, sliding window {window}"),
        ("FFN", ffn), ("norm strategy", f"`{cfg.norm_strategy}` {json.dumps(cfg.norm_options, sort_keys=True)}"),
        ("norm layer", f"`{cfg.norm_layer}`, eps {cfg.norm_eps:g}"),
        ("vocabulary", f"{cfg.vocab_size}, {'tied' if cfg.tie_embeddings else 'untied'} embeddings"),
        ("context", cfg.max_seq_len),
        ("parameters", f"{st.total_params:,} total ({human(st.total_params)}), {st.active_params:,} active "
                       f"({human(st.active_params)})"),
        ("FLOPs per token", f"{st.flops_per_token:,} forward at sequence {st.seq_len} ({human(st.flops_per_token)}); "
                            f"training step about 3x ({human(st.train_flops_per_token)})"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def front_matter(name: str, cfg: ModelConfig, tags: tuple[str, ...], results: Optional[dict[str, Any]],
                 base_model: Optional[str] = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "library_name": "hybridnorm-zoo", "license": LICENSE, "pipeline_tag": "text-generation",
        "tags": ["hybridnorm-zoo", cfg.norm_strategy, "moe" if cfg.is_moe else "dense", cfg.norm_layer, *tags],
    }
    train, ev = split_results(results)
    if train:
        data["datasets"] = [train.get("dataset", "python-stdlib")]
    elif ev:
        data["datasets"] = [_dataset(ev.get("data", "stdlib"))[0]]
    if base_model:
        data["base_model"] = base_model
    index = []
    if train and "val_loss" in train:
        index.append({
            "task": {"type": "text-generation", "name": "Causal language modeling"},
            "dataset": {"type": train.get("dataset", "python-stdlib"), "name": train.get("dataset_name", "Python standard library source"),
                        "split": "validation"},
            "metrics": [{"type": "loss", "name": "validation loss (nats/token)", "value": round(float(train["val_loss"]), 4)}],
        })
    if ev:
        kind, label = _dataset(ev.get("data", "stdlib"))
        index.append({
            "task": {"type": "text-generation", "name": "Causal language modeling (zoo eval)"},
            "dataset": {"type": kind, "name": label, "split": "validation" if ev.get("split", "val") == "val" else ev["split"]},
            "metrics": [{"type": key, "name": EVAL_METRICS[key], "value": round(float(ev[key]), 4)}
                        for key in EVAL_METRICS if key in ev],
        })
    if index:
        data["model-index"] = [{"name": name, "results": index}]
    return data


EVAL_METRICS = {"loss": "loss (nats/token)", "perplexity": "perplexity", "bits_per_byte": "bits per byte"}


def split_results(results: Optional[dict[str, Any]]) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """A results file's training numbers and its ``eval`` entry (written by ``zoo eval --write-card``)."""
    results = dict(results or {})
    ev = results.pop("eval", None)
    return results, ev if isinstance(ev, dict) and ev else None


def _dataset(spec: str) -> tuple[str, str]:
    return ("python-stdlib", "Python standard library source") if spec == "stdlib" else (spec, spec)


def _eval_md(ev: dict[str, Any]) -> str:
    """The Results subsection of a ``zoo eval --write-card`` entry."""
    split = "validation" if ev.get("split", "val") == "val" else ev["split"]
    tokens = f"{ev['tokens']:,} tokens" if "tokens" in ev else "every token"
    window = f" in windows of {ev['seq_len']}" if "seq_len" in ev else ""
    weights = f" Weights: {ev['weights']}." if ev.get("weights") else ""
    rows = "\n".join(f"| {EVAL_METRICS[k]} | {ev[k]:.4f} |" for k in EVAL_METRICS if k in ev)
    return (f"### Evaluation\n\n`zoo eval` on the {split} split of `{ev.get('data', 'stdlib')}`: {tokens}{window}, each "
            f"predicted once.{weights}\n\n| metric | value |\n|---|---|\n{rows}")


def render_card(name: str, cfg: Optional[ModelConfig] = None, results: Optional[dict[str, Any]] = None,
                base_model: Optional[str] = None, weights_note: Optional[str] = None) -> str:
    """The card of variant ``name`` (config from the registry unless given) with ``results``;
    ``weights_note`` replaces the sentence about the weights (``zoo publish`` says which weights it published)."""
    variant = REGISTRY.get("variant", name) if cfg is None or name in REGISTRY.names("variant") else None
    cfg = cfg or get_config(name)
    st = model_stats(cfg)
    fm = yaml.safe_dump(front_matter(name, cfg, tuple(variant.tags) if variant else (), results, base_model), sort_keys=False)
    description = variant.description if variant and variant.description else f"A hybridnorm-zoo model ({cfg.norm_strategy})."
    train, ev = split_results(results)
    if train:
        recipe = train.get("recipe", "see the training log")
        weights = f"Trained by the zoo's recipe: {recipe}."
        results_md = "\n".join(f"| {k} | {v} |" for k, v in sorted(train.items()) if k not in ("recipe",))
        results_md = "| metric | value |\n|---|---|\n" + results_md
    else:
        weights = "No trained weights are published for this variant: `zoo.build` gives it freshly initialized."
        results_md = "No measured results yet." if ev is None else ""
    if ev is not None:
        results_md = f"{results_md}\n\n{_eval_md(ev)}".strip()
    if weights_note is not None:
        weights = weights_note
    return f"""---
{fm}---

# {name}

{description}

{weights}

## Architecture

{_architecture(cfg, st)}

## Norm placement: `{cfg.norm_strategy}`

{_placement(cfg)}

## Initialization

Truncated normal at {cfg.init.cutoff_factor:g} sigma with sigma = {cfg.init_std:.6g} (sqrt(2 / (5 d)) unless overridden);
residual output projections sigma / sqrt(2 L) = {cfg.init_std / (2 * cfg.n_layers) ** 0.5 if cfg.init.scale_residual else cfg.init_std:.6g};
norm gains 1 (the HybridNorm paper's Megatron/SmallInit scheme; a strategy may change it, as DeepNorm does).

## Results

{results_md}

## How to use

```python
import zoo
model = zoo.build("{name}")            # build by name (freshly initialized)
model = zoo.load("model.safetensors")  # or load a checkpoint: the file alone rebuilds the model
```

```bash
zoo info {name}                        # config, parameters, FLOPs per token
zoo pull {name}                        # download and verify published weights, where there are any
```

## Citation

```bibtex
{CITATION}
```
"""


def load_results(name: str, cards_dir: Path) -> Optional[dict[str, Any]]:
    path = cards_dir / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def check_cards(cards_dir: Path, names: list[str]) -> list[str]:
    """Names whose card under ``cards_dir`` is missing or differs from a fresh render."""
    stale = []
    for name in names:
        path = cards_dir / f"{name}.md"
        if not path.exists() or path.read_text() != render_card(name, results=load_results(name, cards_dir)):
            stale.append(name)
    return stale


UNTRAINED_NOTE = ("The weights published here are **untrained**: freshly initialized by `zoo.build(\"{name}\")` with "
                  "`torch.manual_seed({seed})`, so that publish, serve and pull work end to end before the zoo's "
                  "training recipe lands. They check the plumbing; they are not a language model.")
CHECKPOINT_NOTE = ("The weights published here come from the zoo checkpoint `{source}`; no measured results were "
                   "published with them.")
RESULTS_NOTE = ("The weights published here come from the zoo checkpoint `{source}`, trained by the zoo's recipe: "
                "{recipe}. Its own measured numbers are under Results.")
