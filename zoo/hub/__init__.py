"""The hub: HF-Hub-style repositories of published variants, moved as files, verified by digest.

- ``client.pull(NAME)``: a variant into the standard HF cache, verified (zoo/hub/client.py).
- ``repository.write_repo``: a repository folder written whole and swapped in; ``zoo.publish`` fills it.
- ``server.serve(DIR)``: such folders on loopback with the HF Hub resolve protocol (``zoo serve``).
- ``index``: the zoo index of digests and pinned commits, and the embedded hub shipped with the package.

The hub only moves and checks files: it never builds a model (``zoo.build(name, pretrained=True)`` is
``pull`` then ``zoo.load``, in zoo/api.py).
"""
from .client import hub_cache_dir, is_offline, pull
from .index import INDEX_NAME, embedded_hub, load_index
from .protocol import CHECKSUMS, NAMESPACE, HubError
from .repository import write_repo
from .server import HubServer, serve, serve_background
from .transfer import ChecksumError, file_digest

__all__ = ["CHECKSUMS", "INDEX_NAME", "NAMESPACE", "ChecksumError", "HubError", "HubServer", "embedded_hub",
           "file_digest", "hub_cache_dir", "is_offline", "load_index", "pull", "serve", "serve_background",
           "write_repo"]
