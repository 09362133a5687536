"""hybridnorm-zoo: decoder-only transformers, dense and MoE, with pluggable norm placements.

Build by name with ``zoo.build("tiny-dense-hybridnorm")``; list with ``zoo.list_models("tiny-*")``;
extend with plugins (``@zoo.hookimpl`` functions, see docs/plugins.md).
"""
from __future__ import annotations

from typing import Any, Optional

from .attention import Attention
from .config import ModelConfig
from .errors import ConfigError, PluginError, UnknownNameError, ZooError
from .hookspecs import hookimpl
from .init import Init
from .strategy import NormStrategy
from .variant import Variant

__version__ = "0.1.0"


def register_plugin(plugin: Any, name: Optional[str] = None) -> str:
    """Register a plugin (a module or an object with ``@zoo.hookimpl`` methods) at run time."""
    from .registry import REGISTRY
    return REGISTRY.register_plugin(plugin, name)


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered earlier, with everything it registered."""
    from .registry import REGISTRY
    REGISTRY.unregister_plugin(name)


from .api import build, get_config, list_models, stats  # noqa: E402  (needs the names above)
from .checkpoint import load, save  # noqa: E402
from .model import ModelOutput, ZooModel  # noqa: E402
from .stats import ModelStats  # noqa: E402
from . import moe  # noqa: E402,F401  (zoo.moe.after_optimizer_step for training loops)

__all__ = [
    "Attention", "ConfigError", "Init", "ModelConfig", "ModelOutput", "ModelStats", "NormStrategy", "PluginError",
    "UnknownNameError", "Variant", "ZooError", "ZooModel", "build", "get_config", "hookimpl", "list_models",
    "load", "register_plugin", "save", "stats", "unregister_plugin",
]
