"""The plugin registry: pluggy, entry-point loading with per-plugin isolation, and name lookups.

Every plugin (built-in or third-party) is found through the ``zoo`` entry-point group, or added at
run time with ``register_plugin``. A plugin that fails to import, raises in a hook or registers
the wrong type is reported by name (a ``PluginWarning``) and skipped whole; the others keep
working. Two plugins registering the same name make that name fail to resolve, naming both.
``ZOO_PLUGINS`` (allow) and ``ZOO_DISABLE_PLUGINS`` (block) take comma-separated fnmatch patterns
over plugin names, e.g. ``ZOO_PLUGINS='zoo.*'`` loads only the built-ins.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib.metadata
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownNameError
from .model import Attention, NormStrategy
from .moe import Router
from .variant import as_variant

GROUP = "zoo"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class PluginWarning(UserWarning):
    """A plugin was skipped; the message names it and says why."""


def _subclass_of(base: type) -> Callable[[Any], Any]:
    def check(obj: Any) -> Any:
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise TypeError(f"expected a subclass of {base.__module__.split('.')[0]}.{base.__name__}, got {obj!r}")
        return obj
    return check


def _callable(obj: Any) -> Any:
    if not callable(obj):
        raise TypeError(f"expected a callable make(dim, *, eps, **options) -> nn.Module, got {obj!r}")
    return obj


# kind -> (hook name, validator returning the object to store)
KINDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "norm strategy": ("register_norm_strategies", _subclass_of(NormStrategy)),
    "norm layer": ("register_norm_layers", _callable),
    "attention": ("register_attention", _subclass_of(Attention)),
    "router": ("register_routers", _subclass_of(Router)),
    "variant": ("register_variants", as_variant),
}


def check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ValueError(f"invalid {kind} name {name!r}: use lowercase letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit, without '..' or path separators")
    return name


@dataclass
class PluginRecord:
    """What ``zoo plugins`` shows: a plugin's name, origin, registrations and any error."""

    name: str
    source: str
    registered: dict[str, list[str]] = field(default_factory=dict)
    status: str = "ok"  # ok | failed | disabled
    error: Optional[str] = None
    dist: Optional[str] = None  # the installed distribution that provides it (None: registered at run time)
    version: Optional[str] = None
    conflicts: list[str] = field(default_factory=list)  # "kind 'name' (also registered by 'other')"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "status": self.status, "error": self.error,
                "registered": self.registered, "dist": self.dist, "version": self.version,
                "conflicts": self.conflicts}


@dataclass
class Entry:
    obj: Any
    plugin: str


def _patterns(var: str) -> Optional[list[str]]:
    value = os.environ.get(var)
    if value is None:
        return None
    return [p.strip() for p in value.split(",") if p.strip()]


