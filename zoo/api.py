"""The Python API: configs and models by variant name, listings, and stats without allocation."""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Optional, Union

import torch

from . import hub
from .builder import build_model, get_config, model_stats
from .checkpoint import load
from .config import ConfigSource, ModelConfig
from .hub.protocol import HubError
from .model import ModelStats, ZooModel
from .registry import REGISTRY

__all__ = ["build", "get_config", "list_models", "stats"]


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_models(pattern: str = "*") -> list[str]:
    """Variant names matching an fnmatch pattern, naturally sorted; a name that two plugins register is
    unusable and left out (``zoo plugins`` shows the conflict)."""
    names = REGISTRY.names("variant", usable=True)
    return sorted((n for n in names if fnmatch.fnmatchcase(n, pattern)), key=_natural_key)


def build(name: Union[str, ModelConfig], overrides: ConfigSource = None, *, device: Optional[Union[str, torch.device]] = None,
          dtype: Optional[torch.dtype] = None, pretrained: bool = False) -> ZooModel:
    """Build and initialize a model by variant name (or config). ``device="meta"`` allocates nothing.
    ``pretrained=True`` pulls the variant's published weights instead (``zoo.hub.pull``: ``ZOO_ENDPOINT``
    or the embedded hub, through the HF cache, checksums verified) and loads them (``zoo.load``)."""
    if pretrained:
        if not isinstance(name, str):
            raise HubError("pretrained=True needs a variant name (published weights belong to a name), not a config")
        if device is not None and torch.device(device).type == "meta":
            raise HubError("pretrained=True loads weights; build on the meta device without pretrained=True")
        return load(hub.pull(name), overrides, device=device, dtype=dtype)
    return build_model(get_config(name, overrides), device=device, dtype=dtype,
                       variant=name if isinstance(name, str) else None)


def stats(name: Union[str, ModelConfig], overrides: ConfigSource = None, seq_len: Optional[int] = None,
          flops: bool = True) -> ModelStats:
    """Total and active parameters and FLOPs per token of a variant, without allocating it."""
    return model_stats(get_config(name, overrides), seq_len, flops)
