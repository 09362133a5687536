"""`zoo serve`: a folder of published variants served on loopback with the HF Hub resolve protocol.

A served folder holds one repository per variant, ``DIR/<variant>/``, as ``zoo publish`` writes it
(zoo/hub/protocol.py says what a repository holds).

What ``huggingface_hub.hf_hub_download`` needs from a server, and what this one sends:

- ``HEAD|GET /zoo/<variant>/resolve/<revision>/<file>``, revision ``main`` or the commit id, answered
  with ``ETag`` (the quoted sha256 that ``checksums.sha256`` records for the file, as the Hub sends an
  LFS file's recorded oid: the cache names the blob after it), ``X-Repo-Commit``, ``Content-Length``,
  ``Accept-Ranges: bytes``; ``*.safetensors`` files also carry ``X-Linked-Etag`` and
  ``X-Linked-Size`` as LFS files on the Hub do. ``Range: bytes=a-b`` gets ``206`` with ``Content-Range``,
  which is how the client resumes a download that lost its connection.
- ``GET /api/models/zoo/<variant>[/revision/<revision>]``: ``{"id", "sha", "siblings": [{"rfilename"}]}``,
  with ``?blobs=true`` each sibling's ``size``, ``blobId`` and ``lfs``.
- The rest of the read-only API that huggingface_hub's listing and snapshot calls use (zoo/hub/listing.py):
  ``GET /api/models[?search=&author=&filter=&limit=]``, ``GET /api/models/zoo/<variant>/tree/<revision>``,
  ``.../refs``, ``.../commits/<revision>`` and ``POST .../paths-info/<revision>``.
- Errors as the Hub sends them: 404 with ``X-Error-Code: RepoNotFound | RevisionNotFound |
  EntryNotFound``, an ``X-Error-Message`` and a JSON body ``{"error": ...}``.

Nothing outside DIR is ever served: names are checked, only listed files are served, and a file
whose real path (after symlinks) leaves DIR is refused.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Union
from urllib.parse import parse_qs, unquote, urlsplit

from . import listing
from .protocol import NAMESPACE, HubError, Repo, check_filename, list_repos, read_repo, sha256_file

HOST = "127.0.0.1"
LFS_SUFFIXES = listing.LFS_SUFFIXES
MAX_FORM_BYTES = 1 << 20  # a paths-info request body
MAX_RANGE_DIGITS = 20     # a Range bound past 10^20 bytes is unsatisfiable
IDLE_TIMEOUT = 30.0       # seconds a connection may send nothing before it is closed
MAX_CONNECTIONS = 512     # connections served at once (one thread each); more are answered 503 at once


class HubRequestHandler(BaseHTTPRequestHandler):
    """HEAD and GET of the resolve and API routes, POST of paths-info; each response closes its connection."""

    server: "HubServer"
    protocol_version = "HTTP/1.0"
    server_version = "zoo-hub"

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # a silent or half-sent request frees its thread after this long
        super().setup()

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._handle(head=False)

    def do_POST(self) -> None:  # noqa: N802 (paths-info alone)
        self._handle(head=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} - [{self.log_date_time_string()}] {format % args}\n")

    # -- routing ---------------------------------------------------------------------------
    def _handle(self, head: bool) -> None:
        try:
            segments = [unquote(s) for s in urlsplit(self.path).path.split("/")[1:]]
            if self.command == "POST":
                if len(segments) == 6 and segments[:2] == ["api", "models"] and segments[4] == "paths-info":
                    self._paths_info(segments[2], segments[3], segments[5])
                else:
                    self.send_error_json(404, None, f"Not Found: {self.path}")
            elif segments[:2] == ["api", "models"]:
                self._model_info(segments[2:], head)
            elif len(segments) >= 5 and segments[2] == "resolve":
                self._resolve(segments[0], segments[1], segments[3], "/".join(segments[4:]), head)
            else:
                self.send_error_json(404, None, f"Not Found: {self.path}", head)
        except HubError as e:  # a repository's checksums.sha256 is malformed: the server's fault
            self.send_error_json(500, None, str(e), head)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _repo(self, namespace: str, name: str, head: bool) -> Optional[Repo]:
        repo = self.server.repo(name) if namespace == NAMESPACE else None
        if repo is None:
            self.send_error_json(404, "RepoNotFound", f"Repository Not Found: {namespace}/{name}", head)
        return repo

    def _revision_ok(self, repo: Repo, revision: str, head: bool) -> bool:
        if revision in ("main", repo.commit):
            return True
        self.send_error_json(404, "RevisionNotFound", f"Revision Not Found: {revision!r} of {repo.repo_id} "
                             f"(this hub serves 'main' = {repo.commit})", head, repo)
        return False

    def _model_info(self, rest: list[str], head: bool) -> None:
        """``/api/models`` (the listing), and per repository: info, ``tree``, ``refs`` and ``commits``."""
        query = parse_qs(urlsplit(self.path).query)
        if not rest or rest == [""]:
            self._list_models(query, head)
            return
        repo = self._repo(rest[0], rest[1], head) if len(rest) >= 2 else None
        if len(rest) < 2:
            self.send_error_json(404, None, f"Not Found: {self.path}", head)
            return
        if repo is None:
            return
        route, args = (rest[2] if len(rest) > 2 else "revision"), rest[3:]
        if route in ("revision", "tree", "commits") and args and not self._revision_ok(repo, args[0], head):
            return
        if route == "revision" and len(args) <= 1:
            metadata = query.get("blobs", ["false"])[0].lower() == "true"
            self.send_json(listing.model_entry(repo, [listing.sibling(e) for e in self._entries(repo)]
                                               if metadata else None), head, repo)
        elif route == "tree" and args:
            folder = "/".join(args[1:]).strip("/")
            if folder:
                self.send_error_json(404, "EntryNotFound", f"Entry Not Found: {folder!r} in {repo.repo_id} (its files "
                                     "are all at the top)", head, repo)
            else:
                self.send_json(self._entries(repo), head, repo)
        elif route == "refs" and not args:
            self.send_json(listing.refs(repo), head, repo)
        elif route == "commits" and len(args) == 1:
            self.send_json(listing.commits(repo), head, repo)
        else:
            self.send_error_json(404, None, f"Not Found: {self.path}", head)

    def _entries(self, repo: Repo, names: Optional[list[str]] = None) -> list[dict[str, Any]]:
        """Tree entries of ``repo``'s files (of ``names`` among them, skipping others, as paths-info does)."""
        entries = []
        for name in repo.filenames if names is None else [n for n in names if n in repo.filenames]:
            path = self.server.file_path(repo, name)
            if path is not None:
                entries.append(listing.file_entry(repo, name, path))
        return entries

    def _list_models(self, query: dict[str, list[str]], head: bool) -> None:
        search, author = query.get("search", [None])[0], query.get("author", [None])[0]
        tags = query.get("filter", [])
        repos = [r for r in (self.server.repo(n) for n in list_repos(self.server.root)) if r is not None]
        found = [listing.model_entry(r) for r in repos if listing.matches(r, search, author, tags)]
        limit = query.get("limit", [None])[0]
        self.send_json(found[:int(limit)] if limit and limit.isdigit() else found, head)

    def _paths_info(self, namespace: str, name: str, revision: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_FORM_BYTES:
            self.send_error_json(413, None, f"paths-info request of {length} bytes; this hub takes {MAX_FORM_BYTES}")
            return
        form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        repo = self._repo(namespace, name, False)
        if repo is None or not self._revision_ok(repo, revision, False):
            return
        self.send_json(self._entries(repo, form.get("paths", [])), False, repo)

    def _resolve(self, namespace: str, name: str, revision: str, filename: str, head: bool) -> None:
        repo = self._repo(namespace, name, head)
        if repo is None or not self._revision_ok(repo, revision, head):
            return
        path = self.server.file_path(repo, filename) if filename in repo.filenames else None
        if path is None:
            self.send_error_json(404, "EntryNotFound", f"Entry Not Found: {filename!r} in {repo.repo_id}", head, repo)
            return
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            etag = self.server.etag(repo, filename, path)
            start, length, status = 0, size, 200
            wanted = self.headers.get("Range")
            if wanted:
                span = parse_range(wanted, size)
                if span == "unsatisfiable":
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if span is not None:
                    start, end = span
                    length, status = end - start + 1, 206
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Repo-Commit", repo.commit)
            if filename.endswith(LFS_SUFFIXES):
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(size))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{start + length - 1}/{size}")
            self.end_headers()
            if not head:
                f.seek(start)
                self.send_body(f, length, filename)

    # -- output ----------------------------------------------------------------------------
    def send_json(self, data: Any, head: bool, repo: Optional[Repo] = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if repo is not None:
            self.send_header("X-Repo-Commit", repo.commit)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def send_body(self, f: BinaryIO, length: int, filename: str) -> None:
        """Send ``length`` bytes of ``f``, from its position, to the client (tests override this to drop or
        slow it). ``socket.sendfile`` hands the copy to the kernel (``os.sendfile``: page cache to socket,
        no Python loop), so the server costs little next to the client."""
        self.wfile.flush()
        if length > 0:  # socket.sendfile refuses a count of 0
            self.connection.sendfile(f, f.tell(), length)

    def send_error_json(self, status: int, code: Optional[str], message: str, head: bool = False,
                        repo: Optional[Repo] = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message.encode("ascii", "replace").decode())
        if repo is not None:
            self.send_header("X-Repo-Commit", repo.commit)
        self.end_headers()
        if not head:
            self.wfile.write(body)


_BUSY = json.dumps({"error": "too many connections; retry after a second"}).encode()


def busy(connection: Any) -> None:
    """Answer a connection over the limit with ``503`` and ``Retry-After: 1``, without reading its request (what
    arrived is drained briefly, so that closing does not reset the connection before the answer is read)."""
    try:
        connection.settimeout(0.05)
        connection.sendall(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY), _BUSY))
        connection.shutdown(socket.SHUT_WR)
        while connection.recv(65536):
            pass
    except OSError:
        pass


