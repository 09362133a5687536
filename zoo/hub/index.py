"""The zoo's index of published variants, and the embedded hub shipped with the package.

An index maps a variant to the commit of its repository and each file's digests:
``{variant: {"revision": commit, "files": {name: sha256}, "blake3": {name: blake3}}}`` (``blake3``
optional, for some or all files). A pull verifies against it, and for the variants it lists it also
pins the commit. The zoo's own index sits in the embedded hub, ``plugins/hub/index.json``, beside the
repositories it lists.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Union

from ..files import write_json
from .protocol import COMMIT_RE, SHA256_RE, HubError, check_filename

INDEX_NAME = "index.json"


def embedded_hub() -> Path:
    """The folder of published variants shipped with the zoo (``plugins/hub``, package ``zoo.plugins``)."""
    return Path(importlib.import_module("zoo.plugins").__file__).parent / "hub"


def load_index(index: Union[None, str, Path, dict[str, Any]] = None) -> dict[str, dict[str, Any]]:
    """A zoo index {variant: {"revision": commit, "files": {name: sha256}, "blake3": {name: blake3}}} (``blake3``
    optional, for some or all files); the shipped one by default."""
    if isinstance(index, dict):
        data, where = index, "the index given"
    else:
        path = Path(index) if index is not None else embedded_hub() / INDEX_NAME
        where = str(path)
        if index is None and not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise HubError(f"index not found: {path}") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise HubError(f"cannot read the index {path}: {e}") from None
    if not isinstance(data, dict):
        raise HubError(f"malformed index {where}: expected a JSON object {{variant: {{revision, files}}}}")
    for name, entry in data.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("revision"), str) and COMMIT_RE.match(entry["revision"])
              and isinstance(entry.get("files"), dict) and entry["files"]
              and all(isinstance(k, str) and isinstance(v, str) and SHA256_RE.match(v) for k, v in entry["files"].items()))
        if not ok:
            raise HubError(f"malformed index {where}: entry {name!r} needs a 40-hex 'revision' and 'files' "
                           "mapping file names to 64-hex sha256 digests")
        fast = entry.get("blake3", {})
        if not (isinstance(fast, dict) and all(isinstance(k, str) and k in entry["files"] and isinstance(v, str)
                                               and SHA256_RE.match(v) for k, v in fast.items())):
            raise HubError(f"malformed index {where}: entry {name!r} has a 'blake3' that is not a mapping of its "
                           "files' names to 64-hex BLAKE3 digests")
        for filename in entry["files"]:
            check_filename(filename, f"index {where}, entry {name!r}")
    return data


def record(index: Union[str, Path], name: str, entry: dict[str, Any]) -> None:
    """Set ``name``'s entry in the index file ``index`` (created if missing), atomically."""
    index = Path(index)
    data = load_index(index) if index.exists() else {}
    data[name] = entry
    write_json(index, data, sort_keys=True)
