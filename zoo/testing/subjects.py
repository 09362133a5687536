"""What the conformance kit checks: a registered plugin name of one kind, and the small models that use it.

A norm layer, norm strategy or attention is checked inside a small dense model and a small MoE model; a
router inside the MoE one; a variant at its own shape shrunk to the kit's size (its full size is only
built on ``meta``). A plugin that needs particular settings to build (a top-1 router) says so in its
class attribute ``check_overrides``, config overrides that the kit applies to every model it builds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..builder import get_config
from ..config import ModelConfig
from ..errors import ConfigError, UnknownNameError
from ..registry import KINDS, REGISTRY

SMALL = ("n_layers=2", "d_model=64", "n_heads=4", "n_kv_heads=null", "head_dim=null", "vocab_size=64", "max_seq_len=64",
         "ffn.hidden_size=128", "moe.hidden_size=64", "moe.num_experts=4", "moe.top_k=2", "moe.shared_experts=0",
         "moe.shared_hidden_size=null", "moe.shared_gate=false", "moe.first_dense_layers=0")
BASE = {"dense": "tiny-dense-prenorm", "moe": "tiny-moe-prenorm"}
KEY = {"norm strategy": "norm_strategy", "norm layer": "norm_layer", "attention": "attention.type", "router": "moe.router"}


@dataclass(frozen=True)
class Subject:
    """One plugin name under check: ``kind`` (a registry kind) and ``name``; ``overrides`` are applied to every
    model built for it, after the kit's own."""

    kind: str
    name: str
    overrides: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.kind.replace(' ', '-')}:{self.name}"

    @property
    def plugin(self) -> object:
        return REGISTRY.get(self.kind, self.name)

    def kinds_of_model(self) -> tuple[str, ...]:
        """Which small models the checks build: "dense" and "moe", or the variant's own ("variant")."""
        if self.kind == "variant":
            return ("variant",)
        return ("moe",) if self.kind == "router" else ("dense", "moe")

    def overrides_for(self, model: str) -> list[str]:
        """The config overrides of the small ``model`` ("dense", "moe" or "variant") with this plugin in it."""
        own = list(getattr(self.plugin, "check_overrides", ()) or ())
        if self.kind == "variant":
            return [*SMALL, *own, *self.overrides]
        use = [f"{KEY[self.kind]}={self.name}"]
        if self.kind == "router":  # the tiny MoE's topk options belong to topk
            use.append("moe.router_options={}")
        return [*SMALL, *use, *own, *self.overrides]

    def base(self, model: str) -> str:
        return self.name if model == "variant" else BASE[model]

    def config(self, model: str) -> ModelConfig:
        """The small config of ``model`` with this plugin in it."""
        cfg = get_config(self.base(model), self.overrides_for(model))
        if self.kind == "variant":  # the shrunk shape keeps the variant's layer pattern where it can
            first = get_config(self.name).moe.first_dense_layers
            if first:
                cfg = get_config(cfg, [f"moe.first_dense_layers={min(first, cfg.n_layers - 1)}"])
        return cfg


def parse(spec: str, overrides: tuple[str, ...] = ()) -> Subject:
    """``KIND:NAME`` (kind spelled with a hyphen or a space: ``norm-strategy:hybridnorm``) or a NAME that only one
    kind registers."""
    if ":" in spec:
        kind, name = spec.split(":", 1)
        kind = kind.replace("-", " ").replace("_", " ")
        if kind not in KINDS:
            raise ConfigError(f"unknown kind {kind!r} in {spec!r}; the kinds are: "
                              f"{', '.join(k.replace(' ', '-') for k in KINDS)}")
        REGISTRY.get(kind, name)  # an unknown name fails here, with the closest match
        return Subject(kind, name, overrides)
    kinds = [kind for kind in KINDS if spec in REGISTRY.names(kind)]
    if not kinds:
        raise UnknownNameError("plugin name", spec, {n for kind in KINDS for n in REGISTRY.names(kind, usable=True)})
    if len(kinds) > 1:
        raise ConfigError(f"{spec!r} is registered as {' and as '.join(kinds)}; say which: "
                          + " or ".join(f"{k.replace(' ', '-')}:{spec}" for k in kinds))
    REGISTRY.get(kinds[0], spec)
    return Subject(kinds[0], spec, overrides)


def registered(kinds: Optional[tuple[str, ...]] = None, plugin: Optional[str] = None) -> list[Subject]:
    """Every usable registered name of ``kinds`` (default: all kinds), or only those ``plugin`` registered
    (fnmatch pattern over plugin names, e.g. ``"zoo.*"`` for the built-ins)."""
    import fnmatch
    out = []
    for kind in kinds or tuple(KINDS):
        for name in REGISTRY.names(kind, usable=True):
            if plugin is None or fnmatch.fnmatchcase(REGISTRY.owner(kind, name), plugin):
                out.append(Subject(kind, name))
    return out