def parse_range(value: str, size: int) -> Union[None, str, tuple[int, int]]:
    """One ``bytes=`` range -> (first, last) inclusive; None to ignore it (serve it all), or 'unsatisfiable'."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", value)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # several ranges or another unit: RFC 9110 lets a server ignore the header
    if max(len(m.group(1)), len(m.group(2))) > MAX_RANGE_DIGITS:
        return "unsatisfiable"  # no file has that many bytes (and int() of thousands of digits is refused)
    if not m.group(1):
        suffix = int(m.group(2))
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(m.group(1))
    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    if start >= size or start > end:
        return "unsatisfiable"
    return start, end


class HubServer(ThreadingHTTPServer):
    """The HTTP server of ``zoo serve``: loopback only; reads DIR afresh on every request.

    The standard library's threaded server, bounded: a connection idle for ``idle_timeout`` is closed, at most
    ``max_connections`` are served at once (each holds a thread), and one past that is answered
    ``503 Service Unavailable`` with ``Retry-After`` straight from the accepting thread, without a thread of its
    own. (A server library such as waitress bounds the same things, but adds a dependency, and its WSGI
    interface would lose the kernel ``sendfile`` that sends the weights.)"""

    daemon_threads = True
    request_queue_size = 512  # the listen backlog: a burst of clients waits to be accepted, not to retry SYNs

    def __init__(self, root: Union[str, Path], port: int = 0, *, handler: type[HubRequestHandler] = HubRequestHandler,
                 quiet: bool = False, host: str = HOST, idle_timeout: float = IDLE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS):
        root = Path(root)
        self.idle_timeout = idle_timeout
        if not isinstance(max_connections, int) or max_connections < 1:
            raise HubError(f"invalid --max-connections {max_connections!r}: it must be at least 1")
        if not 0 < idle_timeout < float("inf"):
            raise HubError(f"invalid --idle-timeout {idle_timeout!r}: it must be a positive number of seconds")
        self.slots = threading.BoundedSemaphore(max_connections)
        if not root.is_dir():
            raise HubError(f"cannot serve {root}: not a folder (publish variants into one with `zoo publish NAME --to DIR`)")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise HubError(f"invalid port {port!r}: use 0 (any free port) to 65535")
        self.root = root.resolve()
        self.quiet = quiet
        try:
            super().__init__((host, port), handler)
        except OSError as e:
            raise HubError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port (0 takes any free one)") from None

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in a thread of its own if a slot is free, else answer 503 at once."""
        if not self.slots.acquire(blocking=False):
            busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def repo(self, name: str) -> Optional[Repo]:
        return read_repo(self.root, name)

    def file_path(self, repo: Repo, filename: str) -> Optional[Path]:
        """The file to serve for ``filename`` of ``repo``, or None; never a path outside the root."""
        try:
            check_filename(filename, repo.repo_id)
            real = (repo.path / filename).resolve(strict=True)
        except (HubError, OSError, RuntimeError):
            return None
        if self.root not in real.parents or not real.is_file():
            return None
        return real

    def etag(self, repo: Repo, filename: str, path: Path) -> str:
        """The sha256 ``checksums.sha256`` records for ``filename`` (the sha256 of the bytes of
        ``checksums.sha256`` itself): no hashing of weights per request or per start. A file that no longer
        matches its record fails the client's verification, which checks the bytes against the record anyway."""
        return repo.files.get(filename) or sha256_file(path)


