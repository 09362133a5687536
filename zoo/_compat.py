"""Module paths from before the layout by concern (0.1), kept importable with a DeprecationWarning.

``import zoo.linear``, ``from zoo.attention import LayerCache`` and the like still work: each old path
is a module object in ``sys.modules`` whose attributes come from the new home, warning on first use.
docs/architecture.md ("Moved modules") lists the new paths.
"""
from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

MOVED: dict[str, tuple[str, ...]] = {  # old path -> the modules its names now live in
    "zoo.attention": ("zoo.nn", "zoo.model"),
    "zoo.sdpa": ("zoo.kernels.sdpa",),
    "zoo.linear": ("zoo.kernels.gemm", "zoo.kernels.linear"),
    "zoo.evaluate": ("zoo.train.evaluate",),
    "zoo.data": ("zoo.train.data",),
    "zoo.tokenizer": ("zoo.train.tokenizer",),
    "zoo.lm_eval_adapter": ("zoo.interop.lm_eval",),
    "zoo.convert": ("zoo.interop.hf",),
}


class _Moved(types.ModuleType):
    """An old module path: attribute lookups go to the new module, with a DeprecationWarning."""

    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"Moved to {' and '.join(targets)}.")
        self._targets = targets

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                warnings.warn(f"{self.__name__} is deprecated: import {attr} from {target}", DeprecationWarning,
                              stacklevel=2)
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {' and '.join(self._targets)}) has no attribute {attr!r}")


def install() -> None:
    for old, new in MOVED.items():
        sys.modules.setdefault(old, _Moved(old, new))
