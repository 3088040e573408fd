"""A sharded stage as units of work: one per shard the stores lack, then the stage's list.

On an executor that builds elsewhere (Ray), a sharded stage is not one unit. The driver works
out which of the stage's shards neither its store nor the remote holds (pulling those the
remote has), makes one `Unit` per missing shard (its key, its input shard, and for
`with_indices` the rows of the input shards before it, read from their manifests here), has
the executor build them together (`Executor.build_all`), and last publishes the stage's
entry with `shardbuild.build`, which then finds every shard in the store and writes the list,
stage fingerprint and content hash a local build writes.

What a build reads at run time is part of every shard's key (`manifest.code_key`). A shard
whose build read files its assumed key does not hold is published under the key with them
(`build_one`), and the driver finds which recorded set that key was made with; the stage's
set becomes the union, and the shards published under a smaller set are built again in a
second pass, as `shardbuild.build` does in one process.

A shard the executor built as a row range of a pack (a Ray task's, `packbuild.of_entries`)
is found by the facts its report gives (`Report.entry`: what the list records of it), which
`shardbuild.build` lists as it lists a shard of a load's pack.

Owns: splitting a sharded stage into shard units and the passes over them; building one
shard unit in a store (`build_one`: the local executor's, and a Ray worker's after it has
recomputed the key), publishing it under the key of what it read.

Must never: publish a shard under a key whose observed files it was not built with, publish
the stage's list before every shard it names is in the local store, or build a shard
anywhere but on the executor it was given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hfbuild.builds import packbuild, shardbuild, shardone
from hfbuild.builds.units import Executor, Unit
from hfbuild.core import threads
from hfbuild.core.errors import BuildError, RemoteWarning
from hfbuild.core.spec import Report
from hfbuild.keys.fullkey import identify, observing
from hfbuild.keys.manifest import Manifest, Observed, Shard, code_key, shard_key

if TYPE_CHECKING:
    from hfbuild.core.spec import StageSpec
    from hfbuild.keys.place import Place


def build(place: Place, executor: Executor, unit: Unit) -> Report:
    """Build the sharded stage `unit` describes, one unit per missing shard on `executor`,
    then publish its entry in `place.store`. The caller holds the lock of its static
    fingerprint."""
    spec, m = unit.spec, unit.manifest
    assert m.shards is not None and unit.shard is None
    t0 = time.perf_counter()
    if spec.kind == "load":  # its tasks carry the features datasets decides: import it now
        threads.import_meanwhile("hfbuild.builds.builder")  # while the remote is asked
    observed = m.observed
    packed: dict[str, dict[str, Any]] = {}  # shards built as row ranges of packs: their facts
    while True:
        cur = dataclasses.replace(m, observed=observed)
        todo = [s for s in missing(place, cur, spec.name) if s.key not in packed]
        if not todo:
            break
        via = _input_list(spec, unit)
        if via is not None and spec.kind == "filter":
            # A filter's shard selects rows of its input shard, its base, which must then
            # be an entry of its own wherever it is held; a map's worker reads its input
            # shard from its pack (`raytree.input_pack`).
            packbuild.unpack(place, via, [s.input for s in todo])
        offsets = row_offsets(place, spec, cur, via)
        units = [Unit(spec, cur, unit.inputs, s, offsets.get(s.key, 0)) for s in todo]
        reports = executor.build_all(place, units, spec.name)
        packed.update({r.fingerprint: dict(r.entry or {}) for r in reports if _is_packed(r)})
        grown = _grown(place, cur, units, reports)
        if grown == observed:
            break
        observed = grown  # the shards published under the smaller set are built again
    final = dataclasses.replace(m, observed=observed)
    last = place.store.get_ref(spec.name)  # a shard of a pack is found by its row there
    absent = [
        s.label
        for s in final.shard_list
        if s.key not in packed and not place.store.has_shard(s.key, last)
    ]
    if absent:
        raise BuildError(
            f"stage {spec.name!r}: {len(absent)} shard(s) ({', '.join(absent[:3])}) were "
            f"built but are not in the store (a concurrent `hfbuild gc`?); build it again."
        )
    # It finds every shard (a packed one by the facts its report gave): the list.
    report, _ = shardbuild.build(place, spec, final, unit.inputs, packed)
    took = time.perf_counter() - t0
    return Report(spec.name, report.fingerprint, "built", report.rows, took, entry=report.entry)


def _is_packed(r: Report) -> bool:
    """Whether a shard unit's report says the shard was built as a row range of a pack
    (its `entry`: what the stage's list records of it, `packbuild.packed`)."""
    return r.entry is not None and "pack" in r.entry


def missing(place: Place, m: Manifest, label: str) -> list[Shard]:
    """The shards of `m` that neither the store nor the remote holds, in order; those the
    remote holds are pulled, a few at a time (`threads.each`; a remote entry failing its
    checks is reported, in order, and built). For many shards, the remote's directories
    they fall in are listed first (`RemoteFiles.holding`), and only those it has something
    for are asked for."""
    from hfbuild.store.remotereach import RemoteError, unavailable

    store = place.store
    remote = place.remote()
    last = store.get_ref(label)  # the stage's last list: where a shard of a pack is found
    absent = [s for s in m.shard_list if not store.has_shard(s.key, last)]
    if remote is None or not absent:
        return absent
    try:  # many shards: those the remote has nothing for are known by a few listings
        there = remote.holding([s.key for s in absent])
    except (RemoteError, OSError):
        there = None  # each is asked for below, and what fails is reported there
    asked = absent if there is None else [s for s in absent if s.key in there]
    pulled = threads.each(lambda s: remote.pull(store, s.key, f"{label} {s.label}"), asked)
    for got in pulled:
        if isinstance(got, RemoteError):
            message = unavailable(got, f"stage {label!r}", ray=True)
            if message is not None:
                warnings.warn(message, RemoteWarning, stacklevel=3)
        elif isinstance(got, Exception):
            raise got
    return [s for s in absent if not store.has(s.key)]


def _input_list(spec: StageSpec, unit: Unit) -> str | None:
    """A sharded transform's input list (None for a load)."""
    if spec.kind == "load" or not spec.inputs:
        return None
    return unit.inputs[spec.inputs[0]].fingerprint


def row_offsets(
    place: Place, spec: StageSpec, m: Manifest, via: str | None = None
) -> dict[str, int]:
    """For a `with_indices` transform: each shard's key -> the rows of the input shards
    before it in its split (as the input's list `via` records them, else their manifests,
    in this store: the input was built or pulled here). {} for any other stage."""
    if spec.kind == "load" or not spec.options.get("with_indices"):
        return {}
    out: dict[str, int] = {}
    rows: dict[str, int] = {}
    for s in m.shard_list:
        out[s.key] = rows.get(s.split, 0)
        row = place.store.listed_row(via, s.input) if via is not None else None
        doc = row[4] if row is not None else place.store.read_manifest(s.input)
        if doc is None:
            raise BuildError(
                f"stage {spec.name!r}: its input shard {s.label} ({s.input}) is not in the "
                f"store; build its input stage again."
            )
        rows[s.split] = out[s.key] + int(doc.get("rows") or 0)
    return out


def _grown(place: Place, m: Manifest, units: Sequence[Unit], reports: Sequence[Report]) -> Observed:
    """`m`'s observed files, plus those of the shards published under another key than their
    unit's: each such key is matched to the recorded set (`observed/` in the store, added
    by the executor) it was made with."""
    from hfbuild.source.gitstate import Snapshot

    out = set(m.observed)
    odd = [(u, r) for u, r in zip(units, reports, strict=True) if r.fingerprint != u.key]
    if not odd:
        return m.observed
    snap = Snapshot(place.root)
    sets = [
        identify(p, snap, place.stat_cache) for p in place.store.read_observed(m.static_fingerprint)
    ]
    for u, r in odd:
        assert u.shard is not None
        found = next((o for o in sets if key_with(m, u.shard, o) == r.fingerprint), None)
        if found is None:
            raise BuildError(
                f"stage {u.spec.name!r}: shard {u.shard.label} was published under "
                f"{r.fingerprint}, a key no recorded set of run-time reads gives (a file it "
                f"read changed during the build?); build it again."
            )
        out |= set(found)
    return tuple(sorted(out))


def key_with(m: Manifest, s: Shard, observed: Observed) -> str:
    """The key of shard `s` of `m` had its builds read `observed`."""
    return shard_key(code_key(dataclasses.replace(m, observed=observed)), s.keyed_input, s.before)


# -- one shard unit -----------------------------------------------------------------------------


def build_shard_here(place: Place, unit: Unit) -> Report:
    """The local executor's build of one shard unit, into `place.store` (the caller holds the
    lock of the stage's static fingerprint). A shard that read more than its key assumed
    records that set, as a whole-stage build does."""
    assert unit.shard is not None
    t0 = time.perf_counter()
    m = unit.manifest
    key, rows, observed = build_one(place, unit.spec, m, unit.shard, unit.offset)
    if key != unit.key:
        place.store.add_observed(m.static_fingerprint, [p for p, _ in observed])
    return Report(unit.spec.name, key, "built", rows, time.perf_counter() - t0)


def build_one(
    place: Place,
    spec: StageSpec,
    m: Manifest,
    s: Shard,
    offset: int,
    listed: list[Any] | None = None,
) -> tuple[str, Any, Observed]:
    """Build shard `s` of `m` in `place.store` with a sharded build's own code
    (`shardone.build_one`), `offset` being the rows of the input shards before it, and
    publish it under the key of what it read at run time: `m`'s observed files, plus any
    other its build read (then another key than `s.key`). (key, rows, observed files).
    `listed`: a transform shard's input shard's row as a list records it, read from there
    (a Ray worker's input shard in a pack, `raypacks.take_packed`)."""
    from hfbuild.builds import builder

    store = place.store
    if spec.options.get("num_proc") and not spec.options.get("with_rank"):
        # One shard per unit, as in a sharded build's own processes: datasets' workers would
        # only cut it smaller (the output is the same; with_rank keeps its processes).
        opts = {k: v for k, v in spec.options.items() if k != "num_proc"}
        spec = dataclasses.replace(spec, options=opts)
    run = builder.offset_indices(spec, offset)
    at = s if spec.kind == "load" else s._replace(pos=0)  # its offset is in `run`
    with store.lock(s.key):
        done: Mapping[str, Any] | None = store.intact_manifest(s.key)
        if done is not None:  # a retried task whose first attempt built it, or a racing one
            return s.key, done.get("rows"), m.observed
        tmp = store.new_build_dir(s.key)
        try:
            with observing(place, tmp) as seen:
                path, doc = shardone.build_one(place, run, m, at, tmp, listed)
                now = seen.identify(m)
            observed = tuple(sorted(set(now) | set(m.observed)))
            key = s.key if observed == m.observed else key_with(m, s, observed)
            path, doc = shardone.keyed_as(store, path, doc, s.key, key, tmp)  # built as s.key
            with contextlib.nullcontext() if key == s.key else store.lock(key):
                if not store.has(key):
                    store.publish(path, key, doc, durable=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return key, doc["rows"], observed