@contextmanager
def serve_background(root: Union[str, Path], port: int = 0, *, handler: type[HubRequestHandler] = HubRequestHandler,
                     quiet: bool = True, idle_timeout: float = IDLE_TIMEOUT,
                     max_connections: int = MAX_CONNECTIONS) -> Iterator[str]:
    """``with serve_background(DIR) as url:`` serves DIR on loopback in a thread until the block ends."""
    server = HubServer(root, port, handler=handler, quiet=quiet, idle_timeout=idle_timeout,
                       max_connections=max_connections)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name=f"zoo-hub {server.url}")
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def serve(root: Union[str, Path], port: int = 0, *, quiet: bool = False, idle_timeout: float = IDLE_TIMEOUT,
          max_connections: int = MAX_CONNECTIONS,
          announce: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
    """Serve DIR on 127.0.0.1 until interrupted (Ctrl-C); the first line announced carries the URL."""
    server = HubServer(root, port, quiet=quiet, idle_timeout=idle_timeout, max_connections=max_connections)
    repos = list_repos(server.root)
    listing = ", ".join(repos) if repos else "none yet; `zoo publish NAME --to DIR` adds them"
    announce(f"serving {server.root} at {server.url} (repositories: {listing}); "
             f"pull with `zoo pull NAME --endpoint {server.url}`; Ctrl-C stops")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
