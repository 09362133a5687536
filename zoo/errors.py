"""The zoo's exceptions: every user-facing failure is a ZooError with a message that says what to do."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class ZooError(Exception):
    """Base class of every error the zoo raises on bad input; the CLI prints these without a traceback."""


class ConfigError(ZooError, ValueError):
    """A config key is unknown, has the wrong type, or the values contradict each other."""


class PluginError(ZooError):
    """A plugin failed to load or register, or two plugins claim the same name."""


class UnknownNameError(ZooError, LookupError):
    """A name (variant, norm strategy, attention, ...) that no loaded plugin registered."""

    def __init__(self, kind: str, name: str, available: Iterable[str]):
        self.kind, self.name, self.available = kind, name, sorted(available)
        close = difflib.get_close_matches(name, self.available, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        listing = ", ".join(self.available) if self.available else "(none: is hybridnorm-zoo installed, e.g. `pip install -e .`?)"
        super().__init__(f"unknown {kind} {name!r}.{hint} Available: {listing}")

    def __str__(self) -> str:  # LookupError would otherwise quote the message
        return self.args[0]


class MissingPluginError(ZooError, LookupError):
    """A checkpoint or config uses plugin names that no installed plugin registers; says what to install."""

    def __str__(self) -> str:
        return self.args[0]
