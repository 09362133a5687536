"""Publishing a model as an HF-Hub-style repository: its card, config, weights and checksums."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from . import hub
from .api import build, get_config
from .cards import CHECKPOINT_NOTE, RESULTS_NOTE, UNTRAINED_NOTE, render_card
from .checkpoint import load, save
from .files import CONFIG_NAME, WEIGHTS_NAME
from .hub.protocol import variant_name
from .sources import ModelSource, resolve_source


def publish(source: Union[str, Path, ModelSource], to: Union[str, Path], *, index: Union[None, str, Path] = None,
            name: Optional[str] = None, seed: int = 0, results: Optional[dict[str, Any]] = None,
            pretrained: bool = False) -> Path:
    """Write the repository folder ``to/<variant>/`` (model card, config, weights, checksums) and return it.

    ``source`` names a model as every command does (zoo/sources.py). A variant name is published with
    untrained weights, freshly initialized with ``seed``, which the card says; weights (a checkpoint, a
    run folder, ``pretrained``) are published under ``name``, default the variant in their header, with
    their measured ``results`` (a model card results dict) on the card. With ``index``, the files'
    sha256 and BLAKE3 digests and the commit id are recorded in that index file.
    """
    src = source if isinstance(source, ModelSource) else resolve_source(source, pretrained=pretrained)
    if src.checkpoint is not None:
        model = load(src.checkpoint)
        cfg, name = model.cfg, variant_name(name or model.variant or "")
        shown = Path(src.text).name
        note = (RESULTS_NOTE.format(source=shown, recipe=results.get("recipe", "see the training log"))
                if results else CHECKPOINT_NOTE.format(source=shown))
    else:
        base = variant_name(src.text)
        name = variant_name(name or base)
        cfg = get_config(base)
        torch.manual_seed(seed)
        model = build(base)
        note = UNTRAINED_NOTE.format(name=base, seed=seed)
        results = None  # measured numbers belong to trained weights, not to a fresh init

    def write(folder: Path) -> None:
        (folder / "README.md").write_text(render_card(name, cfg, results=results, weights_note=note))
        (folder / CONFIG_NAME).write_text(cfg.to_yaml())
        save(model, folder / WEIGHTS_NAME, variant=name)

    return hub.write_repo(to, name, write, index=index)
