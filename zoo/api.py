"""The Python API: configs and models by variant name, listings, and stats without allocation."""
from __future__ import annotations

import fnmatch
import inspect
import re
from typing import Any, Optional, Union

import torch

from .config import ConfigSource, ModelConfig, merge_config, resolve_options
from .errors import ConfigError
from .model import ZooModel
from .registry import REGISTRY
from .stats import ModelStats, model_stats


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_models(pattern: str = "*") -> list[str]:
    """Variant names matching an fnmatch pattern, naturally sorted."""
    names = REGISTRY.names("variant")
    return sorted((n for n in names if fnmatch.fnmatchcase(n, pattern)), key=_natural_key)


def check_components(cfg: ModelConfig) -> None:
    """Resolve every plugin the config names and check each one's options; errors name the key."""
    strategy = REGISTRY.get("norm strategy", cfg.norm_strategy)
    resolve_options(strategy.Options, cfg.norm_options, "norm_options", f"norm strategy {cfg.norm_strategy!r}")
    attention = REGISTRY.get("attention", cfg.attention.type)
    resolve_options(attention.Options, cfg.attention.options, "attention.options", f"attention {cfg.attention.type!r}")
    layer = REGISTRY.get("norm layer", cfg.norm_layer)
    try:
        inspect.signature(layer).bind(1, eps=cfg.norm_eps, **dict(cfg.norm_layer_options))
    except TypeError as e:
        raise ConfigError(f"norm_layer_options {dict(cfg.norm_layer_options)} do not fit norm layer {cfg.norm_layer!r}: {e}") from None
    except ValueError:  # no signature to inspect (a builtin); let construction decide
        pass
    if cfg.is_moe:
        router = REGISTRY.get("router", cfg.moe.router)
        resolve_options(router.Options, cfg.moe.router_options, "moe.router_options", f"router {cfg.moe.router!r}")


def get_config(name: Union[str, ModelConfig], overrides: ConfigSource = None) -> ModelConfig:
    """A variant's config (its YAML parts merged over the defaults), then ``overrides``
    (a dotlist such as ``["norm_strategy=prenorm", "moe.num_experts=16"]`` or a mapping)."""
    if isinstance(name, ModelConfig):
        cfg = merge_config(name, overrides, where="overrides")
    else:
        variant = REGISTRY.get("variant", name)
        cfg = merge_config(*variant.parts, overrides, where=f"variant {name!r}")
    check_components(cfg)
    return cfg


def build(name: Union[str, ModelConfig], overrides: ConfigSource = None, *, device: Optional[Union[str, torch.device]] = None,
          dtype: Optional[torch.dtype] = None, pretrained: bool = False) -> ZooModel:
    """Build and initialize a model by variant name (or config). ``device="meta"`` allocates nothing.
    ``pretrained=True`` pulls the variant's published weights instead (``zoo.hub.pull``: ``ZOO_ENDPOINT``
    or the embedded hub, through the HF cache, checksums verified) and loads them."""
    if pretrained:
        from .hub import load_pretrained
        return load_pretrained(name, overrides, device=device, dtype=dtype)
    cfg = get_config(name, overrides)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with device:  # built in place, so a plugin's own parameter values survive; then the zoo's init
        model = ZooModel(cfg)
    if device.type != "meta":
        model.init_weights()
    if dtype is not None:
        model.to(dtype)
    return model


def stats(name: Union[str, ModelConfig], overrides: ConfigSource = None, seq_len: Optional[int] = None,
          flops: bool = True) -> ModelStats:
    """Total and active parameters and FLOPs per token of a variant, without allocating it."""
    return model_stats(get_config(name, overrides), seq_len, flops)
