"""A named variant: a config (files and mappings merged in order) plus what a card says about it."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

ConfigPart = Union[Path, Mapping[str, Any]]


@dataclass(frozen=True)
class Variant:
    """``config`` is one part or a sequence of parts (YAML paths or mappings), merged in order."""

    config: Union[ConfigPart, Sequence[ConfigPart]]
    description: str = ""
    tags: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def parts(self) -> list[ConfigPart]:
        if isinstance(self.config, (Path, Mapping)):
            return [self.config]
        return list(self.config)


def as_variant(obj: Any) -> Variant:
    """Accept a Variant, a config mapping or a YAML path; anything else is a registration error."""
    if isinstance(obj, Variant):
        for part in obj.parts:
            if not isinstance(part, (Path, Mapping)):
                raise TypeError(f"a Variant's config parts must be YAML paths or mappings, got {type(part).__name__}")
        return obj
    if isinstance(obj, (Path, Mapping)):
        return Variant(config=obj)
    raise TypeError(f"expected a zoo.Variant, a config mapping or a pathlib.Path to a YAML file, got {type(obj).__name__}")
