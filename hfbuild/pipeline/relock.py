"""Rewriting hfbuild.lock from the current code and the store, building nothing.

Owns: every stage's lock entry for its current fingerprint, taken from the store's result
when the store holds it, else from a recorded entry with exactly that fingerprint (in the lock
or, when the lock has merge conflict markers, on either side of the conflict: a fingerprint
is a digest of the manifest, so such an entry was built from this very code and data,
elsewhere). Stages with neither are left out and reported. Used by `hfbuild lock`, and by a
build that finds the lock conflicted (`resolve_conflict`, which warns that it rewrote it).

It receives the pipeline's `Place` and its manifests, never the pipeline.

Must never: build, pull from a remote, keep an entry whose fingerprint is not the current one,
or import datasets.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from hfbuild.core.errors import LockRewrittenWarning
from hfbuild.store import lockfile

if TYPE_CHECKING:
    from hfbuild.keys.manifests import Manifests
    from hfbuild.keys.place import Place


class ManifestsOf(Protocol):
    """The pipeline's manifests (memoized), or with `lock`'s stages as inputs' results first
    (computed afresh): `Pipeline.manifests`."""

    def __call__(self, *, lock: Mapping[str, Any] | None = None) -> Manifests: ...


class Relock(NamedTuple):
    stages: dict[str, dict[str, Any]]  # the entries to write
    source: dict[str, str]  # stage -> "store" | "lock"
    missing: list[str]  # stages with no result and no matching recorded entry


def current_entries(place: Place, manifests_of: ManifestsOf) -> Relock:
    """Each stage's entry for its current fingerprint, from the store or a matching record."""
    recorded = lockfile.candidates(place.lock_path)
    # A stage's key holds its inputs' results (inputid.py): those the store lacks are taken
    # from the recorded entries of exactly the input's key, as the stages' own entries are.
    either = {f"{n} {k}": v for n, r in enumerate(recorded) for k, v in r.items()}
    manifests = manifests_of(lock=either)
    stages: dict[str, dict[str, Any]] = {}
    source: dict[str, str] = {}
    missing: list[str] = []
    for spec in place.stages.values():
        m = manifests[spec.name]
        fp = m.fingerprint
        inputs = {i: manifests[i].fingerprint for i in spec.inputs}
        stored = place.store.read_manifest(fp) if place.store.has(fp) else None
        if stored is not None:
            source[spec.name] = "store"
        else:
            stored = next(
                (
                    r[spec.name]
                    for r in recorded
                    if isinstance(r.get(spec.name), dict) and r[spec.name].get("fingerprint") == fp
                ),
                None,
            )
            if stored is None:
                missing.append(spec.name)
                continue
            source[spec.name] = "lock"
        stages[spec.name] = lockfile.entry(
            m.doc, fp, inputs, stored, [f.path for f in m.dirty], m.hub
        )
    return Relock(stages, source, missing)


def _lock_dir(place: Place) -> str:
    return os.path.join(place.store.root, "locks")


def relock(place: Place, manifests_of: ManifestsOf) -> tuple[Relock, bool]:
    """Rewrite the lock with exactly the current entries; returns them and whether the file
    changed."""
    r = current_entries(place, manifests_of)
    return r, lockfile.replace(place.lock_path, _lock_dir(place), r.stages)


def resolve_conflict(place: Place, manifests_of: ManifestsOf) -> None:
    """A build found the lock with merge conflict markers: rewrite it as `hfbuild lock` does
    (the stages this build makes are added as they are recorded), and say so."""
    r = current_entries(place, manifests_of)
    if not lockfile.replace(place.lock_path, _lock_dir(place), r.stages, only_if_conflicted=True):
        return  # a concurrent build resolved it first
    later = f"; {', '.join(r.missing)} will be added when built" if r.missing else ""
    warnings.warn(
        f"{place.lock_name} had merge conflict markers: rewrote it from the current code, the "
        f"store's results and the entries of either side that still match ({len(r.stages)} "
        f"of {len(place.stages)} stages{later}). Review it with "
        f"`git diff {place.lock_name}`, then `git add {place.lock_name}`.",
        LockRewrittenWarning,
        stacklevel=3,
    )
