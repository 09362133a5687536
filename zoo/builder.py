"""The one builder: a config's plugin names resolved through the registry, then the model made from them.

``get_config(name)`` merges a variant's config. ``resolve(cfg)`` looks up every plugin the config names
and checks each one's options; its ``Components`` are all the model needs (zoo/model/model.py knows no
plugin by name). ``build_model`` makes a model on a device and initializes it; ``empty_model`` makes
the frame that checkpoints load into; ``model_stats`` counts a config's parameters and FLOPs on ``meta``.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import ConfigSource, ModelConfig, merge_config, resolve_options
from .errors import ConfigError, MissingPluginError
from .model import (
    Components,
    MakeNorm,
    ModelStats,
    SwiGLU,
    ZooModel,
    count_params,
    forward_flops,
    kv_cache_bytes_per_token,
)
from .moe import MoEFFN, Router
from .registry import REGISTRY


def get_config(name: Union[str, ModelConfig], overrides: ConfigSource = None) -> ModelConfig:
    """A variant's config (its YAML parts merged over the defaults), then ``overrides`` (a dotlist such as
    ``["norm_strategy=prenorm", "moe.num_experts=16"]`` or a mapping); every plugin it names is resolved
    and its options checked, so a config that cannot build fails here, naming the key."""
    if isinstance(name, ModelConfig):
        cfg = merge_config(name, overrides, where="overrides")
    else:
        variant = REGISTRY.get("variant", name)
        cfg = merge_config(*variant.parts, overrides, where=f"variant {name!r}")
    if not cfg.is_moe:
        _warn_ignored_moe(overrides, name if isinstance(name, str) else "this config")
    resolve(cfg)
    return cfg


def _warn_ignored_moe(overrides: ConfigSource, name: str) -> None:
    """A dense model has no MoE layer: say which ``moe.*`` overrides it ignores (compare and study apply one
    override list to dense and MoE variants alike, so this warns rather than fails)."""
    if isinstance(overrides, Mapping):
        keys = [f"moe.{k}" for k in overrides.get("moe", {})] if isinstance(overrides.get("moe"), Mapping) else []
        keys += [k for k in overrides if isinstance(k, str) and k.startswith("moe.")]
    elif isinstance(overrides, (list, tuple)):
        keys = [str(item).split("=", 1)[0].strip() for item in overrides if str(item).strip().startswith("moe.")]
    else:
        return
    if keys:
        warnings.warn(f"{name} is dense (ffn.type: dense); it ignores {', '.join(sorted(set(keys)))}", stacklevel=3)


def resolve(cfg: ModelConfig) -> Components:
    """Every plugin ``cfg`` names, with its options checked against the plugin's ``Options`` (errors name the key)."""
    strategy = REGISTRY.get("norm strategy", cfg.norm_strategy)
    strategy_options = resolve_options(strategy.Options, cfg.norm_options, "norm_options",
                                       f"norm strategy {cfg.norm_strategy!r}")
    attention = REGISTRY.get("attention", cfg.attention.type)
    attention_options = resolve_options(attention.Options, cfg.attention.options, "attention.options",
                                        f"attention {cfg.attention.type!r}")
    make_norm = _norm_factory(cfg)
    if cfg.is_moe:
        router = REGISTRY.get("router", cfg.moe.router)
        router_options = resolve_options(router.Options, cfg.moe.router_options, "moe.router_options",
                                         f"router {cfg.moe.router!r}")
        make_ffn = functools.partial(_moe_ffn, cfg, router, router_options)
    else:
        make_ffn = functools.partial(_dense_ffn, cfg)
    return Components(strategy, strategy_options, attention, attention_options, make_norm, make_ffn)


def plugin_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """The (kind, name) of every plugin ``cfg`` uses."""
    names = [("norm strategy", cfg.norm_strategy), ("norm layer", cfg.norm_layer), ("attention", cfg.attention.type)]
    return names + [("router", cfg.moe.router)] if cfg.is_moe else names


def plugin_providers(cfg: ModelConfig) -> list[dict[str, Optional[str]]]:
    """For each plugin name ``cfg`` uses: its kind and name, and the plugin and distribution that provide it."""
    return [{"kind": kind, "name": name, **REGISTRY.provider(kind, name)} for kind, name in plugin_names(cfg)]


def check_plugins(cfg: ModelConfig, recorded: list[dict[str, Any]], what: str) -> None:
    """Raise, before any lookup suggests a wrong substitute, if a plugin name that ``cfg`` uses is not registered
    here: every missing name at once, with the distribution to install where ``recorded`` (a checkpoint's
    ``plugin_providers``) names it."""
    known = {(r.get("kind"), r.get("name")): r for r in recorded if isinstance(r, dict)}
    missing = [(kind, name) for kind, name in plugin_names(cfg) if name not in REGISTRY.names(kind)]
    if not missing:
        return
    groups: dict[tuple[Optional[str], Optional[str], Optional[str]], list[str]] = {}
    for kind, name in missing:
        r = known.get((kind, name)) or {}
        groups.setdefault((r.get("dist"), r.get("version"), r.get("plugin")), []).append(f"{kind} {name!r}")
    parts = []
    for (dist, version, plugin), names in groups.items():
        if dist is not None:
            parts.append(f"{', '.join(names)} (from {dist}{' ' + version if version else ''}: pip install {dist})")
        elif plugin is not None:
            parts.append(f"{', '.join(names)} (registered at run time by plugin {plugin!r}, from no installed "
                         "package: register it again with zoo.register_plugin)")
        else:
            parts.append(f"{', '.join(names)} (the checkpoint does not record which package provides "
                         f"{'them' if len(names) > 1 else 'it'})")
    raise MissingPluginError(f"{what} uses plugins that are not installed: " + "; ".join(parts))


