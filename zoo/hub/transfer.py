"""A verified, resumable streaming download of one file into the Hugging Face cache layout.

``download_verified`` hashes while it downloads, with sha256 or BLAKE3 (the zoo's index records both;
BLAKE3 runs several times as fast as sha256 with SIMD, faster than the transfer itself). A small body
(a known length of at most 1 MiB, as a model card, a config or ``checksums.sha256``) is read, hashed and
written in the calling thread: no thread, no mmap. A larger one moves with as few copies as the platform
allows: on Linux over plain ``http`` with a known length, ``os.splice`` socket -> pipe -> file inside the
kernel; otherwise ``readinto`` one reused buffer, then a write. Either way the file grows only as bytes land
(its blocks reserved up front where Linux allows, without changing its size), so a killed pull leaves
exactly what arrived and the next one asks for the rest with a ``Range`` request.
The hash reads, through read-only mmaps, what is already on disk, so it costs no second pass
over the file: BLAKE3 right after each step, while its pages are still in cache; sha256, slower than the
transfer, in a second thread (hashlib releases the GIL) so that the two overlap.

It writes ``<dest>.incomplete`` and resumes it with a ``Range`` request (in a later call, or in the
same call when the connection breaks), and renames it to ``dest`` only once its digest is the one
expected: nothing unverified ever sits at ``dest``. A ``cancel`` event stops a download at its next step,
keeping the bytes received for a resume (how a pull that fetches several files at once stops the others
when one fails). ``download_to_cache`` puts such a download where ``hf_hub_download`` would
(``blobs/<sha256>``, which is the zoo server's ETag, and a relative symlink ``snapshots/<commit>/<file>``,
the folders of a ``CacheRepo``), under the same lock file, so huggingface_hub finds it later, offline too.
"""
from __future__ import annotations

import functools
import hashlib
import mmap
import os
import queue
import re
import select
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional, Union
from urllib.parse import urlsplit

from blake3 import blake3
from filelock import FileLock

from ..files import blake3_file, write_text
from .protocol import HubError, git_blob_hash, sha256_file

STEP = 1 << 20  # bytes per splice / readinto, and per progress-bar update
SMALL = 1 << 20  # a body of at most this many bytes (the whole file) is read, hashed and written at once
HASH_STEP = 8 << 20  # bytes the sha256 thread takes at a time (BLAKE3 takes each STEP as it lands)
PIPE_SIZE = 1 << 20
RETRIES = 3  # requests again within one call: after a broken connection, or a busy server's Retry-After
TIMEOUT = 10.0  # seconds without data before giving up, as huggingface_hub's download timeout
MIN_RATE = 10_000.0  # bytes/s a transfer must keep up, averaged over RATE_WINDOW (ZOO_PULL_MIN_RATE)
RATE_WINDOW = 30.0  # seconds (ZOO_PULL_RATE_WINDOW)
MAX_RETRY_AFTER = 30.0  # seconds: a busy server's 429 or 503 asking for a wait up to this long is retried


def rate_limits() -> tuple[float, float]:
    """(minimum bytes/s, window in seconds) for transfers: the defaults, or ZOO_PULL_MIN_RATE and
    ZOO_PULL_RATE_WINDOW (0 turns the check off)."""
    def number(name: str, default: float) -> float:
        text = os.environ.get(name)
        try:
            return default if text is None else float(text)
        except ValueError:
            raise HubError(f"{name}={text!r} is not a number") from None
    return number("ZOO_PULL_MIN_RATE", MIN_RATE), number("ZOO_PULL_RATE_WINDOW", RATE_WINDOW)


class ChecksumError(HubError):
    """A downloaded file's digest is not the one recorded for it; the bad bytes were removed."""

    def __init__(self, message: str, expected: str = "", actual: str = "", algorithm: str = "sha256", sender: str = ""):
        super().__init__(message)
        self.expected, self.actual, self.algorithm, self.sender = expected, actual, algorithm, sender


class TruncatedError(ConnectionError):
    """The connection closed before the whole body arrived; the bytes received are kept for a resume."""


class TooSlowError(HubError):
    """The server kept sending, but below the minimum rate: a trickle that would take forever."""


