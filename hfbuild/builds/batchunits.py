"""Batch-aligned units: a batched map or filter over a sharded input, built a unit at a time.

A batched stage's output depends on which rows share a batch, and `datasets` cuts batches at
the global offsets 0, `batch_size`, 2 * `batch_size`, ... of each split. Its key is the whole
stage's (its input's key in it, as for any unsharded stage); its *build* reuses pieces. A
unit is the batches that start in one input shard, at those global offsets: it reads its
batches' rows, into the shards after it when its last batch straddles them (to the end of
the split for the last batch). Its key is the digest of the stage's code key (its manifest
without its input, with the files its builds read at run time), the split, the keys of the
input shards it reads in order, where its rows start in the first of them and end in the
last, and, for `with_indices`, its first row's index in the split. Each missing unit is one
`map`/`filter` over exactly its rows (starting at a batch boundary, so its batches are the
whole split's); the units are stored as shard entries and the stage's entry lists them, as
a sharded stage's lists its shards. Appending a file then builds the last old unit (its last
batch now reads into the new file) and the units starting in the new file.

What the units' concatenation cannot be shown to equal is built whole instead, as before:
`batch_size` None or <= 0 (one batch), `num_proc` > 1 (datasets batches within each of
`num_proc` parts), `with_rank`, an input that is not sharded or a split of no rows, a
function that changed what it keeps between calls while the units ran, and a map whose units
came out with other features (datasets' map over the whole split casts every batch to the
first batch's types).

Owns: which batched stages are built by units, the units of a split, their keys, building
the missing ones and the stage's entry listing them.
Must never: change a stage's key (the planner never sees units), publish a unit under a key
whose run-time reads it was not built with, or publish the stage's entry before its units.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from hfbuild.builds import packbuild
from hfbuild.core import canonical
from hfbuild.core.spec import Report, StageSpec, stored_rows
from hfbuild.keys import shards
from hfbuild.keys.fullkey import identify, observing
from hfbuild.keys.manifest import Manifest, Observed, Shard, full_key
from hfbuild.source import closure, liveness, refs
from hfbuild.source.gitstate import Snapshot

if TYPE_CHECKING:
    from hfbuild.keys.place import Place

DEFAULT_BATCH_SIZE = 1000  # datasets' default for map and filter


class Unit(NamedTuple):
    """One unit: the batches starting in input shard `label` of `split`, reading rows
    `start` to `stop` of the split."""

    split: str
    key: str
    label: str
    start: int
    stop: int
    first_input: str


def batch_size(options: Mapping[str, Any]) -> int | None:
    """The stage's batch size as datasets takes it; None for one batch of everything."""
    bs = options.get("batch_size", DEFAULT_BATCH_SIZE)
    if bs is None or not isinstance(bs, int) or isinstance(bs, bool) or bs <= 0:
        return None
    return bs


def eligible(spec: StageSpec) -> bool:
    """Whether the batched stage `spec` may be built by units (when its input's entry is a
    list of shards or units, `build`)."""
    o = spec.options
    n = o.get("num_proc")
    return (
        spec.kind in ("map", "filter")
        and len(spec.inputs) == 1
        and bool(o.get("batched"))
        and not o.get("with_rank")
        and shards.wanted(spec)
        and (n is None or (isinstance(n, int) and not isinstance(n, bool) and n <= 1))
        and batch_size(o) is not None
    )


def code_key(m: Manifest, observed: Observed) -> str:
    """What every unit of the stage shares: its manifest without its input, with the files
    its builds read at run time."""
    return full_key(code_static(m), observed)


def code_static(m: Manifest) -> str:
    """The stage's static manifest without its input (under which the files its unit
    builds read are recorded)."""
    doc = {**m.doc, "inputs": "batch-units"}
    return canonical.digest(canonical.dumps(doc).encode())


