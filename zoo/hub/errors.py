"""What went wrong in a pull, said in one line: huggingface_hub's and urllib's errors as ``HubError``s."""
from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Optional, Protocol

from .protocol import HubError
from .transfer import TooSlowError, TruncatedError


class PullSite(Protocol):
    """What an explanation needs to know about the pull that failed."""

    name: str
    repo_id: str
    where: str
    cache: Path
    pinned: bool
    offline: bool


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)


def _status(e: BaseException) -> Optional[int]:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def explain(pull: PullSite, e: Exception, filename: str, revision: str) -> Optional[HubError]:
    """The ``HubError`` that says what ``e`` means for ``filename`` at ``revision``; None for an error this
    does not know (the caller re-raises it)."""
    from huggingface_hub import errors as hf

    what = f"{pull.repo_id}/{filename}"
    if isinstance(e, urllib.error.HTTPError):  # the zoo's transfer
        code = e.headers.get("X-Error-Code") if e.headers is not None else None
        if code == "RevisionNotFound" and pull.pinned:
            return HubError(f"{pull.repo_id} at {pull.where} has no commit {revision}, which the zoo's index pins: "
                            "that hub serves other files than the index records; pass the index that goes with "
                            "its files (index=FILE / --index FILE)")
        if code == "RevisionNotFound":
            return HubError(f"revision {revision!r} of {pull.repo_id} not found at {pull.where} (HTTP {e.code}); "
                            "that hub serves 'main' and its current commit")
        if code == "RepoNotFound":
            return HubError(f"{pull.repo_id} not found at {pull.where} (HTTP {e.code}): that hub has no such "
                            f"repository; check the name, or publish it there with `zoo publish {pull.name} --to DIR`")
        if e.code == 404 and code in (None, "EntryNotFound"):
            return HubError(f"file {filename!r} of {pull.repo_id} (revision {revision}) not found at {pull.where} (HTTP 404)")
        return HubError(f"the hub at {pull.where} answered HTTP {e.code} for {what}: {first_line(e)}")
    if isinstance(e, urllib.error.URLError):
        reason = first_line(e.reason) if isinstance(e.reason, BaseException) else str(e.reason)
        return HubError(f"cannot reach the hub at {pull.where} ({reason}) and {what} is not cached; check "
                        "--endpoint / ZOO_ENDPOINT (`zoo serve DIR` starts a hub), or unset both to use the embedded hub")
    if isinstance(e, TooSlowError):
        return HubError(f"downloading {what} from {pull.where} was too slow: {e}")
    if isinstance(e, TruncatedError):
        return HubError(f"downloading {what} from {pull.where} broke off: {e}; run the pull again")
    if isinstance(e, hf.HFValidationError):
        return HubError(f"{pull.repo_id} cannot be a hub repository id: {first_line(e)}")
    if isinstance(e, hf.RevisionNotFoundError):
        return HubError(f"revision {revision!r} of {pull.repo_id} not found at {pull.where} (HTTP 404); "
                        "that hub serves 'main' and its current commit")
    if isinstance(e, hf.RepositoryNotFoundError):  # includes gated repos (401/403)
        return HubError(f"{pull.repo_id} not found at {pull.where} (HTTP {_status(e) or 404}): that hub has no "
                        f"such repository; check the name, or publish it there with `zoo publish {pull.name} --to DIR`")
    if isinstance(e, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        if pull.offline:
            return HubError(f"{what} is not in the cache {pull.cache} and offline mode is on (HF_HUB_OFFLINE=1); "
                            "pull it once with offline mode off (the embedded hub needs no internet)")
        cause = e.__cause__ or e.__context__
        status = _status(cause) if cause is not None else None
        if status is not None:
            return HubError(f"the hub at {pull.where} answered HTTP {status} for {what} and no copy is cached; "
                            "try again later, or check the server's log")
        if isinstance(cause, hf.FileMetadataError):
            return HubError(f"{pull.where} does not answer like an HF hub for {what}: {first_line(cause)}")
        reason = first_line(cause) if cause is not None else "no connection"
        return HubError(f"cannot reach the hub at {pull.where} ({reason}) and {what} is not cached; check "
                        "--endpoint / ZOO_ENDPOINT (`zoo serve DIR` starts a hub), or unset both to use the embedded hub")
    if isinstance(e, hf.EntryNotFoundError):  # remote: the repository exists, the file does not
        return HubError(f"file {filename!r} of {pull.repo_id} (revision {revision}) not found at {pull.where} (HTTP 404)")
    if isinstance(e, hf.HfHubHTTPError):
        return HubError(f"the hub at {pull.where} answered HTTP {_status(e)} for {what}: {first_line(e)}")
    if isinstance(e, OSError):  # consistency check, disk full, permissions
        return HubError(f"downloading {what} from {pull.where} failed: {first_line(e)}; run the pull again "
                        "(files already complete stay cached)")
    module = type(e).__module__.split(".")[0]
    if module in ("httpx", "httpx2", "requests", "urllib3", "http"):  # the transfer broke beyond the client's retries
        return HubError(f"downloading {what} from {pull.where} failed: {type(e).__name__}: {first_line(e)}; "
                        "run the pull again")
    return None