class Cancelled(Exception):
    """The download's ``cancel`` event was set; the bytes received are kept for a resume."""


class RedirectRefused(HubError):
    """The endpoint redirected a download to a host that the user has not allowed."""


OFFICIAL_HUB = ("huggingface.co", "hf.co")  # whose redirects (to its CDNs) are followed as huggingface_hub does


def allowed_redirect_hosts() -> set[str]:
    """Hosts (``name`` or ``name:port``) that downloads may be redirected to from any endpoint:
    ZOO_ALLOW_REDIRECTS, comma-separated."""
    return {h.strip().lower() for h in os.environ.get("ZOO_ALLOW_REDIRECTS", "").split(",") if h.strip()}


def redirect_allowed(origin: str, target: str) -> bool:
    """Whether a download of ``origin`` may follow a redirect to ``target``: on the same host (scheme, name and
    port); from the official Hub to any https host, as huggingface_hub follows it to its CDNs; else only to a
    host in ZOO_ALLOW_REDIRECTS, and never from https down to http."""
    a, b = urlsplit(origin), urlsplit(target)
    if (a.scheme, a.netloc.lower()) == (b.scheme, b.netloc.lower()):
        return True
    if b.scheme not in ("http", "https") or (a.scheme == "https" and b.scheme != "https"):
        return False
    host = (a.hostname or "").lower()
    if b.scheme == "https" and any(host == h or host.endswith("." + h) for h in OFFICIAL_HUB):
        return True
    allowed = allowed_redirect_hosts()
    return (b.hostname or "").lower() in allowed or b.netloc.lower() in allowed


