"""The remote's errors, its settings, and what an unreachable remote means for a build.

Owns: the `RemoteError` family (`RefusedEntryError`: one entry fails its checks;
`RemoteUnreachableError`: the remote cannot be used at all; `RemoteMissingError`: a `file://`
remote's directory is absent), which remote a project uses (`remote_url`) and the switches
HFBUILD_NO_REMOTE and HFBUILD_REMOTE_REQUIRED; an unreachable remote or missing credentials,
recognised by the exception's class names (botocore is not imported), as one
`RemoteUnreachableError` saying what to check or set, remembered per URL for a minute
(`reaching`: each attempt costs the client's retries); `unavailable`: what a build that could
not pull says, and when it stops instead (HFBUILD_REMOTE_REQUIRED=1, the Ray executor); a URL
as printed, without credentials (`public_url`).

Must never: touch the remote's files, read credentials itself, print.
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from hfbuild.core import config
from hfbuild.core.errors import HfbuildError


class RemoteError(HfbuildError):
    """The remote cannot be used, or one of its entries fails its checks."""


class RefusedEntryError(RemoteError):
    """One entry of the remote fails its checks (its manifest, its files, its content, or
    what the committed lock records for its key): it is not used, and nothing of it is
    published in the store."""


class RemoteUnreachableError(RemoteError):
    """The remote cannot be used at all: it cannot be reached (network, endpoint), or no
    credentials for it were found. Every entry is unavailable rather than refused; `again`
    is True when this process already met the same failure (reported once)."""

    def __init__(self, message: str, *, again: bool = False) -> None:
        super().__init__(message)
        self.again = again


class RemoteMissingError(RemoteError):
    """A `file://` remote whose directory does not exist (a wrong path, or an unmounted
    share): an error, not "the remote does not hold it"."""


def remote_url(root: str, explicit: str | None = None) -> str | None:
    """The remote: `explicit`, else $HFBUILD_REMOTE, else `[tool.hfbuild] remote` in the
    project's pyproject.toml; None when none is configured."""
    if explicit:
        return explicit
    env = os.environ.get("HFBUILD_REMOTE")
    if env:
        return env
    url = config.tool(root).get("remote")
    return str(url) if url else None


def remote_disabled() -> bool:
    """HFBUILD_NO_REMOTE=1: every build of this process works without the remote."""
    return os.environ.get("HFBUILD_NO_REMOTE", "").strip().lower() in {"1", "true", "yes"}


def remote_required() -> bool:
    """HFBUILD_REMOTE_REQUIRED=1: a build stops when the remote is unreachable, instead of
    building locally (what a CI job that must not rebuild what it should pull sets)."""
    return os.environ.get("HFBUILD_REMOTE_REQUIRED", "").strip().lower() in {"1", "true", "yes"}


# A remote found unreachable is not asked again for this long (each attempt costs the
# client's retries: ~10 s for s3fs), so a build of many stages reports it once.
_DOWN_SECONDS = 60.0
_down: dict[str, tuple[float, str]] = {}  # url -> (when, message)

# What fsspec backends raise that says "the remote cannot be used at all", by class name in
# the exception's class hierarchy (botocore's classes, for s3fs, are not imported here).
_CONNECTION = {"ConnectionError", "HTTPClientError", "ClientConnectorError", "TimeoutError"}
_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


def _unusable(url: str, e: BaseException) -> RemoteUnreachableError | None:
    """The one-line error for an exception saying the remote cannot be reached or has no
    credentials; None for any other exception."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & _CREDENTIALS:
        return RemoteUnreachableError(
            f"the remote {public_url(url)} needs credentials, and none were found "
            f"({type(e).__name__}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            f"AWS_PROFILE), or fsspec's own configuration (FSSPEC_S3_KEY and "
            f"FSSPEC_S3_SECRET), in the environment of every process that uses it; on a Ray "
            f"cluster, in the environment `ray start` ran in on each node."
        )
    if names & _CONNECTION:
        return RemoteUnreachableError(
            f"cannot reach the remote {public_url(url)} ({type(e).__name__}: {e}): check the "
            f"network and its endpoint (FSSPEC_S3_ENDPOINT_URL or AWS_ENDPOINT_URL for an "
            f"S3-compatible server), or work without it (HFBUILD_NO_REMOTE=1)."
        )
    return None


def unavailable(e: RemoteError, label: str, *, ray: bool = False) -> str | None:
    """What a build that could not pull `label` because of `e` warns before building it
    here; None when nothing new is to be said (an unreachable remote is reported once per
    process). An unreachable remote raises instead with HFBUILD_REMOTE_REQUIRED=1, or on the
    Ray executor (`ray`), whose workers have no other way to share their inputs."""
    if not isinstance(e, RemoteUnreachableError):
        return f"{label}: {e} Building it instead."
    if ray:
        raise RemoteUnreachableError(
            f"{e} The Ray executor's workers read their inputs from it and publish their "
            f"results to it: build with the local executor (--executor local, or unset "
            f"HFBUILD_EXECUTOR) until it is back."
        ) from e
    if remote_required():
        raise RemoteUnreachableError(
            f"{e} HFBUILD_REMOTE_REQUIRED=1 is set, so {label} is not built here."
        ) from e
    if e.again:
        return None
    return f"{e} Building here instead (HFBUILD_REMOTE_REQUIRED=1 stops instead)."


_F = TypeVar("_F", bound=Callable[..., Any])


def reaching(method: _F) -> _F:
    """A method of a remote (`self.url`) whose unreachable remote or missing credentials raise
    `RemoteUnreachableError`, and are remembered for the process a while (`_DOWN_SECONDS`)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen = _down.get(self.url)
        if seen is not None and time.monotonic() - seen[0] < _DOWN_SECONDS:
            raise RemoteUnreachableError(seen[1], again=True)
        try:
            return method(self, *args, **kwargs)
        except HfbuildError:
            raise
        except Exception as e:
            err = _unusable(self.url, e)
            if err is None:
                raise
            _down[self.url] = (time.monotonic(), str(err))
            raise err from e

    return cast(_F, wrapper)


def public_url(url: str) -> str:
    """`url` without credentials in it (`scheme://user:secret@host/...`)."""
    return re.sub(r"^([A-Za-z0-9+.-]+://)[^/@]*@", r"\1", url)
