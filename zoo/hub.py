"""Publish, serve and pull checkpoints: an HF-Hub-compatible zoo that needs nothing but itself.

- ``publish(NAME | CHECKPOINT, to=DIR)`` writes the repository folder ``DIR/<variant>/``: ``README.md``
  (the model card), ``config.yaml``, ``model.safetensors`` and ``checksums.sha256``; with ``index=FILE``
  it also records the files' sha256 and BLAKE3 digests and the commit id in a zoo index.
- ``serve(DIR)`` / ``serve_background(DIR)`` (zoo/hub_server.py) serve such folders on loopback with
  the HF Hub resolve protocol, as repositories ``zoo/<variant>``.
- ``pull(NAME)`` fills the standard HF cache (``HF_HOME`` / ``HF_HUB_CACHE``). For a variant the index
  pins (its commit and every file's sha256 known, ``checksums.sha256``'s too), every file comes through
  the zoo's own streaming transfer (zoo/hub_transfer.py) at the pinned commit, with no request to the hub
  before it. For other variants, and for another revision than the pinned one,
  ``huggingface_hub.hf_hub_download`` resolves the revision (writing ``refs/``) and fetches
  ``checksums.sha256``, and the transfer fetches the rest. The transfer fetches a pull's files at once
  (a few threads, the weights first; when one fails the others stop, keeping their bytes for a resume),
  hashes while it downloads, resumes with Range requests, and places the blob and its snapshot symlink in
  huggingface_hub's layout under huggingface_hub's lock. In offline mode (``HF_HUB_OFFLINE=1``) everything
  comes from the cache, ``checksums.sha256`` through ``hf_hub_download``. No file is used before its
  digest matched: files already in the cache, or fetched by huggingface_hub, are hashed after the
  download; the transfer's own are verified before they enter the cache.

Which digest a pulled file must have: the zoo's index (``plugins/hub/index.json``, shipped with the
package) for the variants it lists, which also pins their commit; it records each file's sha256 (which
names the blob in the cache, as the hub's ETag does) and, from indexes written since, its BLAKE3, which
is what gets checked then: BLAKE3 hashes about four times as fast as sha256, so verifying costs less
than the transfer. For other variants, the sha256 in the ``checksums.sha256`` the endpoint serves (that
guards against broken transfers and caches, not against a hub that lies: give ``index=`` for that). A
file that does not match is deleted from the cache (blob and snapshot entry) and the pull fails naming it.

The endpoint is ``endpoint=``, else ``ZOO_ENDPOINT``, else the zoo's embedded hub: the folders under
``plugins/hub/``, served in-process on an ephemeral loopback port for the length of the pull. The
user's Hugging Face token is never sent to a zoo endpoint.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import re
import shutil
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Optional, Union

from .hub_server import (CHECKSUMS, COMMIT_RE, NAMESPACE, SHA256_RE, HubError, HubServer, check_filename,
                         commit_id, format_checksums, parse_checksums, serve, serve_background, sha256_file)
from .hub_transfer import CacheRepo, Cancelled, ChecksumError, TruncatedError, download_to_cache, file_digest

__all__ = ["HubError", "ChecksumError", "HubServer", "publish", "serve", "serve_background", "pull",
           "load_pretrained", "load_index", "embedded_hub", "hub_cache_dir", "INDEX_NAME"]

INDEX_NAME = "index.json"
WEIGHTS = "model.safetensors"
WORKERS = 4  # files of one pull downloaded at once
UNTRAINED_NOTE = ("The weights published here are **untrained**: freshly initialized by `zoo.build(\"{name}\")` with "
                  "`torch.manual_seed({seed})`, so that publish, serve and pull work end to end before the zoo's "
                  "training recipe lands. They check the plumbing; they are not a language model.")
CHECKPOINT_NOTE = ("The weights published here come from the zoo checkpoint `{source}`; no measured results were "
                   "published with them.")
RESULTS_NOTE = ("The weights published here come from the zoo checkpoint `{source}`, trained by the zoo's recipe: "
                "{recipe}. Its own measured numbers are under Results.")
_REVISION_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")


# ---------------------------------------------------------------------------------------------
# Places: the embedded hub, its index, the HF cache
# ---------------------------------------------------------------------------------------------
def embedded_hub() -> Path:
    """The folder of published variants shipped with the zoo (``plugins/hub``, package ``zoo.plugins``)."""
    return Path(importlib.import_module("zoo.plugins").__file__).parent / "hub"


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


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _variant_name(name: Any) -> str:
    from .registry import check_name
    try:
        return check_name("variant", name)
    except ValueError as e:
        raise HubError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Publish
# ---------------------------------------------------------------------------------------------
def _is_checkpoint(source: str) -> bool:
    """A path (``*.safetensors``, ``*.index.json`` or anything with a separator) rather than a variant name."""
    return source.endswith((".safetensors", ".index.json")) or os.sep in source or "/" in source


def publish(source: Union[str, Path], to: Union[str, Path], *, index: Union[None, str, Path] = None,
            name: Optional[str] = None, seed: int = 0, results: Optional[dict[str, Any]] = None) -> Path:
    """Write the repository folder ``to/<variant>/`` and return it.

    ``source`` is a variant name (published with untrained weights: freshly initialized with ``seed``,
    which the card says) or a zoo checkpoint (published under ``name``, default the variant in its
    header) with its measured ``results`` (a model card results dict) on its card. With ``index``, the
    files' sha256 and BLAKE3 digests and the commit id are recorded in that index file.
    The folder is assembled next to its place and swapped in, so a running server never sees half of it.
    """
    import torch

    import zoo

    from .cards import render_card
    from .checkpoint import checkpoint_config

    source = str(source)
    if _is_checkpoint(source):
        cfg, meta = checkpoint_config(source)
        name = _variant_name(name or meta.get("variant") or "")
        model = zoo.load(source)
        note = (RESULTS_NOTE.format(source=Path(source).name, recipe=results.get("recipe", "see the training log"))
                if results else CHECKPOINT_NOTE.format(source=Path(source).name))
    else:
        base = _variant_name(source)
        name = _variant_name(name or base)
        cfg = zoo.get_config(base)
        torch.manual_seed(seed)
        model = zoo.build(base)
        note = UNTRAINED_NOTE.format(name=base, seed=seed)
        results = None  # measured numbers belong to trained weights, not to a fresh init
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".publishing", dir=to))
    try:
        (staging / "README.md").write_text(render_card(name, cfg, results=results, weights_note=note))
        (staging / "config.yaml").write_text(cfg.to_yaml())
        zoo.save(model, staging / WEIGHTS, variant=name)
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        checksums = format_checksums(files).encode()
        (staging / CHECKSUMS).write_bytes(checksums)
        for p in staging.iterdir():
            os.chmod(p, 0o644)
        os.chmod(staging, 0o755)
        final = to / name
        old = to / f".{name}.{uuid.uuid4().hex[:8]}.old"
        if final.exists():
            os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if index is not None:
        index = Path(index)
        data = load_index(index) if index.exists() else {}
        data[name] = {"revision": commit_id(checksums), "files": {**files, CHECKSUMS: sha256_file(final / CHECKSUMS)},
                      "blake3": {f: file_digest(final / f, "blake3") for f in [*files, CHECKSUMS]}}
        _write_json_atomic(index, data)
    return final


# ---------------------------------------------------------------------------------------------
# Pull
# ---------------------------------------------------------------------------------------------
def _check_revision(revision: Any) -> str:
    if not isinstance(revision, str) or not _REVISION_RE.match(revision) or ".." in revision:
        raise HubError(f"invalid revision {revision!r}: use a branch name such as 'main' or a 40-hex commit id")
    return revision


def _check_endpoint(endpoint: Any, where: str) -> str:
    from urllib.parse import urlsplit
    value = str(endpoint).strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise HubError(f"invalid hub endpoint {endpoint!r} (from {where}): expected a URL such as http://127.0.0.1:8765")
    return value


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)


def _status(e: BaseException) -> Optional[int]:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


class _Pull:
    """One pull: where from, what to check, and the translation of huggingface_hub's and urllib's errors."""

    def __init__(self, name: str, revision: str, endpoint: Optional[str], where: str, cache: Path, offline: bool):
        from . import __version__
        self.name, self.revision, self.endpoint, self.where, self.cache, self.offline = (
            name, revision, endpoint, where, cache, offline)
        self.repo_id = f"{NAMESPACE}/{name}"
        self.pinned = False  # fetching at the commit the index pins, without asking the hub for it
        self.headers = {"User-Agent": f"hybridnorm-zoo/{__version__}; python/{platform.python_version()}"}

    def download(self, filename: str, revision: str) -> Path:
        from huggingface_hub import hf_hub_download

        from . import __version__
        try:
            return Path(hf_hub_download(self.repo_id, filename, revision=revision, endpoint=self.endpoint,
                                        cache_dir=self.cache, local_files_only=self.offline, token=False,
                                        library_name="hybridnorm-zoo", library_version=__version__))
        except Exception as e:
            error = self.translate(e, filename, revision)
            if error is None:
                raise
            raise error from None

    def fetch(self, repo: CacheRepo, filename: str, sha256: str, blake3: Optional[str] = None,
              cancel: Optional[threading.Event] = None) -> tuple[Path, bool]:
        """A file of ``repo``'s commit and whether it is verified already: from the cache if it is there (offline,
        through ``hf_hub_download``, which says what is missing), else through the zoo's verified transfer."""
        from huggingface_hub import hf_hub_url
        pointer = repo.pointer(filename)
        if pointer.exists():
            return pointer, False
        if self.offline:
            return self.download(filename, repo.commit), False
        url = hf_hub_url(self.repo_id, filename, revision=repo.commit, endpoint=self.endpoint)
        try:
            return download_to_cache(url, repo, filename, sha256, blake3=blake3, headers=self.headers, cancel=cancel)
        except (ChecksumError, Cancelled):
            raise
        except Exception as e:
            error = self.translate(e, filename, repo.commit)
            if error is None:
                raise
            raise error from None

    def fetch_all(self, repo: CacheRepo, files: dict[str, str], fast: dict[str, str],
                  bad: list[tuple[str, str, str, str]]) -> dict[str, Path]:
        """Fetch ``files`` {name: sha256} (verified against ``fast`` {name: blake3} where it has them) at once,
        the weights first (they take longest); returns those not
        verified on the way in. A checksum mismatch goes to ``bad``; any other failure stops the other downloads
        (their bytes kept for a resume) and is raised once all have stopped: the first file's, in that order."""
        order = sorted(files, key=lambda f: (not f.endswith(".safetensors"), f))
        if not order:
            return {}
        cancel = threading.Event()
        got: dict[str, tuple[Path, bool]] = {}
        mismatched: dict[str, ChecksumError] = {}
        errors: dict[str, BaseException] = {}
        with ThreadPoolExecutor(min(WORKERS, len(order)), thread_name_prefix=f"pull {self.name}") as pool:
            futures = {pool.submit(self.fetch, repo, f, files[f], fast.get(f), cancel): f for f in order}
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
        bad.extend((f, mismatched[f].algorithm, mismatched[f].expected, mismatched[f].actual)
                   for f in order if f in mismatched)
        return {f: got[f][0] for f in order if f in got and not got[f][1]}

    def translate(self, e: Exception, filename: str, revision: str) -> Optional[HubError]:
        import urllib.error

        from huggingface_hub import errors as hf

        what = f"{self.repo_id}/{filename}"
        if isinstance(e, urllib.error.HTTPError):  # the zoo's transfer
            code = e.headers.get("X-Error-Code") if e.headers is not None else None
            if code == "RevisionNotFound" and self.pinned:
                return HubError(f"{self.repo_id} at {self.where} has no commit {revision}, which the zoo's index pins: "
                                "that hub serves other files than the index records; pass the index that goes with "
                                "its files (index=FILE / --index FILE)")
            if code == "RevisionNotFound":
                return HubError(f"revision {revision!r} of {self.repo_id} not found at {self.where} (HTTP {e.code}); "
                                "that hub serves 'main' and its current commit")
            if code == "RepoNotFound":
                return HubError(f"{self.repo_id} not found at {self.where} (HTTP {e.code}): that hub has no such "
                                f"repository; check the name, or publish it there with `zoo publish {self.name} --to DIR`")
            if e.code == 404 and code in (None, "EntryNotFound"):
                return HubError(f"file {filename!r} of {self.repo_id} (revision {revision}) not found at {self.where} (HTTP 404)")
            return HubError(f"the hub at {self.where} answered HTTP {e.code} for {what}: {_first_line(e)}")
        if isinstance(e, urllib.error.URLError):
            reason = _first_line(e.reason) if isinstance(e.reason, BaseException) else str(e.reason)
            return HubError(f"cannot reach the hub at {self.where} ({reason}) and {what} is not cached; check "
                            "--endpoint / ZOO_ENDPOINT (`zoo serve DIR` starts a hub), or unset both to use the embedded hub")
        if isinstance(e, TruncatedError):
            return HubError(f"downloading {what} from {self.where} broke off: {e}; run the pull again")
        if isinstance(e, hf.HFValidationError):
            return HubError(f"{self.repo_id} cannot be a hub repository id: {_first_line(e)}")
        if isinstance(e, hf.RevisionNotFoundError):
            return HubError(f"revision {revision!r} of {self.repo_id} not found at {self.where} (HTTP 404); "
                            "that hub serves 'main' and its current commit")
        if isinstance(e, hf.RepositoryNotFoundError):  # includes gated repos (401/403)
            return HubError(f"{self.repo_id} not found at {self.where} (HTTP {_status(e) or 404}): that hub has no "
                            f"such repository; check the name, or publish it there with `zoo publish {self.name} --to DIR`")
        if isinstance(e, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
            if self.offline:
                return HubError(f"{what} is not in the cache {self.cache} and offline mode is on (HF_HUB_OFFLINE=1); "
                                "pull it once with offline mode off (the embedded hub needs no internet)")
            cause = e.__cause__ or e.__context__
            status = _status(cause) if cause is not None else None
            if status is not None:
                return HubError(f"the hub at {self.where} answered HTTP {status} for {what} and no copy is cached; "
                                "try again later, or check the server's log")
            if isinstance(cause, hf.FileMetadataError):
                return HubError(f"{self.where} does not answer like an HF hub for {what}: {_first_line(cause)}")
            reason = _first_line(cause) if cause is not None else "no connection"
            return HubError(f"cannot reach the hub at {self.where} ({reason}) and {what} is not cached; check "
                            "--endpoint / ZOO_ENDPOINT (`zoo serve DIR` starts a hub), or unset both to use the embedded hub")
        if isinstance(e, hf.EntryNotFoundError):  # remote: the repository exists, the file does not
            return HubError(f"file {filename!r} of {self.repo_id} (revision {revision}) not found at {self.where} (HTTP 404)")
        if isinstance(e, hf.HfHubHTTPError):
            return HubError(f"the hub at {self.where} answered HTTP {_status(e)} for {what}: {_first_line(e)}")
        if isinstance(e, OSError):  # consistency check, disk full, permissions
            return HubError(f"downloading {what} from {self.where} failed: {_first_line(e)}; run the pull again "
                            "(files already complete stay cached)")
        module = type(e).__module__.split(".")[0]
        if module in ("httpx", "httpx2", "requests", "urllib3", "http"):  # the transfer broke beyond the client's retries
            return HubError(f"downloading {what} from {self.where} failed: {type(e).__name__}: {_first_line(e)}; "
                            "run the pull again")
        return None

    def evict(self, pointer: Path) -> None:
        """Remove a snapshot entry and the blob behind it, so nothing bad stays in the cache."""
        repo_folder = pointer.parents[2]  # <cache>/models--zoo--NAME/snapshots/<commit>/<file>
        blob = Path(os.path.realpath(pointer)) if pointer.is_symlink() else None
        pointer.unlink(missing_ok=True)
        if blob is not None and (repo_folder / "blobs").resolve() in blob.parents:
            blob.unlink(missing_ok=True)

    def verify(self, paths: dict[str, Path], expected: dict[str, str], fast: dict[str, str], against: str,
               bad: list[tuple[str, str, str, str]]) -> None:
        """Hash ``paths`` (the files not verified while downloading: BLAKE3 where ``fast`` has it, else sha256)
        and fail on any mismatch, ``bad`` (name, algorithm, expected, actual) included."""
        for filename, path in paths.items():
            algorithm, want = ("blake3", fast[filename]) if filename in fast else ("sha256", expected[filename])
            got = file_digest(path, algorithm)
            if got != want:
                bad.append((filename, algorithm, want, got))
                self.evict(path)
        if bad:
            filename, algorithm, want, got = bad[0]
            more = f" (and {len(bad) - 1} more: {', '.join(b[0] for b in bad[1:])})" if len(bad) > 1 else ""
            raise ChecksumError(f"checksum mismatch for {self.repo_id}/{filename} from {self.where}: {against} has "
                                f"{algorithm} {want}, the download has {got}{more}; the bad file was removed from the cache "
                                "(the hub or the transfer is corrupt; pull again, or check the hub's files with "
                                "`sha256sum -c checksums.sha256`)")

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
            sums = self.download(CHECKSUMS, self.revision)
            commit = sums.parent.name
            if entry is not None:
                if commit != entry["revision"]:
                    raise HubError(f"{self.repo_id} at {self.where} is at commit {commit}, but the zoo's index pins "
                                   f"{entry['revision']}: that hub serves other files than the index records; "
                                   "pass the index that goes with them (index=FILE / --index FILE)")
                expected, against = dict(entry["files"]), "the zoo's index"
            else:
                expected = parse_checksums(sums.read_text(), f"{self.repo_id}/{CHECKSUMS} from {self.where}")
                against = f"{CHECKSUMS} of commit {commit}"
            repo = CacheRepo(self.cache, self.repo_id, commit)
            unverified = {CHECKSUMS: sums} if CHECKSUMS in expected else {}
            files = {f: h for f, h in expected.items() if f != CHECKSUMS}
        bad: list[tuple[str, str, str, str]] = []
        unverified.update(self.fetch_all(repo, files, fast, bad))
        self.verify(unverified, expected, fast, against, bad)
        return repo.snapshot


def pull(name: str, endpoint: Optional[str] = None, revision: Optional[str] = None, *,
         index: Union[None, str, Path, dict[str, Any]] = None, cache_dir: Union[None, str, Path] = None) -> Path:
    """Download a published variant into the HF cache, verify it, and return its snapshot folder.

    ``endpoint``: a hub URL (``zoo serve`` or any HF-compatible one), else ``ZOO_ENDPOINT``, else the
    embedded hub. ``revision``: default the commit the index pins, else ``main``. ``index``: the zoo
    index to verify against (default the shipped one). ``cache_dir``: default the HF hub cache.
    At the commit the index pins, every file comes straight from the zoo's transfer, with no request to
    resolve anything first; any other revision is resolved by ``hf_hub_download`` (see the module doc).
    """
    name = _variant_name(name)
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
        return _Pull(name, revision, endpoint, "the cache (offline mode)", cache, offline=True).run(entry)
    if endpoint is not None:
        return _Pull(name, revision, endpoint, endpoint, cache, offline=False).run(entry)
    hub = embedded_hub()
    if not (hub / name / CHECKSUMS).is_file():
        have = sorted(p.name for p in hub.iterdir() if (p / CHECKSUMS).is_file()) if hub.is_dir() else []
        raise HubError(f"{NAMESPACE}/{name} is not in the zoo's embedded hub (it holds: {', '.join(have) or 'nothing'}); "
                       "publish it with `zoo publish NAME --to DIR`, serve DIR with `zoo serve DIR`, and pull with "
                       "--endpoint URL or ZOO_ENDPOINT=URL")
    with serve_background(hub) as url:
        return _Pull(name, revision, url, f"the zoo's embedded hub ({url})", cache, offline=False).run(entry)


def load_pretrained(name: str, overrides: Any = None, *, device: Any = None, dtype: Any = None):
    """``zoo.build(name, pretrained=True)``: pull the variant's published weights, then load them."""
    import torch

    from .checkpoint import load
    if not isinstance(name, str):
        raise HubError("pretrained=True needs a variant name (published weights belong to a name), not a config")
    if device is not None and torch.device(device).type == "meta":
        raise HubError("pretrained=True loads weights; build on the meta device without pretrained=True")
    snapshot = pull(name)
    path = snapshot / WEIGHTS
    if not path.exists() and (snapshot / f"{WEIGHTS}.index.json").exists():
        path = snapshot / f"{WEIGHTS}.index.json"
    return load(path, overrides, device=device, dtype=dtype)
