"""Pull: a published variant into the standard HF cache, every file verified before anything uses it.

A pull fills the cache (``HF_HOME`` / ``HF_HUB_CACHE``) in huggingface_hub's layout, so
``hf_hub_download(..., local_files_only=True)`` and offline mode find the files later. Its files come
from a hub endpoint over HTTP (``zoo serve`` or any HF-compatible hub), or straight from the folder of
the zoo's embedded hub on disk. For a variant the index pins (its commit and every file's sha256 known,
``checksums.sha256``'s too), every file is fetched at the pinned commit with no request to the hub
before it. For other variants, and for another revision than the pinned one, the revision is resolved
first (huggingface_hub's metadata request, or, when the hub is down, the ``refs/`` the cache recorded) and
its ``checksums.sha256`` fetched, checked against the ETag the hub sent and parsed strictly before it is
kept. Files come at once (a few threads, the weights first; when one fails the
others stop, keeping their bytes for a resume), hashed while they arrive (zoo/hub/transfer.py).

No file is used before its digest matched: BLAKE3 where the index records it, else sha256, against
the index for the variants it lists, otherwise against the served ``checksums.sha256`` (which guards
against broken transfers, proxies and caches, not against a hub that lies: give ``index=`` for that). A
file that does not match is deleted from the cache and the pull fails naming it (and the host that sent it,
when a redirect made that another one: zoo/hub/transfer.py says which redirects are followed). The endpoint is
``endpoint=``, else ``ZOO_ENDPOINT``, else the embedded hub. The user's Hugging Face token is never
sent to a zoo endpoint.
"""
from __future__ import annotations

import os
import platform
import re
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlsplit

from ..version import __version__
from .errors import explain
from .index import embedded_hub, load_index
from .protocol import CHECKSUMS, COMMIT_RE, NAMESPACE, HubError, parse_checksums, read_repo, sha256_file, variant_name
from .transfer import (
    TIMEOUT,
    CacheRepo,
    Cancelled,
    ChecksumError,
    copy_to_cache,
    download_to_cache,
    download_verified,
    etag_algorithm,
    file_digest,
)

WORKERS = 4  # files of one pull fetched at once
_REVISION_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")
Bad = list[tuple[str, str, str, str, str]]  # (file, algorithm, expected, actual, sender) of each mismatch


def _is_true(value: Optional[str]) -> bool:
    return value is not None and value.strip().upper() in ("1", "ON", "YES", "TRUE")


