"""The one answer to "which model does the user mean?", for every command and the lm-eval adapter.

A model is named in one of four forms:

- a variant name, ``tiny-dense-hybridnorm``: built freshly initialized (seeded);
- a variant name with ``--pretrained``: its published weights (``zoo.hub.pull``, verified);
- a checkpoint: ``model.safetensors``, its sharded ``model.safetensors.index.json``, or a folder
  holding either (a published repository, a ``checkpoint/`` folder);
- a run folder, as ``zoo train --out`` writes it: its ``checkpoint/`` holds the weights.

Text that looks like a path (a separator, a ``.safetensors`` or ``.json`` ending) is a path, and a
path that does not exist is an error, never a variant name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from . import hub
from .api import build
from .checkpoint import CheckpointError, checkpoint_config, load
from .config import ConfigSource
from .errors import ConfigError, ZooError
from .files import CHECKPOINT_DIR, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from .model import ZooModel
from .registry import REGISTRY, check_name

KINDS = ("variant", "pretrained", "checkpoint", "run")


@dataclass(frozen=True)
class ModelSource:
    """What a command was given: ``kind`` (one of ``KINDS``), the text as given, the variant name where
    one is known, the checkpoint file where there are weights, and the run folder for a run."""

    text: str
    kind: str
    variant: Optional[str] = None
    checkpoint: Optional[Path] = None
    run: Optional[Path] = None

    @property
    def trained(self) -> bool:
        """Whether weights come with it (anything but a bare variant name)."""
        return self.checkpoint is not None

    def describe(self, seed: int = 0) -> str:
        """What a report says about the weights."""
        if self.kind == "variant":
            return f"untrained (zoo.build, seed {seed})"
        if self.kind == "pretrained":
            return f"published (zoo pull {self.variant})"
        return f"checkpoint {self.text}"


def _checkpoint_in(folder: Path) -> Optional[Path]:
    for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def _looks_like_path(text: str) -> bool:
    return text.endswith((".safetensors", ".json")) or "/" in text or "\\" in text or text.startswith((".", "~"))


def resolve_source(text: Union[str, Path], *, pretrained: bool = False) -> ModelSource:
    """The model ``text`` names (see the module docstring); ``pretrained`` asks for a variant's published
    weights and is refused for a path, whose weights are loaded as they are."""
    text = str(text)
    path = Path(text).expanduser()
    if path.exists() or _looks_like_path(text):
        if pretrained:
            raise ZooError("--pretrained applies to a variant NAME; a checkpoint or run folder is loaded as it is")
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if path.is_file():
            return ModelSource(text, "checkpoint", _header_variant(path), path)
        inside = _checkpoint_in(path)
        if inside is not None:
            return ModelSource(text, "checkpoint", _header_variant(inside), inside)
        inside = _checkpoint_in(path / CHECKPOINT_DIR)
        if inside is not None:
            return ModelSource(text, "run", _header_variant(inside), inside, path)
        raise CheckpointError(f"{path} is a folder without {WEIGHTS_NAME} or {CHECKPOINT_DIR}/{WEIGHTS_NAME}: not a "
                              "checkpoint, published repository or run folder")
    try:
        check_name("variant", text)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if pretrained:  # a hub may publish names this installation does not register
        snapshot = hub.pull(text)
        return ModelSource(text, "pretrained", text, _checkpoint_in(snapshot) or snapshot / WEIGHTS_NAME)
    REGISTRY.get("variant", text)  # an unknown name fails here, with the closest match
    return ModelSource(text, "variant", text)


def _header_variant(path: Path) -> Optional[str]:
    return checkpoint_config(path)[1].get("variant") or None


def load_source(source: ModelSource, overrides: ConfigSource = None, *, device: Union[None, str, torch.device] = None,
                seed: int = 0) -> ZooModel:
    """The model of ``source``: its checkpoint loaded, or the variant built with ``torch.manual_seed(seed)``."""
    if source.checkpoint is not None:
        return load(source.checkpoint, overrides, device=device)
    torch.manual_seed(seed)
    return build(source.text, overrides, device=device)
