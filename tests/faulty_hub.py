"""A hub that misbehaves on purpose: `zoo serve`'s handler with faults injected into its file downloads.

``with faulty_hub(DIR, Fault("corrupt", "model.safetensors"), ...) as hub:`` serves DIR like
``serve_background`` at ``hub.url`` and applies each fault to the next request(s) for its file (``times`` of
them; after that the file is served right), so a test can say "served once broken, then healthy". Kinds:

- ``drop``: the connection closes before any answer.
- ``truncate``: the answer's headers are right, the body stops after ``arg`` bytes (default: half).
- ``corrupt``: one byte in the middle of the body is flipped (the headers, ETag included, are right).
- ``replace``: the body is ``arg`` (bytes) instead, with the file's own ETag and commit (``own_etag``: with the
  sha256 of ``arg`` as ETag, as a hub whose file really holds those bytes).
- ``trickle``: one byte every ``arg`` seconds (default 0.05): never silent, never done.
- ``html``: ``200 text/html``, a captive portal's page, without the hub's headers.
- ``redirect``: ``302`` to the same path at ``arg`` (another server's URL).
- ``unavailable``: ``503`` with ``Retry-After: arg`` (default 1).

Faults hit GETs; ``head=True`` makes one hit HEADs instead (as huggingface_hub's metadata request), ``None``
both. ``hub.hits`` records (kind, file) of each fault injected; ``hub.faults`` may be added to while it serves.
Each hub has faults of its own, so two of them can play a hub and the host it redirects to.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional

from zoo.hub.server import HubRequestHandler, serve_background

HTML = b"<!DOCTYPE html><html><head><title>Sign in to the network</title></head><body>Accept the terms.</body></html>"


@dataclass
class Fault:
    kind: str
    file: str
    times: int = 1
    arg: Any = None
    head: Optional[bool] = False
    own_etag: bool = False


class FaultyHandler(HubRequestHandler):
    """zoo serve's handler; ``faults`` (a subclass's own, made by ``faulty_hub``) decides which requests go wrong."""

    faults: list[Fault] = []
    hits: list[tuple[str, str]] = []
    lock = threading.Lock()
    fault: Optional[Fault] = None

    def take(self, filename: str, head: bool) -> Optional[Fault]:
        with self.lock:
            for fault in self.faults:
                if fault.file == filename and fault.head in (head, None) and fault.times > 0:
                    fault.times -= 1
                    self.hits.append((fault.kind, filename))
                    return fault
        return None

    def _resolve(self, namespace: str, name: str, revision: str, filename: str, head: bool) -> None:
        self.fault = fault = self.take(filename, head)
        kind = fault.kind if fault else None
        if kind == "drop":
            self.close_connection = True
            return
        if kind in ("html", "redirect", "unavailable"):
            status, headers, body = {
                "html": (200, {"Content-Type": "text/html; charset=utf-8"}, HTML),
                "redirect": (302, {"Location": f"{fault.arg}{self.path}"}, b""),
                "unavailable": (503, {"Retry-After": str(fault.arg if fault.arg is not None else 1)}, b"busy"),
            }[kind]
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)
            return
        super()._resolve(namespace, name, revision, filename, head)

    def send_header(self, keyword: str, value: str) -> None:
        if self.fault is not None and self.fault.kind == "replace":
            if keyword == "Content-Length":
                value = str(len(self.fault.arg))
            elif keyword == "ETag" and self.fault.own_etag:
                value = f'"{hashlib.sha256(self.fault.arg).hexdigest()}"'
        super().send_header(keyword, value)

    def send_body(self, f: BinaryIO, length: int, filename: str) -> None:
        kind = self.fault.kind if self.fault else None
        if kind is None:
            return super().send_body(f, length, filename)
        if kind == "replace":
            self.wfile.write(self.fault.arg)
        elif kind == "truncate":
            self.wfile.write(f.read(self.fault.arg if self.fault.arg is not None else length // 2))
        elif kind == "corrupt":
            body = bytearray(f.read(length))
            body[len(body) // 2] ^= 0xFF
            self.wfile.write(body)
        elif kind == "trickle":
            for _ in range(length):
                self.wfile.write(f.read(1))
                self.wfile.flush()
                time.sleep(self.fault.arg if self.fault.arg is not None else 0.05)
        else:
            raise ValueError(f"unknown fault {kind!r}")
        self.wfile.flush()


@dataclass
class FaultyHub:
    url: str
    faults: list[Fault]
    hits: list[tuple[str, str]]


@contextmanager
def faulty_hub(root: Path, *faults: Fault, **kwargs: Any) -> Iterator[FaultyHub]:
    """Serve ``root`` with ``faults`` injected, in a thread, until the block ends."""
    handler = type("Faulty", (FaultyHandler,), {"faults": list(faults), "hits": [], "lock": threading.Lock()})
    with serve_background(root, handler=handler, **kwargs) as url:
        yield FaultyHub(url, handler.faults, handler.hits)