class _RedirectPolicy(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, each one checked by ``redirect_allowed`` against the first URL."""

    def __init__(self, origin: str):
        self.origin = origin

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if not redirect_allowed(self.origin, newurl):
            raise RedirectRefused(f"{urlsplit(self.origin).netloc} redirected the download to {newurl} (HTTP {code}); "
                                  f"the zoo follows redirects to other hosts only from the official Hub, or to hosts "
                                  f"listed in ZOO_ALLOW_REDIRECTS (e.g. ZOO_ALLOW_REDIRECTS={urlsplit(newurl).netloc})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


GIT_SHA1 = "git-sha1"  # the id git gives a file: an HF hub's ETag for a file kept in git rather than LFS


def new_hash(algorithm: str, data: bytes = b"", size: Optional[int] = None) -> Any:
    """A hashlib-style object for ``algorithm``: ``sha256`` (or any hashlib name), ``blake3``, or ``git-sha1``
    (which needs the whole file's ``size``)."""
    if algorithm == "blake3":
        return blake3(data)
    if algorithm == GIT_SHA1:
        if size is None:
            raise ValueError("git-sha1 needs the file's size")
        h = git_blob_hash(size)
        h.update(data)
        return h
    return hashlib.new(algorithm, data)


def etag_algorithm(etag: str) -> Optional[str]:
    """How a hub's ETag names a file's content: 64 hex digits are its sha256 (LFS files, and every file
    ``zoo serve`` sends), 40 its git id; None for any other ETag, which proves nothing."""
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        return "sha256"
    if re.fullmatch(r"[0-9a-f]{40}", etag):
        return GIT_SHA1
    return None


def file_digest(path: Union[str, Path], algorithm: str) -> str:
    """The hex ``algorithm`` digest of a file on disk (BLAKE3 over an mmap, on all cores)."""
    if algorithm == "blake3":
        return blake3_file(path)
    if algorithm == GIT_SHA1:
        h = new_hash(GIT_SHA1, size=os.path.getsize(path))
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    return sha256_file(path)


class _Hasher:
    """The digest of a growing file's prefix, read through read-only mmaps of the file: in the calling thread
    as each piece is fed (``inline``: for BLAKE3, faster than the transfer), else in a thread of its own."""

    def __init__(self, path: Path, algorithm: str):
        self.algorithm, self.inline = algorithm, algorithm == "blake3"
        self.step = STEP if self.inline else HASH_STEP  # bytes written between feeds
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._hash, self._done = new_hash(algorithm), 0
        self._error: Optional[BaseException] = None
        self._abort = False
        if not self.inline:
            self._queue: queue.SimpleQueue[Optional[int]] = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, daemon=True, name=f"{algorithm} {path.name}")
            self._thread.start()

    def feed(self, end: int) -> None:
        """Hash the file up to byte ``end``; an ``end`` below what was hashed starts over from byte 0."""
        if self.inline:
            self._hash_to(end)
        else:
            self._queue.put(end)

    def _hash_to(self, end: int) -> None:
        if end < self._done:
            self._hash, self._done = new_hash(self.algorithm), 0
        if end > self._done:
            start = self._done - self._done % mmap.ALLOCATIONGRANULARITY
            with mmap.mmap(self._fd, end - start, offset=start, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
                self._hash.update(view[self._done - start:])
            self._done = end

    def _run(self) -> None:
        while (end := self._queue.get()) is not None:
            if self._abort or self._error is not None:
                continue
            try:
                self._hash_to(end)
            except BaseException as e:  # re-raised by digest()
                self._error = e

    def close(self, abort: bool = False) -> None:
        """Stop the thread (at once with ``abort``, else once it has hashed all it was fed)."""
        if self._fd < 0:
            return
        if not self.inline:
            self._abort = abort
            self._queue.put(None)
            self._thread.join()
        os.close(self._fd)
        self._fd = -1

    def digest(self, end: int) -> str:
        self.feed(end)
        self.close()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()


def reserve(fd: int, start: int, end: int) -> None:
    """Allocate the disk blocks of bytes ``start``-``end`` of a file up front without changing its size (Linux
    ``fallocate`` with ``FALLOC_FL_KEEP_SIZE``): writes then need no allocation as the file grows, and the size
    still counts only the bytes written, so a killed download resumes from there. Elsewhere, nothing."""
    fallocate = _fallocate()
    if fallocate is not None:
        fallocate(fd, 1, start, end - start)  # 1: FALLOC_FL_KEEP_SIZE; a failure (e.g. no support) changes nothing


@functools.lru_cache(maxsize=None)
def _fallocate() -> Optional[Callable[..., int]]:
    """libc's ``fallocate`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fallocate


class _Download:
    """One file's transfer into its ``.incomplete`` part: the bytes written so far, their hash, the bar."""

    def __init__(self, url: str, part: Path, algorithm: str, headers: dict[str, str], timeout: float, bar: Any,
                 cancel: Optional[threading.Event]):
        self.url, self.part, self.headers, self.timeout, self.bar, self.cancel = url, part, headers, timeout, bar, cancel
        self.algorithm = algorithm
        self.fd = os.open(part, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        self.got = self.fed = self.shown = self.start = os.fstat(self.fd).st_size
        self.hasher: Optional[_Hasher] = None  # started for the first body that is not small
        self.small_hash: Any = None  # a small body's hash (of the whole part), computed in this thread
        self.min_rate, self.window = rate_limits()
        self.window_start, self.window_got = time.monotonic(), self.got
        self.opener = urllib.request.build_opener(_RedirectPolicy(url))
        self.source, self.html = url, False

    def advance(self, got: int) -> None:
        self.got = got
        self._pace()
        if self.hasher is not None and got - self.fed >= self.hasher.step:
            self.hasher.feed(got)
            self.fed = got
        if got - self.shown >= STEP:
            self.bar.update(got - self.shown)
            self.shown = got
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"stopped after {got} bytes, which are kept in {self.part} for the next pull to resume")

    def _pace(self) -> None:
        """Fail a transfer that has stayed below ``min_rate`` over a whole ``window``."""
        if self.min_rate <= 0 or self.window <= 0:
            return
        elapsed = time.monotonic() - self.window_start
        if elapsed < self.window:
            return
        received = self.got - self.window_got
        if received < self.min_rate * elapsed:
            raise TooSlowError(f"the server{self.sender()} sent {received:,} bytes in the last {elapsed:.0f} s, "
                               f"below the minimum {self.min_rate:,.0f} bytes/s (ZOO_PULL_MIN_RATE, over "
                               f"ZOO_PULL_RATE_WINDOW={self.window:g} s); {self.got:,} bytes are kept in {self.part} "
                               "for the next pull")
        self.window_start, self.window_got = time.monotonic(), self.got

    def digest(self) -> str:
        """The digest of the part's ``got`` bytes."""
        return self.small_hash.hexdigest() if self.small_hash is not None else self._hashing().digest(self.got)

    def close(self) -> None:
        if self.hasher is not None:
            self.hasher.close(abort=True)
        os.ftruncate(self.fd, self.got)
        os.close(self.fd)

    def _hashing(self) -> _Hasher:
        if self.hasher is None:
            self.hasher = _Hasher(self.part, self.algorithm)
        return self.hasher

    def open(self) -> Any:
        if self.got:
            try:
                return self._get({"Range": f"bytes={self.got}-"})
            except urllib.error.HTTPError as e:
                if e.code != 416:  # 416: the part is no prefix of this file
                    raise
                e.close()
        return self._get({})

    def _get(self, extra: dict[str, str]) -> Any:
        r = self.opener.open(urllib.request.Request(self.url, headers={**self.headers, **extra}), timeout=self.timeout)
        self.source, self.html = r.geturl(), r.headers.get_content_type() == "text/html"
        return r

    def sender(self) -> str:
        """Who sent the bytes, when a redirect made it another host than the URL's, and whether they were a web
        page (for error messages)."""
        origin, source = urlsplit(self.url).netloc, urlsplit(self.source).netloc
        return ("" if source == origin else f" (sent by {source}, to which {origin} redirected)") + \
            (" (the server sent an HTML page, not the file)" if self.html else "")

    def attempt(self) -> None:
        """One request, resuming from the bytes already written (``self.start``)."""
        self.start = self.got
        self.window_start, self.window_got = time.monotonic(), self.got  # the rate counts from this request on
        with self.open() as r:
            start = 0
            if r.status == 206:
                m = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != self.got:
                    raise ConnectionError(f"asked for bytes {self.got}- and got {r.headers.get('Content-Range')!r}")
                start = self.got
            end = None if r.length is None else start + r.length  # http.client: None when chunked or unsized
            self.got = self.fed = self.shown = self.start = start
            self.bar.reset(total=end)
            self.bar.update(start)
            if self.algorithm == GIT_SHA1 and end is None:
                raise HubError(f"{self.url} came without a Content-Length, which its git id needs to be checked")
            if end is not None and (end <= SMALL or self.algorithm == GIT_SHA1):  # a git id hashes the size first
                self._small(r, end)
            else:
                self.small_hash = None
                self._hashing().feed(start)
                if end is None:
                    self._copy(r)
                    return
                if end > start:
                    reserve(self.fd, start, end)
                    if hasattr(os, "splice") and urlsplit(r.geturl()).scheme == "http":
                        self._splice(r, end)
                    else:
                        self._copy(r, end)
            if self.got < end:
                raise TruncatedError(f"the connection{self.sender()} closed after {self.got} of {end} bytes, which are "
                                     f"kept in {self.part} for the next pull to resume")

    def _small(self, r: Any, end: int) -> None:
        """A small file's body: read whole (short if the connection closed early), hashed after the prefix
        it resumes, and written, all in this thread."""
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.small_hash = new_hash(self.algorithm, os.read(self.fd, self.got) if self.got else b"", size=end)
        while self.got < end and (body := r.read1(end - self.got)):  # as it arrives, so the rate is watched
            self.small_hash.update(body)
            self._write(body)

    def _write(self, data: Union[bytes, memoryview]) -> None:
        view = memoryview(data)
        os.lseek(self.fd, self.got, os.SEEK_SET)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.advance(self.got + n)

    def _copy(self, r: Any, end: Optional[int] = None) -> None:
        """Read into one reused buffer and write, up to ``end``; with no ``end`` (chunked or unsized), until the
        body ends. A sized read makes one socket read per call (readinto1), so a stalled read loses nothing."""
        view = memoryview(bytearray(STEP))
        while end is None or self.got < end:
            n = r.readinto(view) if end is None else r.fp.readinto1(view[:min(STEP, end - self.got)])
            if not n:
                return
            self._write(view[:n])

    def _splice(self, r: Any, end: int) -> None:
        import fcntl
        buffered = r.fp.peek()[:end - self.got]  # what the response's reader read past the headers
        if buffered:
            self._write(r.fp.read1(len(buffered)))
        sock = r.fp.fileno()
        rp, wp = os.pipe()
        try:
            try:
                fcntl.fcntl(wp, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass
            while self.got < end:
                try:
                    n = os.splice(sock, wp, min(STEP, end - self.got))
                except BlockingIOError:  # a socket with a timeout is non-blocking
                    if not select.select([sock], [], [], self.timeout)[0]:
                        raise TimeoutError(f"no data from the server for {self.timeout:g} s") from None
                    continue
                if not n:
                    return
                at = self.got
                while n:
                    w = os.splice(rp, self.fd, n, offset_dst=at)
                    at, n = at + w, n - w
                self.advance(at)
        finally:
            os.close(rp)
            os.close(wp)


def retry_after(e: urllib.error.HTTPError) -> Optional[float]:
    """Seconds to wait before asking again, for a 429 or 503 whose Retry-After (in seconds) is at most
    MAX_RETRY_AFTER; None for any other error, which is not retried."""
    try:
        wait = float(e.headers.get("Retry-After", "")) if e.code in (429, 503) and e.headers is not None else None
    except ValueError:
        return None
    return wait if wait is not None and 0 <= wait <= MAX_RETRY_AFTER else None


def download_verified(url: str, dest: Union[str, Path], digest: str, *, algorithm: str = "sha256",
                      headers: Optional[dict[str, str]] = None, progress_desc: Optional[str] = None,
                      timeout: float = TIMEOUT, cancel: Optional[threading.Event] = None) -> None:
    """Download ``url`` to ``dest`` through ``<dest>.incomplete`` (resumed if it exists), renamed to ``dest``
    only if its ``algorithm`` digest (sha256 or blake3) is ``digest``. Raises ChecksumError (the part
    deleted), TruncatedError or Cancelled (``cancel`` was set; the part kept), urllib's HTTPError and
    URLError, or OSError."""
    from huggingface_hub.utils import tqdm
    dest = Path(dest)
    part = dest.with_name(dest.name + ".incomplete")
    with tqdm(unit="B", unit_scale=True, desc=progress_desc or dest.name, disable=None) as bar:  # None: on a TTY only
        job = _Download(url, part, algorithm, dict(headers or {}), timeout, bar, cancel)
        actual = None
        try:
            for attempt in range(RETRIES + 1):
                try:
                    job.attempt()
                    break
                except urllib.error.HTTPError as e:
                    wait = retry_after(e)
                    if attempt == RETRIES or wait is None:
                        raise
                    e.close()
                    time.sleep(wait)
                except (ConnectionError, TimeoutError) as e:
                    stalled = job.got <= job.start
                    if attempt == RETRIES or (stalled and isinstance(e, TimeoutError)):
                        raise
                    if stalled:  # dropped before any byte: ask again after a moment
                        time.sleep(0.5 * (attempt + 1))
            actual = job.digest()
            bar.update(job.got - job.shown)
        finally:
            job.close()
            if actual is None and job.got == 0:
                part.unlink(missing_ok=True)
    if actual != digest:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"checksum mismatch for {url}{job.sender()}: expected {algorithm} {digest}, received "
                            f"{actual}; the download was deleted", digest, actual, algorithm, job.sender())
    os.replace(part, dest)


class CacheRepo:
    """One repository at one commit in an HF hub cache, where ``hf_hub_download`` keeps it:
    ``<cache>/models--<namespace>--<name>/blobs/`` and ``.../snapshots/<commit>/``, its lock files in
    ``<cache>/.locks/models--<namespace>--<name>/``. Folders are made once, when first needed (the
    snapshot's once a file is in the cache, so a commit the hub lacks leaves no empty snapshot behind)."""

    def __init__(self, cache_dir: Union[str, Path], repo_id: str, commit: str):
        from huggingface_hub.file_download import repo_folder_name
        folder = repo_folder_name(repo_id=repo_id, repo_type="model")
        self.cache, self.repo_id, self.commit = Path(cache_dir), repo_id, commit
        self.blobs = self.cache / folder / "blobs"
        self.snapshot = self.cache / folder / "snapshots" / commit
        self.locks = self.cache / ".locks" / folder
        self._prepared = self._snapshot_made = False

    def pointer(self, filename: str) -> Path:
        return self.snapshot / filename

    def prepare(self) -> None:
        """What huggingface_hub does before a download: make the blob and lock folders and tag the cache for
        backup tools (``CACHEDIR.TAG``, huggingface_hub >= 1.0); once."""
        if not self._prepared:
            self.blobs.mkdir(parents=True, exist_ok=True)
            self.locks.mkdir(parents=True, exist_ok=True)
            try:
                from huggingface_hub._local_folder import _create_cachedir_tag
            except ImportError:  # a huggingface_hub that writes no tag
                pass
            else:
                _create_cachedir_tag(self.cache)
            self._prepared = True

    def place(self, filename: str, sha256: str, make_blob: Callable[[Path], None]) -> tuple[Path, bool]:
        """The snapshot entry ``filename`` and its blob ``blobs/<sha256>``, as ``hf_hub_download`` places them,
        under huggingface_hub's lock for that blob: ``make_blob(path)`` writes the blob, verified, unless
        another revision has it already. Returns the snapshot path and whether this call made the blob."""
        self.prepare()
        blob, pointer = self.blobs / sha256, self.pointer(filename)
        with FileLock(self.locks / f"{sha256}.lock", mode=0o664):
            fresh = not blob.exists()
            if fresh:
                make_blob(blob)
            if not pointer.exists():
                self.link(filename, blob, new_blob=fresh)
        return pointer, fresh

    def record_ref(self, revision: str) -> None:
        """Record that ``revision`` (a branch) is at this commit, as ``hf_hub_download`` does for offline use."""
        if revision != self.commit:
            refs = self.snapshot.parent.parent / "refs"
            refs.mkdir(parents=True, exist_ok=True)
            if not (refs / revision).is_file() or (refs / revision).read_text() != self.commit:
                write_text(refs / revision, self.commit)

    def link(self, filename: str, blob: Path, new_blob: bool) -> Path:
        """The snapshot entry ``filename``, a relative symlink to ``blob`` made by huggingface_hub."""
        from huggingface_hub.file_download import _create_symlink
        if not self._snapshot_made:
            self.snapshot.mkdir(parents=True, exist_ok=True)
            self._snapshot_made = True
        _create_symlink(str(blob), str(self.pointer(filename)), new_blob=new_blob)
        return self.pointer(filename)


def download_to_cache(url: str, repo: CacheRepo, filename: str, sha256: str, *, blake3: Optional[str] = None,
                      headers: Optional[dict[str, str]] = None,
                      cancel: Optional[threading.Event] = None) -> tuple[Path, bool]:
    """Put ``filename`` of ``repo`` into the HF cache as ``hf_hub_download`` would: the blob ``blobs/<sha256>``
    (downloaded verified, against ``blake3`` where given, else ``sha256``, unless another revision has it
    already) and the snapshot entry linking to it, under huggingface_hub's lock for that blob. Returns the
    snapshot path and whether this call downloaded (and so verified) the blob."""
    return repo.place(filename, sha256, lambda blob: download_verified(
        url, blob, blake3 or sha256, algorithm="blake3" if blake3 else "sha256", headers=headers,
        progress_desc=filename, cancel=cancel))


def copy_to_cache(source: Path, repo: CacheRepo, filename: str, sha256: str, *,
                  blake3: Optional[str] = None) -> tuple[Path, bool]:
    """Put a file that is on disk already (the embedded hub's) into the HF cache as ``download_to_cache`` puts a
    download: copied to ``blobs/<sha256>.incomplete``, verified (``blake3`` where given, else ``sha256``),
    renamed, linked; under the same lock. Returns the snapshot path and whether this call made the blob."""
    def copy_verified(blob: Path) -> None:
        part = blob.with_name(blob.name + ".incomplete")
        shutil.copyfile(source, part)
        algorithm, want = ("blake3", blake3) if blake3 else ("sha256", sha256)
        got = file_digest(part, algorithm)
        if got != want:
            part.unlink(missing_ok=True)
            raise ChecksumError(f"checksum mismatch for {source}: expected {algorithm} {want}, found {got}; "
                                "nothing was cached", want, got, algorithm)
        os.replace(part, blob)

    return repo.place(filename, sha256, copy_verified)
