"""Publishing: a repository folder written whole, then swapped into place, and recorded in an index.

The hub only moves files: what goes into a repository (the card, the config, the weights) is written
by the caller (``zoo.publish`` in zoo/api.py) into the staging folder it is handed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Union

from .index import record
from .protocol import CHECKSUMS, HubError, commit_id, format_checksums, sha256_file
from .transfer import file_digest


def write_repo(to: Union[str, Path], name: str, write: Callable[[Path], None],
               index: Union[None, str, Path] = None) -> Path:
    """Write the repository ``to/<name>/`` and return it: ``write(folder)`` fills a staging folder beside
    it, ``checksums.sha256`` is added, and the folder is swapped in whole, so a running server never sees
    half of it. With ``index``, the commit and the files' sha256 and BLAKE3 digests are recorded there."""
    to = Path(to)
    if to.exists() and not to.is_dir():
        raise HubError(f"--to {to} is a file; give the folder that holds (or will hold) the repositories")
    to.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".publishing", dir=to))
    final = to / name
    try:
        write(staging)
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        checksums = format_checksums(files).encode()
        (staging / CHECKSUMS).write_bytes(checksums)
        for p in staging.iterdir():
            os.chmod(p, 0o644)
        os.chmod(staging, 0o755)
        old = to / f".{name}.{uuid.uuid4().hex[:8]}.old"
        if final.exists():
            os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if index is not None:
        record(index, name, {"revision": commit_id(checksums), "files": {**files, CHECKSUMS: sha256_file(final / CHECKSUMS)},
                             "blake3": {f: file_digest(final / f, "blake3") for f in [*files, CHECKSUMS]}})
    return final
