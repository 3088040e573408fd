"""Every stage's manifest, where one stage's failure is that stage's alone.

Owns: one stage's manifest from a snapshot (`stage_manifest`), and computing a pipeline's
manifests in stage order, so that a stage whose manifest cannot
be made (an argument hfbuild cannot fingerprint, a missing data file) fails by itself, and the
stages that consume it fail with the same cause, while every other stage gets its manifest. The
result is a read-only mapping: looking up a failed stage raises its error.

Must never: hide a failure (a failed stage is never served, listed as built, or given a
fingerprint), or catch anything but a user error of the stage itself: bugs, and errors of the
repository every stage reads (an unreadable git index: `GitStateError`), still stop
everything with one message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from hfbuild.core.errors import GitStateError, HfbuildError, NotARepositoryError, StageError
from hfbuild.core.spec import StageSpec
from hfbuild.keys import shards
from hfbuild.keys.fingerprint import build_manifest, load_data
from hfbuild.keys.inputid import Identity, Lookup, identity
from hfbuild.keys.manifest import Manifest
from hfbuild.source import refs
from hfbuild.source.closure import Context
from hfbuild.source.datafiles import StatCache
from hfbuild.source.gitstate import Snapshot

if TYPE_CHECKING:
    from hfbuild.keys.absentdata import LockedData


class Manifests(Mapping[str, Manifest]):
    """Stage name -> manifest, in the pipeline's order. `failed` holds the stages that have
    none, with the error each raises when looked up."""

    def __init__(self, names: list[str], ok: dict[str, Manifest], failed: dict[str, HfbuildError]):
        self._names = names
        self.ok = ok
        self.failed = failed

    def __getitem__(self, name: str) -> Manifest:
        err = self.failed.get(name)
        if err is not None:
            raise err.with_traceback(None)
        return self.ok[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def error(self, name: str) -> HfbuildError | None:
        """Why the stage has no manifest, or None when it has one."""
        return self.failed.get(name)


def compute(
    specs: Iterable[StageSpec], one: Callable[[StageSpec, Mapping[str, Manifest]], Manifest]
) -> Manifests:
    """Each stage's manifest by `one(spec, manifests so far)`, in order; a stage whose input
    failed fails with the input's cause, without being computed."""
    names: list[str] = []
    ok: dict[str, Manifest] = {}
    failed: dict[str, HfbuildError] = {}
    cause: dict[str, tuple[str, HfbuildError]] = {}  # stage -> (first failed stage, its error)
    for spec in specs:
        names.append(spec.name)
        bad = next((i for i in spec.inputs if i in failed), None)
        if bad is not None:
            origin, err = cause[bad]
            cause[spec.name] = (origin, err)
            failed[spec.name] = StageError(
                f"stage {spec.name!r} cannot be fingerprinted because stage {origin!r}, which "
                f"it is built from, cannot: {err}"
            )
            continue
        try:
            ok[spec.name] = one(spec, ok)
        except (GitStateError, NotARepositoryError):
            raise  # the repository's, not the stage's: one message, not one per stage
        except HfbuildError as e:
            failed[spec.name] = e
            cause[spec.name] = (spec.name, e)
    return Manifests(names, ok, failed)


def input_ids(
    spec: StageSpec, done: Mapping[str, Manifest], lookup: Lookup
) -> dict[str, Identity | None]:
    """What the stage's key holds of each input (`inputid`): the identity its result's entry
    (or lock entry: `lookup`) under the input's current fingerprint records; None while the
    input is pending, or its result is not built (or does not list the input's shards)."""
    out: dict[str, Identity | None] = {}
    for name in spec.inputs:
        parent = done[name]
        ident = None if getattr(parent, "pending", ()) else identity(lookup(parent.fingerprint))
        listed = getattr(parent, "shards", None) is not None
        if (
            ident is not None
            and ident.form
            and listed
            and any(s.key not in ident.shards for s in parent.shard_list)
        ):
            ident = None  # a list that is not the manifest's: never keyed by it
        out[name] = ident
    return out


