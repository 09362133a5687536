"""What a published repository is, shared by publish, serve and pull.

A repository ``zoo/<variant>`` is a folder ``<variant>/`` holding ``README.md``, ``config.yaml``,
``model.safetensors`` and ``checksums.sha256`` (``sha256sum`` lines for every other file). Its files
are exactly those that ``checksums.sha256`` lists, plus that file itself, and its one commit id is the
sha1 of ``checksums.sha256`` (so a re-publish with other bytes is a new commit).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import ZooError
from ..registry import check_name

NAMESPACE = "zoo"
CHECKSUMS = "checksums.sha256"
FILENAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHECKSUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


class HubError(ZooError):
    """Publishing, serving or pulling failed; the message says what happened and what to do."""


def sha256_file(path: Union[str, Path]) -> str:
    """The hex sha256 of a file: ``hashlib.file_digest`` (one reused buffer, the GIL released while hashing)."""
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        return h.hexdigest()


def git_blob_hash(size: int) -> Any:
    """A sha1 to feed a file of ``size`` bytes: its hex digest is git's id of that file (``blob <size>\\0`` then
    the content), which the Hub gives as ETag and blob id of a file kept in git rather than LFS."""
    return hashlib.sha1(b"blob %d\0" % size)


def check_filename(filename: str, where: str) -> str:
    """A repository file name: one path component, no leading dot, nothing that could climb out."""
    if not isinstance(filename, str) or not FILENAME_RE.match(filename) or ".." in filename:
        raise HubError(f"{where}: invalid file name {filename!r} (plain names only: letters, digits, '.', '_', '-')")
    return filename


def parse_checksums(text: str, where: str) -> dict[str, str]:
    """``sha256sum`` output -> {filename: sha256}; malformed or unsafe lines are an error."""
    files: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _CHECKSUM_LINE.match(line)
        if not m:
            raise HubError(f"{where}, line {i}: not a `sha256sum` line (expected '<64 hex digits>  <file name>')")
        name = check_filename(m.group(2), f"{where}, line {i}")
        if name == CHECKSUMS:
            raise HubError(f"{where}, line {i}: {CHECKSUMS} cannot list itself")
        if name in files:
            raise HubError(f"{where}, line {i}: {name} is listed twice")
        files[name] = m.group(1).lower()
    return files


def format_checksums(files: dict[str, str]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(files.items()))


def commit_id(checksums: bytes) -> str:
    """The commit a server reports for a repository: the sha1 of its checksums.sha256 (40 hex)."""
    return hashlib.sha1(checksums).hexdigest()


@dataclass(frozen=True)
class Repo:
    """One served repository: its folder, its commit and the files it lists {name: sha256}."""

    name: str
    path: Path
    commit: str
    files: dict[str, str]

    @property
    def repo_id(self) -> str:
        return f"{NAMESPACE}/{self.name}"

    @property
    def filenames(self) -> list[str]:
        return sorted([*self.files, CHECKSUMS])


def read_repo(root: Path, name: str) -> Optional[Repo]:
    """The repository ``root/name`` (None if there is none, or the name is not a variant name)."""
    try:
        check_name("variant", name)
    except ValueError:
        return None
    folder = root / name
    try:
        data = (folder / CHECKSUMS).read_bytes()
    except OSError:
        return None
    return Repo(name, folder, commit_id(data), parse_checksums(data.decode("utf-8", "replace"), f"{folder / CHECKSUMS}"))


def list_repos(root: Path) -> list[str]:
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / CHECKSUMS).is_file()
                      and read_repo(root, p.name) is not None)
    except (OSError, HubError):
        return []


def variant_name(name: object) -> str:
    """``name`` if it can name a repository (a variant name), else a ``HubError`` saying why not."""
    try:
        return check_name("variant", name)
    except ValueError as e:
        raise HubError(str(e)) from None