class Registry:
    """Plugin manager plus per-kind name tables; loads entry points on first use."""

    def __init__(self) -> None:
        self._loaded = False
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self.conflicts: dict[str, dict[str, list[str]]] = {kind: {} for kind in KINDS}

    # -- loading ---------------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        allow, block = _patterns("ZOO_PLUGINS"), _patterns("ZOO_DISABLE_PLUGINS") or []
        seen: set[str] = set()
        for ep in importlib.metadata.entry_points(group=GROUP):
            if ep.name in seen:
                continue
            seen.add(ep.name)
            dist = getattr(ep, "dist", None)
            source = f"entry point {ep.value}" + (f" ({dist.name} {dist.version})" if dist else "")
            record = PluginRecord(ep.name, source, dist=dist.name if dist else None,
                                  version=dist.version if dist else None)
            self.records[ep.name] = record
            if (allow is not None and not any(fnmatch.fnmatchcase(ep.name, p) for p in allow)) or \
                    any(fnmatch.fnmatchcase(ep.name, p) for p in block):
                record.status = "disabled"
                continue
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
            except Exception as e:  # any failure of a third party's import must not break the zoo
                self._fail(record, f"failed to load: {type(e).__name__}: {e}")
                continue
            self._collect(ep.name, record, strict=False)

    def _fail(self, record: PluginRecord, why: str) -> None:
        record.status, record.error = "failed", why
        warnings.warn(f"zoo plugin {record.name!r} skipped: {why}", PluginWarning, stacklevel=3)

    def _call(self, plugin_name: str, hook: str, register: Callable[[str, Any], None]) -> None:
        """Call one plugin's implementation of ``hook`` (if it has one) through pluggy."""
        plugin = self.pm.get_plugin(plugin_name)
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        self.pm.subset_hook_caller(hook, remove_plugins=others)(register=register)

    def _collect(self, plugin_name: str, record: PluginRecord, *, strict: bool) -> None:
        """Call the plugin's hooks, staging what it registers; commit only if all of it is valid."""
        staged: list[tuple[str, str, Any]] = []
        try:
            self._check_hook_names(plugin_name)
            for kind, (hook, validate) in KINDS.items():

                def register(name: str, obj: Any, _kind: str = kind, _validate: Callable[[Any], Any] = validate) -> None:
                    check_name(_kind, name)
                    if any(k == _kind and n == name for k, n, _ in staged):
                        raise ValueError(f"{_kind} {name!r} registered twice")
                    try:
                        staged.append((_kind, name, _validate(obj)))
                    except TypeError as e:
                        raise TypeError(f"{_kind} {name!r}: {e}") from None

                self._call(plugin_name, hook, register)
        except Exception as e:
            self.pm.unregister(name=plugin_name)
            if strict:
                del self.records[plugin_name]
                raise PluginError(f"plugin {plugin_name!r} failed to register: {type(e).__name__}: {e}") from e
            self._fail(record, f"failed to register: {type(e).__name__}: {e}")
            return
        for kind, name, _ in staged:
            other = self.entries[kind].get(name)
            if other is not None and strict:
                self.pm.unregister(name=plugin_name)
                del self.records[plugin_name]
                raise PluginError(f"{kind} {name!r} is registered by both {other.plugin!r} and {plugin_name!r}; "
                                  "rename one of them")
        for kind, name, obj in staged:
            record.registered.setdefault(kind, []).append(name)
            if name in self.conflicts[kind]:
                self.conflicts[kind][name].append(plugin_name)
            elif name in self.entries[kind]:
                first = self.entries[kind].pop(name).plugin
                self.conflicts[kind][name] = [first, plugin_name]
            else:
                self.entries[kind][name] = Entry(obj, plugin_name)
        self._note_conflicts()

    def _note_conflicts(self) -> None:
        """Each record's ``conflicts``: the names it shares with another plugin, which neither can use."""
        for record in self.records.values():
            record.conflicts = []
        for kind, names in self.conflicts.items():
            for name, owners in names.items():
                for owner in owners:
                    others = ", ".join(repr(o) for o in owners if o != owner)
                    if owner in self.records:
                        self.records[owner].conflicts.append(f"{kind} {name!r} (also registered by {others})")

    def _check_hook_names(self, plugin_name: str) -> None:
        """pluggy accepts methods named like no hook; a misspelled hook would silently do nothing."""
        specs = [hook for hook, _ in KINDS.values()]
        for caller in self.pm.get_hookcallers(self.pm.get_plugin(plugin_name)) or []:
            if not caller.has_spec():
                close = difflib.get_close_matches(caller.name, specs, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; the hooks are: {', '.join(specs)}"
                raise AttributeError(f"{caller.name!r} is not a zoo hook{hint}")

    # -- run-time registration -------------------------------------------------------------
    def register_plugin(self, plugin: Any, name: Optional[str] = None) -> str:
        """Register a plugin object (a module or an object with ``@zoo.hookimpl`` methods) now."""
        self.ensure_loaded()
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if name in self.records:
            raise PluginError(f"a plugin named {name!r} is already registered")
        try:
            self.pm.register(plugin, name=name)
        except Exception as e:
            raise PluginError(f"plugin {name!r} is not a valid zoo plugin: {e}") from e
        record = PluginRecord(name, "runtime (zoo.register_plugin)")
        self.records[name] = record
        self._collect(name, record, strict=True)
        return name

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin and everything it registered."""
        record = self.records.pop(name, None)
        if record is None:
            raise PluginError(f"no plugin named {name!r} is registered")
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        for kind, names in record.registered.items():
            for n in names:
                entry = self.entries[kind].get(n)
                if entry is not None and entry.plugin == name:
                    del self.entries[kind][n]
                owners = self.conflicts[kind].get(n)
                if owners and name in owners:
                    owners.remove(name)
                    if len(owners) == 1:
                        survivor = owners[0]
                        del self.conflicts[kind][n]
                        self._restore(kind, n, survivor)
        self._note_conflicts()

    def _restore(self, kind: str, name: str, plugin: str) -> None:
        """Re-resolve a name after a conflict ends, by asking the survivor's hooks again."""
        hook, validate = KINDS[kind]
        found: dict[str, Any] = {}
        self._call(plugin, hook, found.__setitem__)
        if name in found:
            self.entries[kind][name] = Entry(validate(found[name]), plugin)

    # -- lookups -----------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Any:
        self.ensure_loaded()
        entry = self.entries[kind].get(name)
        if entry is not None:
            return entry.obj
        if name in self.conflicts[kind]:
            a, b = self.conflicts[kind][name][:2]
            raise PluginError(f"{kind} {name!r} is registered by both plugins {a!r} and {b!r}; "
                              f"disable one, e.g. ZOO_DISABLE_PLUGINS={b}")
        raise UnknownNameError(kind, name, self.names(kind))

    def owner(self, kind: str, name: str) -> str:
        self.get(kind, name)
        return self.entries[kind][name].plugin

    def provider(self, kind: str, name: str) -> dict[str, Optional[str]]:
        """Which plugin registered ``name`` and the distribution (and version) it came from; checkpoints record
        it, so that loading one without the plugin can say what to install."""
        record = self.records[self.owner(kind, name)]
        return {"plugin": record.name, "dist": record.dist, "version": record.version}

    def names(self, kind: str, usable: bool = False) -> list[str]:
        """The names of ``kind``, conflicting ones included unless ``usable``."""
        self.ensure_loaded()
        return sorted(set(self.entries[kind]) | (set() if usable else set(self.conflicts[kind])))

    def conflicting(self, kind: str) -> dict[str, list[str]]:
        """Names of ``kind`` that several plugins register (unusable), with their plugins."""
        self.ensure_loaded()
        return {name: list(owners) for name, owners in self.conflicts[kind].items()}

    def plugins(self) -> list[PluginRecord]:
        self.ensure_loaded()
        return list(self.records.values())


REGISTRY = Registry()
