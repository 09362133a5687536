"""hybridnorm-zoo: decoder-only transformers, dense and MoE, with pluggable norm placements.

Build by name with ``zoo.build("tiny-dense-hybridnorm")``; list with ``zoo.list_models("tiny-*")``;
extend with plugins (``@zoo.hookimpl`` functions, see docs/plugins.md). docs/architecture.md is the
map of this package.
"""
from __future__ import annotations

from typing import Any, Optional

from . import hub, kernels, moe, nn
from ._compat import install as _install_compat
from .api import build, get_config, list_models, stats
from .checkpoint import load, save
from .config import ModelConfig
from .errors import ConfigError, PluginError, UnknownNameError, ZooError
from .hookspecs import hookimpl
from .model import Attention, Init, ModelOutput, ModelStats, NormStrategy, ZooModel
from .moe import Router, RouterContext, Routing
from .publishing import publish
from .registry import REGISTRY
from .variant import Variant
from .version import __version__


def register_plugin(plugin: Any, name: Optional[str] = None) -> str:
    """Register a plugin (a module or an object with ``@zoo.hookimpl`` methods) at run time."""
    return REGISTRY.register_plugin(plugin, name)


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered earlier, with everything it registered."""
    REGISTRY.unregister_plugin(name)


_install_compat()

__all__ = [
    "Attention", "ConfigError", "Init", "ModelConfig", "ModelOutput", "ModelStats", "NormStrategy", "PluginError",
    "Router", "RouterContext", "Routing", "UnknownNameError", "Variant", "ZooError", "ZooModel", "__version__", "build",
    "get_config", "hookimpl", "hub", "kernels", "list_models", "load", "moe", "nn", "publish", "register_plugin", "save",
    "stats", "unregister_plugin",
]