def is_offline() -> bool:
    """HF offline mode, read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or _is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """The HF hub cache as huggingface_hub resolves it, but read from the environment now:
    ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub`` (``HF_HOME`` defaulting to
    ``$XDG_CACHE_HOME/huggingface``, then ``~/.cache/huggingface``)."""
    env = os.environ
    path = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not path:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
        path = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(path)))


def _check_revision(revision: Any) -> str:
    if not isinstance(revision, str) or not _REVISION_RE.match(revision) or ".." in revision:
        raise HubError(f"invalid revision {revision!r}: use a branch name such as 'main' or a 40-hex commit id")
    return revision


def _check_endpoint(endpoint: Any, where: str) -> str:
    value = str(endpoint).strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise HubError(f"invalid hub endpoint {endpoint!r} (from {where}): expected a URL such as http://127.0.0.1:8765")
    return value


class _Pull:
    """One pull from an HTTP endpoint (or, offline, from the cache alone): where from and what to check."""

    def __init__(self, name: str, revision: str, where: str, cache: Path, *, endpoint: Optional[str] = None,
                 offline: bool = False):
        self.name, self.revision, self.where, self.cache = name, revision, where, cache
        self.endpoint, self.offline = endpoint, offline
        self.repo_id = f"{NAMESPACE}/{name}"
        self.pinned = False  # fetching at the commit the index pins, without asking the hub for it
        self.headers = {"User-Agent": f"hybridnorm-zoo/{__version__}; python/{platform.python_version()}"}

    def _explained(self, e: Exception, filename: str, revision: str) -> BaseException:
        error = explain(self, e, filename, revision)
        return e if error is None else error

    def checksums(self) -> Path:
        """``checksums.sha256`` of ``self.revision`` in the cache (its snapshot folder's name is the commit).

        Resolved as ``hf_hub_download`` resolves it (a HEAD request; when the hub is down or unreachable, the
        commit the cache recorded for the revision), but downloaded by the zoo's transfer (rate-checked,
        resumable) and verified against the ETag the hub gave (its sha256, or its git id) before it is kept;
        a cached copy that does not match its ETag is evicted and fetched again."""
        from huggingface_hub import errors as hf
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
        def cached() -> Path:
            return self._sound(Path(hf_hub_download(self.repo_id, CHECKSUMS, revision=self.revision,
                                                    cache_dir=self.cache, local_files_only=True)))
        try:
            if self.offline:
                return cached()
            url = hf_hub_url(self.repo_id, CHECKSUMS, revision=self.revision, endpoint=self.endpoint)
            try:
                meta = get_hf_file_metadata(url, token=False, timeout=TIMEOUT, headers=self.headers)
            except (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.EntryNotFoundError, hf.HFValidationError):
                raise
            except Exception as e:  # the hub is down or unreachable: the cache may hold the revision
                try:
                    return cached()
                except hf.LocalEntryNotFoundError as missing:
                    raise missing from e
            commit, etag = meta.commit_hash or "", meta.etag or ""
            if not COMMIT_RE.match(commit) or etag_algorithm(etag) is None:
                raise HubError(f"{self.where} does not answer like an HF hub for {self.repo_id}/{CHECKSUMS}: commit "
                               f"{commit or 'missing'}, ETag {etag or 'missing'} (a hub sends a 40-hex X-Repo-Commit "
                               "and the file's sha256 or git id as ETag)")
            repo = CacheRepo(self.cache, self.repo_id, commit)
            if repo.pointer(CHECKSUMS).exists():
                try:
                    self._sound(repo.pointer(CHECKSUMS))
                except ChecksumError:
                    pass  # evicted: fetched again below
            at_commit = hf_hub_url(self.repo_id, CHECKSUMS, revision=commit, endpoint=self.endpoint)
            pointer, _ = repo.place(CHECKSUMS, etag, lambda blob: download_verified(
                at_commit, blob, etag, algorithm=etag_algorithm(etag), headers=self.headers, progress_desc=CHECKSUMS))
            repo.record_ref(self.revision)
            return pointer
        except (HubError, Cancelled):
            raise
        except Exception as e:
            raise self._explained(e, CHECKSUMS, self.revision) from None

    def _sound(self, pointer: Path) -> Path:
        """``pointer`` if its content matches the ETag its blob is named after; else evicted, and an error."""
        etag = Path(os.path.realpath(pointer)).name
        algorithm = etag_algorithm(etag)
        if algorithm is not None and (got := file_digest(pointer, algorithm)) != etag:
            evict(pointer)
            raise ChecksumError(f"the cached {self.repo_id}/{pointer.name} is corrupt ({algorithm} {got}, its hub "
                                f"gave {etag}); it was removed from the cache {self.cache}: pull again", etag, got,
                                algorithm)
        return pointer

    def parse(self, sums: Path, commit: str) -> dict[str, str]:
        """``checksums.sha256`` parsed strictly (UTF-8 ``sha256sum`` lines, plain file names); a copy that does not
        parse is evicted from the cache, so the next pull fetches it again."""
        where = f"{self.repo_id}/{CHECKSUMS} (commit {commit}) from {self.where}"
        try:
            return parse_checksums(sums.read_bytes().decode("utf-8"), where)
        except (UnicodeDecodeError, HubError) as e:
            evict(sums)
            reason = f"not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})" \
                if isinstance(e, UnicodeDecodeError) else str(e).removeprefix(where + ", ").removeprefix(where + ": ")
            raise HubError(f"{where} is not a checksums file: {reason}; it was removed from the cache (a proxy or "
                           "captive portal may have answered instead of the hub, or its publisher wrote it wrong); "
                           "pull again once the hub serves it right") from None

    def fetch(self, repo: CacheRepo, filename: str, sha256: str, blake3: Optional[str] = None,
              cancel: Optional[threading.Event] = None) -> tuple[Path, bool]:
        """A file of ``repo``'s commit and whether it is verified already: from the cache if it is there (offline,
        through ``hf_hub_download``, which says what is missing), else through the zoo's verified transfer."""
        from huggingface_hub import hf_hub_download, hf_hub_url
        pointer = repo.pointer(filename)
        if pointer.exists():
            return pointer, False
        try:
            if self.offline:
                return Path(hf_hub_download(self.repo_id, filename, revision=repo.commit, cache_dir=self.cache,
                                            local_files_only=True)), False
            url = hf_hub_url(self.repo_id, filename, revision=repo.commit, endpoint=self.endpoint)
            return download_to_cache(url, repo, filename, sha256, blake3=blake3, headers=self.headers, cancel=cancel)
        except (ChecksumError, Cancelled):
            raise
        except Exception as e:
            raise self._explained(e, filename, repo.commit) from None

    def run(self, entry: Optional[dict[str, Any]]) -> Path:
        fast = dict(entry.get("blake3", {})) if entry is not None else {}  # checked instead of sha256 where given
        if (entry is not None and not self.offline and self.revision == entry["revision"]
                and CHECKSUMS in entry["files"]):
            # the index pins the commit and every file's sha256, checksums.sha256's too: nothing to ask the hub
            # first, every file fetched at once
            self.pinned = True
            expected, against = dict(entry["files"]), "the zoo's index"
            repo = CacheRepo(self.cache, self.repo_id, entry["revision"])
            unverified: dict[str, Path] = {}
            files = expected
        else:
            sums = self.checksums()
            commit = sums.parent.name
            if entry is not None:
                if commit != entry["revision"]:
                    raise HubError(f"{self.repo_id} at {self.where} is at commit {commit}, but the zoo's index pins "
                                   f"{entry['revision']}: that hub serves other files than the index records; "
                                   "pass the index that goes with them (index=FILE / --index FILE)")
                expected, against = dict(entry["files"]), "the zoo's index"
            else:
                expected = self.parse(sums, commit)
                against = f"{CHECKSUMS} of commit {commit}"
            repo = CacheRepo(self.cache, self.repo_id, commit)
            unverified = {CHECKSUMS: sums} if CHECKSUMS in expected else {}
            files = {f: h for f, h in expected.items() if f != CHECKSUMS}
        bad: Bad = []
        unverified.update(fetch_all(self, repo, files, fast, bad))
        verify(self, unverified, expected, fast, against, bad)
        return repo.snapshot


