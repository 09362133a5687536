"""The read-only Hub API's JSON for a served repository, in the shapes huggingface_hub parses.

``list_repo_tree`` / ``list_repo_files`` / ``snapshot_download`` and ``get_paths_info`` read file entries
(``RepoFile``: ``type``, ``path``, ``size``, ``oid`` the git blob id, and for LFS files ``lfs`` with the
sha256 ``oid``, ``size`` and ``pointerSize``); ``model_info(files_metadata=True)`` reads siblings with
``size``, ``blobId`` and ``lfs``; ``list_repo_refs`` reads branches, tags, converts; ``list_repo_commits``
reads commits with ``id``, ``title``, ``message``, ``authors`` and ``date``; ``list_models`` reads model
entries. A repository here is flat and has one commit (its ``checksums.sha256``'s digest): ``main``.
An LFS file's blob id is that of its pointer file, as in a git repository on the Hub.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Optional

from .protocol import CHECKSUMS, NAMESPACE, Repo, git_blob_hash, sha256_file

LFS_SUFFIXES = (".safetensors",)
LIBRARY = "hybridnorm-zoo"
AUTHOR = "hybridnorm-zoo"


def git_blob_id(data: bytes) -> str:
    """git's object id of a blob holding ``data``."""
    h = git_blob_hash(len(data))
    h.update(data)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def file_entry(repo: Repo, filename: str, path: Path) -> dict[str, Any]:
    """A tree / paths-info entry for ``filename``; LFS files are not read (their sha256 is recorded)."""
    size = path.stat().st_size
    if filename.endswith(LFS_SUFFIXES):
        sha = repo.files.get(filename) or sha256_file(path)
        pointer = lfs_pointer(sha, size)
        return {"type": "file", "path": filename, "size": size, "oid": git_blob_id(pointer),
                "lfs": {"oid": sha, "size": size, "pointerSize": len(pointer)}}
    return {"type": "file", "path": filename, "size": size, "oid": git_blob_id(path.read_bytes())}


def sibling(entry: dict[str, Any]) -> dict[str, Any]:
    """A tree entry as ``model_info(files_metadata=True)`` lists it."""
    out: dict[str, Any] = {"rfilename": entry["path"], "size": entry["size"], "blobId": entry["oid"]}
    if "lfs" in entry:
        out["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["lfs"]["size"],
                      "pointerSize": entry["lfs"]["pointerSize"]}
    return out


def published_at(repo: Repo) -> str:
    """When the repository was written: its ``checksums.sha256``'s modification time, ISO 8601 in UTC."""
    stamp = (repo.path / CHECKSUMS).stat().st_mtime
    return datetime.datetime.fromtimestamp(stamp, tz=datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def model_entry(repo: Repo, siblings: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    """``model_info`` / ``list_models`` JSON; ``siblings`` with file metadata, else names alone."""
    return {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit, "private": False, "author": NAMESPACE,
            "library_name": LIBRARY, "tags": [LIBRARY, "safetensors"], "downloads": 0, "likes": 0,
            "createdAt": published_at(repo), "lastModified": published_at(repo),
            "siblings": siblings if siblings is not None else [{"rfilename": f} for f in repo.filenames]}


def refs(repo: Repo) -> dict[str, Any]:
    return {"branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": repo.commit}],
            "tags": [], "converts": [], "pullRequests": []}


def commits(repo: Repo) -> list[dict[str, Any]]:
    return [{"id": repo.commit, "title": f"zoo publish {repo.name}", "message": "", "authors": [{"user": AUTHOR}],
             "date": published_at(repo)}]


def matches(repo: Repo, search: Optional[str], author: Optional[str], tags: list[str]) -> bool:
    """Whether ``list_models(search=..., author=..., filter=...)`` lists ``repo``."""
    return ((not search or search.lower() in repo.repo_id.lower()) and (not author or author == NAMESPACE)
            and all(t in (LIBRARY, "safetensors") for t in tags))
