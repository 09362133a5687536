"""The plugin contract: five callback-style hooks, each handed a ``register(name, obj)`` function.

A plugin is any module or object with functions marked ``@zoo.hookimpl`` whose names are the hooks
below. It is found through the ``zoo`` entry-point group (or ``zoo.register_plugin(obj)`` at run
time). Each hook may call ``register`` zero, one or many times. Names are lowercase
(``[a-z0-9][a-z0-9._-]*``) and must be unique across plugins. ``docs/plugins.md`` is a tutorial.
"""
from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("zoo")
hookimpl = pluggy.HookimplMarker("zoo")

Register = Callable[[str, Any], None]


@hookspec
def register_norm_strategies(register: Register) -> None:
    """Register norm strategies: subclasses of ``zoo.NormStrategy``.

    A strategy is built once per layer as ``cls(cfg, layer, make_norm, options)`` and wires one
    block in ``forward(x, attn, ffn)``: where the norms sit and where each residual is taken. Class
    attributes say what else it needs: ``qkv_norm`` (which of ``"q"``, ``"k"``, ``"v"`` the
    attention normalizes) and ``qkv_norm_width`` (``"head"`` or ``"full"``), ``final_norm`` and
    ``embed_norm`` (model-level norms), ``Options`` (a dataclass of its settings, filled from the
    config's ``norm_options``). ``init_scheme(init)`` may change the weight init (DeepNorm does).
    Example: ``register("hybridnorm", HybridNorm)``.
    """


@hookspec
def register_norm_layers(register: Register) -> None:
    """Register norm layers: callables ``make(dim, *, eps, **norm_layer_options) -> nn.Module``.

    A class such as ``RMSNorm(dim, eps=1e-5)`` qualifies. Strategies and attention get them
    through ``make_norm(dim)``, so a new norm layer runs in every placement.
    Example: ``register("rmsnorm", RMSNorm)``.
    """


@hookspec
def register_attention(register: Register) -> None:
    """Register attention modules: subclasses of ``zoo.Attention``.

    Built per layer as ``cls(cfg, layer, make_norm, qkv_norm=..., qkv_norm_width=..., options=...)``
    and called as ``attn(x)`` on ``(batch, seq, d_model)`` with causal masking.
    ``init_weights(init)`` initializes its weights by role (``"q"``, ``"k"``, ``"v"``, ``"o"``).
    Example: ``register("mha", MultiHeadAttention)``.
    """


@hookspec
def register_routers(register: Register) -> None:
    """Register MoE routers: subclasses of ``zoo.moe.Router`` (an ``nn.Module``).

    Built per MoE layer as ``cls(cfg, layer, options)`` (options from ``moe.router_options``); its
    gate is ``router.layer`` (E, d_model). ``route(logits)`` returns a ``zoo.moe.Routing``: flat
    (token, expert, weight) assignments plus what the aux losses and statistics need.
    Example: ``register("topk", TopKRouter)``.
    """


@hookspec
def register_variants(register: Register) -> None:
    """Register named variants: ``zoo.Variant`` objects (or a plain config mapping).

    A variant is a config (YAML files and mappings merged in order over the defaults) plus a
    description. Example: ``register("tiny-dense-prenorm", Variant(config=[...], description=...))``.
    """