class _FolderPull(_Pull):
    """A pull from a folder of repositories on disk (the embedded hub): files are copied, not downloaded."""

    def __init__(self, name: str, revision: str, where: str, cache: Path, root: Path):
        super().__init__(name, revision, where, cache)
        self.root = root

    def checksums(self) -> Path:
        repo = read_repo(self.root, self.name)
        if repo is None:
            raise HubError(f"{self.repo_id} is not in {self.where}")
        if self.revision not in ("main", repo.commit):
            raise HubError(f"revision {self.revision!r} of {self.repo_id} not found in {self.where}, which holds "
                           f"'main' = {repo.commit}")
        cached = CacheRepo(self.cache, self.repo_id, repo.commit)
        source = repo.path / CHECKSUMS
        pointer, _ = copy_to_cache(source, cached, CHECKSUMS, sha256_file(source))
        cached.record_ref(self.revision)
        return pointer

    def fetch(self, repo: CacheRepo, filename: str, sha256: str, blake3: Optional[str] = None,
              cancel: Optional[threading.Event] = None) -> tuple[Path, bool]:
        pointer = repo.pointer(filename)
        if pointer.exists():
            return pointer, False
        source = self.root / self.name / filename
        if not source.is_file():
            raise HubError(f"file {filename!r} of {self.repo_id} is missing from {self.where}")
        return copy_to_cache(source, repo, filename, sha256, blake3=blake3)


def fetch_all(pull: _Pull, repo: CacheRepo, files: dict[str, str], fast: dict[str, str], bad: Bad) -> dict[str, Path]:
    """Fetch ``files`` {name: sha256} (verified against ``fast`` {name: blake3} where it has them) at once,
    the weights first (they take longest); returns those not verified on the way in. A checksum mismatch
    goes to ``bad``; any other failure stops the other downloads (their bytes kept for a resume) and is
    raised once all have stopped: the first file's, in that order."""
    order = sorted(files, key=lambda f: (not f.endswith(".safetensors"), f))
    if not order:
        return {}
    cancel = threading.Event()
    got: dict[str, tuple[Path, bool]] = {}
    mismatched: dict[str, ChecksumError] = {}
    errors: dict[str, BaseException] = {}
    with ThreadPoolExecutor(min(WORKERS, len(order)), thread_name_prefix=f"pull {pull.name}") as pool:
        futures = {pool.submit(pull.fetch, repo, f, files[f], fast.get(f), cancel): f for f in order}
        try:
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                filename, error = futures[future], future.exception()
                if error is None:
                    got[filename] = future.result()
                elif isinstance(error, ChecksumError):  # the transfer already deleted it
                    mismatched[filename] = error
                elif not isinstance(error, Cancelled):
                    errors[filename] = error
                    cancel.set()
                    for f in futures:
                        f.cancel()
        except BaseException:  # Ctrl-C: stop the downloads rather than wait for them
            cancel.set()
            for f in futures:
                f.cancel()
            raise
    if errors:
        raise errors[next(f for f in order if f in errors)]
    bad.extend((f, mismatched[f].algorithm, mismatched[f].expected, mismatched[f].actual, mismatched[f].sender)
               for f in order if f in mismatched)
    return {f: got[f][0] for f in order if f in got and not got[f][1]}


