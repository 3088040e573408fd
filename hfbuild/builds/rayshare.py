"""What the Ray executor's driver shares with the cluster through the remote cache.

Owns: the remote a Ray build needs (`remote_of`: a `ConfigError` saying how to set one, or
that HFBUILD_NO_REMOTE turns it off); every input of the units about to travel put on the
remote before a worker reads it, a few at a time, the remote's copy adopted first where it
holds another (`ensure_inputs`: first writer wins, so a worker's input is the published one);
a sharded stage's list pushed once its shards are there (`share`). A failure of the remote's
own (unreachable) is raised as is; any other as a `BuildError` saying what to do.

Must never: import ray, build anything, or push an entry that is not complete in the local
store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hfbuild.builds import raypacks
from hfbuild.core import threads
from hfbuild.core.errors import BuildError, ConfigError, StoreError

if TYPE_CHECKING:
    from hfbuild.builds.units import Unit
    from hfbuild.keys.place import Place
    from hfbuild.store.remote import Remote


def remote_of(place: Place, label: str) -> Remote:
    """The remote a Ray build of stage `label` reads its inputs from and publishes to."""
    from hfbuild.store.remotereach import remote_disabled

    remote = place.remote()
    if remote is None and remote_disabled():
        raise ConfigError(
            f"stage {label!r}: the Ray executor needs the remote cache, where workers read "
            f"their inputs and publish their results, and HFBUILD_NO_REMOTE=1 turns it off: "
            f"unset HFBUILD_NO_REMOTE, or build with the local executor (--executor local, "
            f"or unset HFBUILD_EXECUTOR)."
        )
    if remote is None:
        raise ConfigError(
            f"stage {label!r}: the Ray executor needs a remote cache, where workers read "
            f"their inputs and publish their results: set HFBUILD_REMOTE or [tool.hfbuild] "
            f"remote (an fsspec URL every node can reach, e.g. s3://bucket/hfbuild)."
        )
    return remote


def ensure_inputs(place: Place, remote: Remote, units: Sequence[Unit]) -> None:
    """Every input of `units` on the remote (`_ensure_remote`), a few at a time: a stage's
    shard units each have their own input shard (or the pack its input's list keeps it in,
    `raypacks.input_entry`)."""
    wanted = {
        raypacks.input_entry(place, u, fp): name
        for u in units
        for name, fp in zip(u.spec.inputs, u.input_keys, strict=True)
    }
    for got in threads.each(
        lambda item: _ensure_remote(place, remote, item[1], item[0]), wanted.items()
    ):
        if isinstance(got, Exception):
            raise got


def _ensure_remote(place: Place, remote: Remote, name: str, fp: str) -> None:
    """An input built or pulled here must be on the remote before a worker reads it; one the
    remote holds another copy of is adopted first (the workers read the remote's)."""
    from hfbuild.store.remotereach import RemoteError, RemoteUnreachableError

    try:
        remote.adopt(place.store, fp, name)
        remote.push(place.store, fp, name)
    except RemoteUnreachableError:
        raise  # the remote, not the stage: no failed build is recorded
    except (RemoteError, StoreError) as e:
        raise BuildError(f"input {name!r} cannot be shared with the cluster: {e}") from e


def share(place: Place, remote: Remote, name: str, fp: str) -> None:
    """Push a sharded stage's list (its shards are there): other clones then pull it whole."""
    from hfbuild.store.remotereach import RemoteError, RemoteUnreachableError

    try:
        remote.push(place.store, fp, name)
    except RemoteUnreachableError:
        raise
    except (RemoteError, StoreError) as e:
        raise BuildError(
            f"stage {name!r}: its shards were built on the cluster, but its entry cannot be "
            f"pushed to {remote.url}: {e}. Build again to push it."
        ) from e