def _norm_factory(cfg: ModelConfig) -> MakeNorm:
    """``make_norm(dim)`` for the configured norm layer, eps and options (checked against its signature)."""
    layer = REGISTRY.get("norm layer", cfg.norm_layer)
    try:
        inspect.signature(layer).bind(1, eps=cfg.norm_eps, **dict(cfg.norm_layer_options))
    except TypeError as e:
        raise ConfigError(f"norm_layer_options {dict(cfg.norm_layer_options)} do not fit norm layer "
                          f"{cfg.norm_layer!r}: {e}") from None
    except ValueError:  # no signature to inspect (a builtin); let construction decide
        pass
    return functools.partial(layer, eps=cfg.norm_eps, **dict(cfg.norm_layer_options))


def _dense_ffn(cfg: ModelConfig, layer: int) -> nn.Module:
    return SwiGLU(cfg.d_model, cfg.ffn.hidden_size)


def _moe_ffn(cfg: ModelConfig, router: type[Router], options: Any, layer: int) -> nn.Module:
    if cfg.ffn_type(layer) == "dense":
        return _dense_ffn(cfg, layer)
    return MoEFFN(cfg, layer, router(cfg, layer, options))


def build_ffn(cfg: ModelConfig, layer: int = 0) -> nn.Module:
    """Layer ``layer``'s FFN of ``cfg`` alone (dense, or MoE with its router), as the model builds it."""
    return resolve(cfg).make_ffn(layer)


def build_model(cfg: ModelConfig, *, device: Optional[Union[str, torch.device]] = None,
                dtype: Optional[torch.dtype] = None, variant: Optional[str] = None) -> ZooModel:
    """Make the model of ``cfg`` in place on ``device`` (so a plugin's own parameter values survive), then
    initialize it as the paper does; ``device="meta"`` allocates nothing and initializes nothing."""
    parts = resolve(cfg)
    device = torch.device(device) if device is not None else torch.device("cpu")
    # Constructing draws PyTorch's default inits; init_weights draws them again (ZooModel.init_steps), so
    # that a build on meta initialized later (zoo.distributed) draws the same numbers as this one.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        model = ZooModel(cfg, parts, variant)
    if device.type != "meta":
        model.init_weights()
    if dtype is not None:
        model.to(dtype)
    return model


_INIT_FUNCTIONS = frozenset(f for n, f in vars(torch.nn.init).items()
                            if n.endswith("_") and not n.startswith("_") and callable(f))
_VALUE_METHODS = frozenset({"normal_", "uniform_", "trunc_normal_", "fill_", "zero_", "copy_", "random_", "bernoulli_",
                            "exponential_", "geometric_", "log_normal_", "cauchy_", "erfinv_", "mul_", "div_", "add_",
                            "sub_", "clamp_", "clamp_min_", "clamp_max_"})


class _NoInitOnMeta(TorchFunctionMode):
    """Skips initializers and other value-only in-place ops on ``meta`` tensors, which hold no values.

    Exact (a meta tensor is the same before and after them) and it matters: most meta kernels are Python
    references whose first call imports ``torch._dynamo``, seconds that every fresh process would pay on
    its first ``zoo.load`` (``nn.Embedding``'s ``normal_`` is one). Ops that change shapes still run.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if isinstance(target, torch.Tensor) and target.is_meta and (
                func in _INIT_FUNCTIONS or getattr(func, "__name__", None) in _VALUE_METHODS):
            return target
        return func(*args, **kwargs)


def empty_model(cfg: ModelConfig, variant: Optional[str] = None) -> ZooModel:
    """The model of ``cfg`` on ``meta`` with no initializer run: a frame for loaded weights."""
    parts = resolve(cfg)
    with torch.device("meta"), _NoInitOnMeta():
        return ZooModel(cfg, parts, variant)


def model_stats(cfg: ModelConfig, seq_len: Optional[int] = None, flops: bool = True) -> ModelStats:
    """Stats for a config without allocating its weights; ``flops=False`` skips the (slower) FLOP count."""
    if seq_len is not None and seq_len < 1:
        raise ConfigError(f"the sequence length must be at least 1, not {seq_len}")
    with torch.device("meta"):
        model = ZooModel(cfg, resolve(cfg))
    total, active = count_params(model)
    if not flops:
        return ModelStats(total, active, None, None, kv_cache_bytes_per_token(model))
    seq_len = seq_len or cfg.max_seq_len
    return ModelStats(total, active, forward_flops(model, seq_len) // seq_len, seq_len, kv_cache_bytes_per_token(model))
