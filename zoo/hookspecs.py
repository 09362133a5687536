"""The plugin contract: five callback-style hooks, each handed a ``register(name, obj)`` function.

A plugin is any module or object with functions marked ``@zoo.hookimpl`` whose names are the hooks
below. It is found through the ``zoo`` entry-point group (or ``zoo.register_plugin(obj)`` at run
time). Each hook may call ``register`` zero, one or many times. Names are lowercase
(``[a-z0-9][a-z0-9._-]*``) and must be unique across plugins.

These docstrings are the reference: docs/plugins.md teaches the same contract with examples, and
tests/test_docs.py checks it against them (each ``Constructor``, ``Attributes`` and ``Methods`` line
against the base class and against the docs).
"""
from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("zoo")
hookimpl = pluggy.HookimplMarker("zoo")

Register = Callable[[str, Any], None]


@hookspec
def register_norm_strategies(register: Register) -> None:
    """Register norm strategies: subclasses of ``zoo.NormStrategy``, each wiring one block's norms and residuals.

    Constructor: ``cls(cfg, layer, make_norm, options)``, once per layer; ``make_norm(dim)`` makes the
    configured norm layer, ``options`` is the ``Options`` instance filled from ``norm_options`` (or None).
    Attributes: ``norms`` (the norms the base class makes, ``make_norm(d_model)`` each), ``qkv_norm`` (which
    of "q", "k", "v" the attention normalizes), ``qkv_norm_width`` ("head" or "full"), ``final_norm`` and
    ``embed_norm`` (model-level norms), ``Options`` (a dataclass of settings).
    Methods: ``forward(x, attn, ffn)`` (the block; call ``attn`` and ``ffn`` once each), ``norm_names()``
    (the norms of this layer, default ``norms``), ``init_scheme(init)`` (the block's weight init, DeepNorm's
    is its own).
    Example: ``register("hybridnorm", HybridNorm)``.
    """


@hookspec
def register_norm_layers(register: Register) -> None:
    """Register norm layers: callables ``make(dim, *, eps, **norm_layer_options) -> nn.Module``.

    A class such as ``RMSNorm(dim, eps=1e-5)`` qualifies. Strategies and attention get them through
    ``make_norm(dim)``, so a new norm layer runs in every placement; its options are checked against
    its signature, and ``reset_parameters()`` sets its parameters on every build.
    Example: ``register("rmsnorm", RMSNorm)``.
    """


@hookspec
def register_attention(register: Register) -> None:
    """Register attention modules: subclasses of ``zoo.Attention``, mapping ``(batch, seq, d_model)`` to the same, causally.

    Constructor: ``cls(cfg, layer, make_norm, *, qkv_norm, qkv_norm_width, options)``, once per layer;
    ``qkv_norm`` and ``qkv_norm_width`` come from the block's strategy, ``options`` from ``attention.options``.
    Attributes: ``Options`` (a dataclass of settings), ``supports_cache`` (KV-cached generation),
    ``record_max_logit`` / ``last_max_logit`` (the largest attention logit, which the trainer logs).
    Methods: ``forward(x, cache, positions, mask)`` (``x`` alone in training), ``init_weights(init)`` (roles
    "q", "k", "v", "o"), ``add_qkv_norms(head_dim, widths)`` and ``normalize_qkv(q, k, v)`` (the strategy's
    Q/K/V norms, made and applied).
    Example: ``register("mha", MultiHeadAttention)``.
    """


@hookspec
def register_routers(register: Register) -> None:
    """Register MoE routers: subclasses of ``zoo.moe.Router``, mapping tokens to (token, expert, weight) assignments.

    Constructor: ``cls(cfg, layer_idx, options)``, once per MoE layer; ``options`` from ``moe.router_options``.
    The gate is ``router.layer`` (E, d_model).
    Attributes: ``Options`` (a dataclass of settings), ``balancing_loss`` (False where the router balances by
    construction), ``causal`` (False where a token's routing depends on later tokens).
    Methods: ``route(logits)`` (a ``zoo.moe.Routing`` from the fp32 (T, E) logits, on real tensors only),
    ``assignments(tokens)`` (how many assignments a batch makes, for FLOP counts), ``token_choice(logits, probs,
    weights, indices)`` (the Routing of k experts per token), ``init_weights(init)`` (role "router").
    Example: ``register("topk", TopKRouter)``.
    """


@hookspec
def register_variants(register: Register) -> None:
    """Register named variants: ``zoo.Variant`` objects (or a plain config mapping, or a YAML path).

    A variant is a config (YAML files and mappings merged in order over the defaults) plus a
    description and tags. Example: ``register("tiny-dense-prenorm", Variant(config=[...], description=...))``.
    """