def evict(pointer: Path) -> None:
    """Remove a snapshot entry and the blob behind it, so nothing bad stays in the cache."""
    repo_folder = pointer.parents[2]  # <cache>/models--zoo--NAME/snapshots/<commit>/<file>
    blob = Path(os.path.realpath(pointer)) if pointer.is_symlink() else None
    pointer.unlink(missing_ok=True)
    if blob is not None and (repo_folder / "blobs").resolve() in blob.parents:
        blob.unlink(missing_ok=True)


def verify(pull: _Pull, paths: dict[str, Path], expected: dict[str, str], fast: dict[str, str], against: str,
           bad: Bad) -> None:
    """Hash ``paths`` (the files not verified while downloading: BLAKE3 where ``fast`` has it, else sha256)
    and fail on any mismatch, ``bad`` included."""
    for filename, path in paths.items():
        algorithm, want = ("blake3", fast[filename]) if filename in fast else ("sha256", expected[filename])
        got = file_digest(path, algorithm)
        if got != want:
            bad.append((filename, algorithm, want, got, ""))
            evict(path)
    if bad:
        filename, algorithm, want, got, sender = bad[0]
        more = f" (and {len(bad) - 1} more: {', '.join(b[0] for b in bad[1:])})" if len(bad) > 1 else ""
        raise ChecksumError(f"checksum mismatch for {pull.repo_id}/{filename} from {pull.where}{sender}: {against} "
                            f"has {algorithm} {want}, the download has {got}{more}; the bad file was removed from the "
                            "cache (the hub or the transfer is corrupt; pull again, or check the hub's files with "
                            "`sha256sum -c checksums.sha256`)")


def pull(name: str, endpoint: Optional[str] = None, revision: Optional[str] = None, *,
         index: Union[None, str, Path, dict[str, Any]] = None, cache_dir: Union[None, str, Path] = None) -> Path:
    """Download a published variant into the HF cache, verify it, and return its snapshot folder.

    ``endpoint``: a hub URL (``zoo serve`` or any HF-compatible one), else ``ZOO_ENDPOINT``, else the
    embedded hub (read from disk). ``revision``: default the commit the index pins, else ``main``.
    ``index``: the zoo index to verify against (default the shipped one). ``cache_dir``: default the HF
    hub cache. At the commit the index pins, every file is fetched with nothing asked first; any other
    revision is resolved first (see the module doc).
    """
    name = variant_name(name)
    if revision is not None:
        revision = _check_revision(revision)
    entry = load_index(index).get(name)
    revision = revision or (entry["revision"] if entry else "main")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir()
    if endpoint is not None:
        endpoint = _check_endpoint(endpoint, "the endpoint argument")
    elif os.environ.get("ZOO_ENDPOINT", "").strip():
        endpoint = _check_endpoint(os.environ["ZOO_ENDPOINT"], "ZOO_ENDPOINT")
    if is_offline():
        return _Pull(name, revision, "the cache (offline mode)", cache, endpoint=endpoint, offline=True).run(entry)
    if endpoint is not None:
        return _Pull(name, revision, endpoint, cache, endpoint=endpoint).run(entry)
    hub = embedded_hub()
    if not (hub / name / CHECKSUMS).is_file():
        have = sorted(p.name for p in hub.iterdir() if (p / CHECKSUMS).is_file()) if hub.is_dir() else []
        raise HubError(f"{NAMESPACE}/{name} is not in the zoo's embedded hub (it holds: {', '.join(have) or 'nothing'}); "
                       "publish it with `zoo publish NAME --to DIR`, serve DIR with `zoo serve DIR`, and pull with "
                       "--endpoint URL or ZOO_ENDPOINT=URL")
    return _FolderPull(name, revision, f"the zoo's embedded hub ({hub})", cache, hub).run(entry)