def stage_manifest(
    spec: StageSpec,
    snap: Snapshot,
    done: Mapping[str, Manifest],
    stat_cache: StatCache,
    absent: LockedData | None = None,
    *,
    lookup: Lookup,
) -> Manifest:
    """One stage's manifest from `snap`, given the manifests of the stages before it and
    `lookup`, an input's result by fingerprint (its store entry's manifest or lock entry,
    see `inputid`); an error is prefixed with the stage's name."""
    ctx = Context(snap)
    ids = input_ids(spec, done, lookup)
    pending = tuple(i for i in spec.inputs if ids[i] is None)
    inputs = shards.manifest_inputs(spec, done, ids)
    data = files = None
    pinned: tuple[Mapping[str, str], ...] = ()
    options: Mapping[str, Any] | None = spec.options
    if spec.kind == "load":
        data, files, pinned = load_data(spec.name, spec.options, ctx, stat_cache, absent)
        options = None
    try:
        manifest = build_manifest(
            kind=spec.kind,
            ctx=ctx,
            fn=refs.function(spec),
            fn_kwargs=spec.fn_kwargs,
            inputs=inputs,
            options=options,
            data=data,
            file_deps=spec.file_deps,
            stat_cache=stat_cache,
        )
        manifest = dataclasses.replace(manifest, data_files=files, pending=pending, hub=pinned)
        return shards.attach(spec, manifest, done, ids)
    except HfbuildError as e:
        if str(e).startswith(f"stage {spec.name!r}"):
            raise
        raise _prefixed(e, spec.name) from e


def _prefixed(e: HfbuildError, stage: str) -> HfbuildError:
    """The same error, its message prefixed with the stage it happened in."""
    new = HfbuildError.__new__(type(e))
    HfbuildError.__init__(new, f"stage {stage!r}: {e}")
    new.__dict__.update(e.__dict__)
    return new


def rekey(spec: StageSpec, m: Manifest, done: Mapping[str, Manifest], lookup: Lookup) -> Manifest:
    """`m` (computed from a snapshot) keyed again by its inputs' results as `lookup` has them
    now, without looking at the project again: only its `inputs` (and a sharded transform's
    shards) depend on them. What it read at run time is for the caller to resolve again."""
    ids = input_ids(spec, done, lookup)
    pending = tuple(i for i in spec.inputs if ids[i] is None)
    doc = {**m.doc, "inputs": shards.manifest_inputs(spec, done, ids)}
    bare = dataclasses.replace(m, doc=doc, pending=pending, shards=None, shard_code=None)
    return shards.attach(spec, dataclasses.replace(bare, observed=()), done, ids)


def rekey_pending(
    specs: Iterable[StageSpec],
    old: Manifests,
    lookup: Lookup,
    resolve: Callable[[StageSpec, Manifest], Manifest],
    again: Collection[str] = (),
) -> Manifests:
    """`old` with its pending stages, and the stages built from them, keyed again (`rekey`)
    by their inputs' results as `lookup` has them now, each then `resolve`d (what it read at
    run time, `fullkey.resolve`); the stages named in `again` `resolve`d again too (a build
    that read more than its key assumed published under another key); the others as they
    were."""
    ok: dict[str, Manifest] = {}
    moved: set[str] = set()
    for spec in specs:
        m = old.ok.get(spec.name)
        if m is None:
            continue
        if m.pending or any(i in moved for i in spec.inputs):
            m = resolve(spec, rekey(spec, m, ok, lookup))
            moved.add(spec.name)
        elif spec.name in again:
            now = resolve(spec, m)
            if now.fingerprint != m.fingerprint:
                m = now
                moved.add(spec.name)
        ok[spec.name] = m
    return Manifests(list(old), ok, old.failed)