def units(
    code: str, split: str, rows: Sequence[tuple[str, str, int]], bs: int, with_indices: bool
) -> list[Unit]:
    """The units of one split whose input shards are `rows` ((key, label, rows) in order):
    one per shard a batch starts in."""
    offsets = []
    at = 0
    for _, _, n in rows:
        offsets.append(at)
        at += n
    total = at
    out = []
    for i, (key, label, n) in enumerate(rows):
        first, end_of_shard = offsets[i], offsets[i] + n
        start = -(-first // bs) * bs  # the first batch starting in this shard
        if start >= end_of_shard:
            continue
        stop = min(((end_of_shard - 1) // bs) * bs + bs, total)
        read = [j for j in range(i, len(rows)) if offsets[j] < stop]
        last = read[-1]
        doc = {
            "batch-unit": code,
            "split": split,
            "inputs": [rows[j][0] for j in read],
            "from": start - first,
            "to": stop - offsets[last],
            "index": start if with_indices else None,
        }
        unit_key = canonical.digest(canonical.dumps(doc).encode())
        out.append(Unit(split, unit_key, label, start, stop, key))
    return out


def _plan(code: str, spec: StageSpec, listed: Sequence[Any]) -> dict[str, list[Unit]] | None:
    """The units of every split of the input whose entry lists `listed` (its shard rows),
    or None when a split has no rows (built whole)."""
    by_split: dict[str, list[tuple[str, str, int]]] = {}
    for row in listed:
        facts = row[4] if len(row) >= 5 and isinstance(row[4], dict) else {}
        n = facts.get("rows")
        if not isinstance(n, int):
            return None
        by_split.setdefault(str(row[0]), []).append((str(row[1]), str(row[2]), n))
    bs = batch_size(spec.options)
    assert bs is not None
    indices = bool(spec.options.get("with_indices"))
    out = {}
    for split, rows in by_split.items():
        if sum(n for _, _, n in rows) == 0:
            return None
        out[split] = units(code, split, rows, bs, indices)
    return out


def build(
    place: Place, spec: StageSpec, m: Manifest, manifests: Mapping[str, Manifest]
) -> Report | None:
    """Build the stage from its units (the store's, and the missing ones built now), and
    publish its entry listing them; None when it is to be built whole instead (nothing
    published but units, each under its own key)."""
    store = place.store
    parent_fp = manifests[spec.inputs[0]].fingerprint
    parent = store.read_manifest(parent_fp)
    listed = parent.get("shards") if parent is not None else None
    if parent is None or not isinstance(listed, list):
        return None
    as_dict = bool(parent.get("dict"))
    t0 = time.perf_counter()
    static = code_static(m)
    recorded = store.read_observed(static)
    # What its builds read at run time: this store's record, else what the stage's key was
    # made with (the lock's or the driver's record: a fresh clone, a Ray node), so that its
    # units are built once under it, not built, found to read more, and built again.
    assumed: Observed = m.observed
    if recorded:
        assumed = identify(recorded[0], Snapshot(place.root), place.stat_cache)
    tmp = store.new_build_dir(m.static_fingerprint)
    try:
        with observing(place, tmp) as seen:
            got = _build_units(place, spec, m, parent_fp, listed, assumed, tmp)
            if got is None:
                return None
            now = seen.identify(m)
            while not {p for p, _ in now} <= {p for p, _ in assumed}:
                # Its function read files the assumed key does not hold: every unit's key
                # takes them. The units built now read them as they are: written under
                # their new keys, not built again (`_rekeyed`); the store's, built before
                # under the smaller set, are built again, and may read more (again then).
                assumed = tuple(sorted(set(assumed) | set(now)))
                made = _rekeyed(store, spec, m, listed, got, assumed, tmp)
                got = _build_units(place, spec, m, parent_fp, listed, assumed, tmp, made)
                if got is None:
                    made.discard(store)
                    return None
                now = seen.identify(m)
            observed = tuple(sorted(set(assumed) | set(now)))
            known = {}
            for key, (path, doc) in got.docs.items():
                known[key] = store.publish_first(path, key, doc) if path else doc
            for pack, keys in got.packs:  # the first to publish a pack wins, as for a unit
                known.update(packbuild.publish(place, spec, keys, pack))
            final = dataclasses.replace(m, observed=observed)
            done = _Done(got.plan, known, got.built, got.written, as_dict)
            entry = _publish(place, spec, final, manifests, done, tmp, t0)
            seen.publish(static, observed)
            seen.publish(m.static_fingerprint, observed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(len(us) for us in got.plan.values())
    seconds = time.perf_counter() - t0
    return Report(
        spec.name,
        final.fingerprint,
        "built",
        stored_rows(entry),
        seconds,
        (got.built, total),
        entry,
    )


class _Built(NamedTuple):
    """The units of a stage under one set of run-time reads: by split; key -> (directory,
    or "" when the store has it or a pack of `packs` holds it, its document); the packs
    of units built now with their units' keys in order; units built; bytes written."""

    plan: dict[str, list[Unit]]
    docs: dict[str, tuple[str, dict[str, Any]]]
    packs: list[tuple[packbuild.Pack, list[str]]]
    built: int
    written: int

    def discard(self, store: Any) -> None:
        """What was built now, unpublished, to the trash."""
        for path, _ in self.docs.values():
            if path:
                store.discard(path)
        for pack, _ in self.packs:
            store.discard(pack.path)


def _build_units(
    place: Place,
    spec: StageSpec,
    m: Manifest,
    parent_fp: str,
    listed: Sequence[Any],
    observed: Observed,
    tmp: str,
    made_now: _Built | None = None,
) -> _Built | None:
    """The units of the stage under `observed`, the missing ones built into `tmp`: those
    of one split and form together as packs (`packbuild.of_results`), the others each in a
    directory of its own; None when the stage is to be built whole. A unit is found among
    `made_now` (built by this build already, `_rekeyed`), else in the store by its key: its
    own entry, or its rows of a pack the stage's last list names."""
    from hfbuild.builds import builder, shardbuild, shardone, unitrows

    store = place.store
    plan = _plan(code_key(m, observed), spec, listed)
    if plan is None:
        return None
    prior = shardbuild.listed_here(store, spec.name)
    was = made_now or _Built(plan, {}, [], 0, 0)
    docs: dict[str, tuple[str, dict[str, Any]]] = dict(was.docs)
    todo = []
    for us in plan.values():
        for u in us:
            if u.key in docs:
                continue
            have = prior.get(u.key) or store.intact_manifest(u.key)
            if have is not None:
                docs[u.key] = ("", have)
            else:
                todo.append(u)
                docs[u.key] = ("", {})
    if not todo:
        return _Built(plan, docs, list(was.packs), was.built, was.written)
    kept = closure.kept_state(refs.function(spec))
    scratch = os.path.join(tmp, builder.SCRATCH)
    made: list[tuple[Unit, str, Any, float]] = []  # (unit, its directory, result, seconds)
    inputs = unitrows.UnitRows(store, parent_fp, listed, todo)
    with shardone.quiet_datasets():
        for run in _runs(spec, todo):
            got_run = _filtered_together(place.root, spec, inputs, run, tmp, scratch)
            for u, path, out, seconds in got_run or [(u, "", None, 0.0) for u in run]:
                if out is None:  # built by itself, not under the run's cache file name
                    if path:
                        store.discard(path)
                    t1 = time.perf_counter()
                    rows = inputs.rows_of(u)
                    one = builder.offset_indices(spec, u.start)
                    path = tempfile.mkdtemp(dir=tmp, prefix="unit-")
                    named = {"scratch": scratch, "tag": os.path.basename(path) + "-"}
                    out = builder.run_stage(one, [rows], u.key, path, place.root, **named)
                    seconds = time.perf_counter() - t1
                made.append((u, path, out, seconds))
        liveness.check_built(place.root, m.doc)  # the code that ran is the code hashed
        got = _Built(plan, docs, list(was.packs), was.built + len(todo), was.written)
        if closure.kept_state(refs.function(spec)) != kept:
            for _, path, _, _ in made:
                store.discard(path)
            return None
        got = _save(store, spec, made, got, tmp, scratch)
    if not _same_features(spec, plan, docs):
        mine = {k: d for k, d in docs.items() if k not in was.docs}  # `made_now`: the caller's
        _Built(plan, mine, got.packs[len(was.packs) :], 0, 0).discard(store)
        return None
    return got


def _runs(spec: StageSpec, todo: Sequence[Unit]) -> list[list[Unit]]:
    """`todo` in runs a filter builds by one call: consecutive units of one split, each
    starting where the one before it stops (so the run's batches are the units' own, at
    the same global offsets); a map's units one by one (its rows per batch are not known
    from its input, so one call's output could not be cut into units)."""
    out: list[list[Unit]] = []
    for u in todo:
        last = out[-1][-1] if out else None
        if spec.kind == "filter" and last and last.split == u.split and last.stop == u.start:
            out[-1].append(u)
        else:
            out.append([u])
    return out


def _filtered_together(
    root: str, spec: StageSpec, inputs: Any, run: Sequence[Unit], tmp: str, scratch: str
) -> list[tuple[Unit, str, Any, float]] | None:
    """A run of a filter's units (`_runs`) by one `filter` over their rows, when they lie
    in one pack (`UnitRows.together`): a batched filter's output is which rows of each
    batch it keeps, so each unit's result is the rows kept of its own, a slice of the
    run's selection with the fingerprint its own build gives it ((unit, its directory,
    result, seconds) each, in order); a unit that kept no row has result None, to be built
    by itself (datasets refuses a slice of none at a selection's end). None for a run of
    one unit or rows not in one pack."""
    import numpy as np

    from hfbuild.builds import builder

    rows = inputs.together(run) if len(run) > 1 else None
    if rows is None:
        return None
    t0 = time.perf_counter()
    paths = [tempfile.mkdtemp(dir=tmp, prefix="unit-") for _ in run]
    named = {"scratch": scratch, "tag": os.path.basename(paths[0]) + "-"}
    one = builder.offset_indices(spec, run[0].start)
    whole = builder.run_stage(one, [rows], run[0].key, paths[0], root, **named)
    if whole._indices is None:  # datasets gave no selection: each unit by itself
        return None
    kept = whole._indices.column(0).to_numpy()
    cuts = np.searchsorted(kept, [u.start - run[0].start for u in run] + [len(rows)])
    each = (time.perf_counter() - t0) / len(run)
    out = []
    for u, path, a, b in zip(run, paths, cuts, cuts[1:], strict=False):
        got = whole.select(range(int(a), int(b)), new_fingerprint=u.key[:64]) if b > a else None
        out.append((u, path, got, each))
    return out


def _save(
    store: Any,
    spec: StageSpec,
    made: Sequence[tuple[Unit, str, Any, float]],
    got: _Built,
    tmp: str,
    scratch: str,
) -> _Built:
    """The units built now (`made`) written: runs of them as packs, the others as entries
    of their own; their documents in `got.docs`."""
    from hfbuild.builds import builder, shardone

    written = 0
    packed = packbuild.of_results([(u.split, out) for u, _, out, _ in made])
    for run in packed:
        members = [made[i] for i in run]
        dest = tempfile.mkdtemp(dir=tmp, prefix="pack-")
        first = members[0][0].key
        info, hashes = packbuild.write_results(
            [out for _, _, out, _ in members], os.path.join(dest, "data"), first[:64]
        )
        shards: list[tuple[int, dict[str, Any]]] = []
        start = 0
        for (u, _, out, seconds), h in zip(members, hashes, strict=True):
            part = builder.SaveInfo(len(out), h, 0, None, info.form)
            s = Shard(u.split, u.key, u.label, 0, u.first_input)
            doc = shardone.shard_doc(spec, s, part, out, seconds)
            doc["span"] = [start, start + len(out)]
            start += len(out)
            shards.append((len(shards), doc))
            got.docs[u.key] = ("", doc)
        written += info.written_bytes
        pack = packbuild.Pack(dest, info, shards)
        got.packs.append((pack, [u.key for u, _, _, _ in members]))
    in_pack = {i for run in packed for i in run}
    for i, (u, path, out, seconds) in enumerate(made):
        if i in in_pack:
            store.discard(path)  # its rows are the pack's
            continue
        info = builder.save(out, os.path.join(path, "data"), path, (), scratch)
        s = Shard(u.split, u.key, u.label, 0, u.first_input)
        doc = shardone.shard_doc(spec, s, info, out, seconds)
        written += int(doc["written_bytes"])
        got.docs[u.key] = (path, doc)
    for name in os.listdir(scratch) if os.path.isdir(scratch) else []:
        store.discard(os.path.join(scratch, name))  # the units' cache files: written now
    return got._replace(written=got.written + written)


def _rekeyed(
    store: Any,
    spec: StageSpec,
    m: Manifest,
    listed: Sequence[Any],
    got: _Built,
    observed: Observed,
    tmp: str,
) -> _Built:
    """Of the units `got` holds, those built now (each unit's own directory, each pack),
    written under their keys with the run-time reads `observed` (`rekey.copy`: the bytes a
    build under those keys writes), the old ones discarded; a unit whose files cannot be
    rewritten is left out, to be built again. Their builds read the files as they are now,
    so those keys hold what they read. The plan's units are the same rows under either
    key: the i-th of a split is the i-th."""
    from hfbuild.builds import rekey

    plan = _plan(code_key(m, observed), spec, listed)
    new = {
        u.key: v.key
        for split, us in got.plan.items()
        for u, v in zip(us, (plan or {}).get(split, []), strict=False)
    }
    docs, packs = rekey.results(store, got.docs, got.packs, new, tmp)
    return _Built(plan or {}, docs, packs, len(docs), got.written)


def _same_features(
    spec: StageSpec, plan: Mapping[str, list[Unit]], docs: Mapping[str, tuple[str, dict[str, Any]]]
) -> bool:
    """A map's units with rows all have the same output features."""
    if spec.kind != "map":
        return True
    seen = set()
    for us in plan.values():
        for u in us:
            doc = docs[u.key][1]
            if doc.get("rows") != 0:
                seen.add(str(doc.get("features")))
    return len(seen) <= 1


def _publish(
    place: Place,
    spec: StageSpec,
    m: Manifest,
    manifests: Mapping[str, Manifest],
    done: _Done,
    tmp: str,
    t0: float,
) -> dict[str, Any]:
    """The stage's entry listing its units in order, as a sharded stage's lists its shards
    (`shardbuild.publish_list`); the entry's manifest as the store holds it."""
    from hfbuild.builds import shardbuild

    store = place.store
    listed: list[list[Any]] = []
    for us in done.plan.values():
        for u in us:
            stored = done.known[u.key]
            facts = {
                "rows": stored.get("rows"),
                "content_hash": stored.get("content_hash"),
                "stamp": stored.get("stamp") or store.manifest_stamp(u.key),
                "input": u.first_input,
                "before": "",
            }
            if spec.kind == "map":
                facts["features"] = stored.get("features")
            if isinstance(stored.get("form"), str):
                facts["form"] = stored["form"]  # the list's form (`inputid`) is its first's
            if "pack" in stored:  # a row range of a pack, not an entry of its own
                facts.update(pack=stored["pack"], span=stored["span"])
            listed.append([u.split, u.key, u.label, stored["files"], facts])
    rows = shardbuild.Listed(listed, done.built, done.written, done.as_dict)
    return shardbuild.publish_list(place, spec, m, manifests, rows, tmp, t0)


class _Done(NamedTuple):
    """A stage's units once built: by split, the stored manifest of each by key, how many
    were built now, the bytes written, whether the result is a DatasetDict."""

    plan: Mapping[str, list[Unit]]
    known: Mapping[str, dict[str, Any]]
    built: int
    written: int
    as_dict: bool
