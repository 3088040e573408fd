"""A Ray task's map shards built together, as a local sharded build builds a stage's.

A map shard built by itself (`shardunits.build_one`) pays for its own lock, build directory,
observation of its reads, scratch and publish, and is then loaded back to be written into
the pack its task pushes (`packbuild.of_entries`): ~15 ms a tiny shard. Here a task's map
shards are keyed first (`raykey.keyed`, each from what the task received, up to the first
refused or failing), then built one after another under one observation, with one scratch,
their results kept, and written straight into packs (`packbuild.of_results` /
`write_results`, as `batchunits` writes a batched stage's units), published in the node's
store for the task to push (`raypacks.publish_chunk`); a shard no pack may hold (no rows, a
format set) is saved as an entry of its own.

What the builds read at run time is part of every shard's key: when they read files the
keys assumed lack, every shard's key takes them, and each result is written under its new
key (`shardone.keyed_as`), not built again (as `shardbuild.build` re-keys the shards it published
before): a build that read them read them as they are, one before the first read did not
read them; the results then name that key and set, for the driver to record
(`ray_executor._fetch_shard`). A build that listed a folder the tree does
not hold with its names raises `UnshippedListingError` with nothing published (the task
answers "unlisted" for those shards); any other error: nothing published, the task then
builds each shard by itself, which names the failing shard's file.

Owns: `build_together`. Must never: publish a shard under a key it did not recompute or whose
observed files it was not built with, publish a pack before each range's hash is taken of
what was written, or read the driver's files.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from hfbuild.builds import packbuild, raykey, shardone, shardunits
from hfbuild.core import canonical
from hfbuild.core.errors import HfbuildError, UnshippedListingError
from hfbuild.keys import packs

if TYPE_CHECKING:
    from hfbuild.keys.manifest import Observed
    from hfbuild.keys.place import Place


class _One(NamedTuple):
    """A map shard of the task, keyed: its position, its key as the worker recomputed it,
    its input's row in a pack (None: an entry of its own), its offset, the seconds its
    input and key took."""

    i: int
    k: raykey.Keyed
    row: list[Any] | None
    offset: int
    took: float


def build_together(
    task: Any, job: Mapping[str, Any], shards: list[dict[str, Any]], scratch: str
) -> dict[int, dict[str, Any]]:
    """The task's map shards (from the first, up to the first one refused or failing to
    key) built together and published in the node's store; each one's result (as
    `rayworker._build_shard` gives it, "packed" naming its pack) by its position. {} when
    fewer than two may be, or their build failed (each is then built by itself).
    `UnshippedListingError` when their build listed a folder the tree lacks."""
    if task.spec.kind != "map" or len(shards) < 2:
        return {}
    todo = _keyed(task, job, shards, scratch)
    if len(todo) < 2 or len({o.k.m.observed for o in todo}) != 1:
        return {}
    try:
        return _build(task.place, todo)
    except UnshippedListingError:
        raise
    except HfbuildError:
        return {}  # each built by itself, whose error names its file


def _keyed(
    task: Any, job: Mapping[str, Any], shards: list[dict[str, Any]], scratch: str
) -> list[_One]:
    """The task's shards from the first, inputs taken and keys recomputed, up to the first
    that is refused or fails (it is built by itself, in turn)."""
    out: list[_One] = []
    for i, part in enumerate(shards):
        one = {**job, **part}
        t0 = time.perf_counter()
        try:
            if task.take_inputs(one) is not None:
                break
            row = task.in_pack.get(str(one["shard"]["input"]))
            took = time.perf_counter() - t0
            held = row[4] if row is not None else None
            k = raykey.keyed(task.root, task.spec, task.place, one, None, scratch, task.keys, held)
        except HfbuildError:
            break
        out.append(_One(i, k, row, int(one["shard"]["offset"]), round(took, 4)))
    return out


def _build(place: Place, todo: list[_One]) -> dict[int, dict[str, Any]]:
    """`todo` built under one observation (again, all of it, while their builds read files
    their keys lack), written and published; the results by position."""
    from hfbuild.keys.fullkey import observing

    store = place.store
    m = todo[0].k.m
    observed: Observed = m.observed
    found = _published(place, todo)
    if found is not None:  # a retried task whose first attempt published them
        return found
    # Its own lock and build directory, named after no entry (a pack's key is locked when
    # one is found in the way as it is published).
    lock = canonical.digest(canonical.dumps({"raymaps": [o.k.s.key for o in todo]}).encode())
    t0 = time.perf_counter()
    with store.lock(lock):
        tmp = store.new_build_dir(lock)
        try:
            with observing(place, tmp) as seen, shardone.quiet_datasets():
                built = [_key(o, observed) for o in todo]
                made = _run(place, todo, built, tmp)
                now = seen.identify(m)
            # Read files the keys assumed lack: every key takes them. Each result is written
            # under its new key, not built again: a build that read them read them as they
            # are, and one before the first read did not read them (a shard keeps no state
            # between calls: `check_kept_state`), so its rows cannot depend on them.
            if not set(now) <= set(observed):
                observed = tuple(sorted(set(now) | set(observed)))
            keys = [_key(o, observed) for o in todo]
            pushed = _publish(place, todo, keys, made, tmp, built)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    each = round((time.perf_counter() - t0) / len(todo), 4)
    read = [p for p, _ in observed]
    results: dict[int, dict[str, Any]] = {}
    for o, key, (rows, pack) in zip(todo, keys, pushed, strict=True):
        res: dict[str, Any] = {"fingerprint": key, "rows": rows, "observed": read, "seconds": each}
        res["timings"] = {"input": o.took, "key": o.k.seconds, "build": each}
        if pack is not None:
            res["packed"] = pack
        results[o.i] = res
    return results


def _published(place: Place, todo: list[_One]) -> dict[int, dict[str, Any]] | None:
    """The results of `todo` when the node's store holds them as one pack under their
    recomputed keys (a first attempt of the task built and published them), else None."""
    keys = [o.k.s.key for o in todo]
    pack = packs.pack_key(keys)
    facts = packbuild.packed_all(place.store, pack)
    if facts is None or set(facts) != set(keys):
        return None
    read = [p for p, _ in todo[0].k.m.observed]
    out: dict[int, dict[str, Any]] = {}
    for o in todo:
        res: dict[str, Any] = {"fingerprint": o.k.s.key, "rows": facts[o.k.s.key]["rows"]}
        res |= {"observed": read, "seconds": 0.0, "packed": pack}
        res["timings"] = {"input": o.took, "key": o.k.seconds, "build": 0.0}
        out[o.i] = res
    return out


def _key(o: _One, observed: Observed) -> str:
    """Shard `o`'s key had its build read `observed` (its recomputed key when that is the
    set it was keyed with)."""
    return o.k.s.key if observed == o.k.m.observed else shardunits.key_with(o.k.m, o.k.s, observed)


class _Made(NamedTuple):
    """A shard built now: its result, its directory, its input, the seconds it took."""

    out: Any
    path: str
    inp: Any
    seconds: float


def _run(place: Place, todo: list[_One], keys: list[str], tmp: str) -> list[_Made]:
    """Each of `todo` built (its function run over its input rows, under its key `keys[j]`),
    one after another with one scratch, in order."""
    from hfbuild.builds import builder
    from hfbuild.source import closure, liveness, refs

    store = place.store
    scratch = os.path.join(tmp, builder.SCRATCH)
    out = []
    for o, key in zip(todo, keys, strict=True):
        spec, s = o.k.spec, o.k.s
        if spec.options.get("num_proc") and not spec.options.get("with_rank"):
            opts = {n: v for n, v in spec.options.items() if n != "num_proc"}  # as build_one
            spec = dataclasses.replace(spec, options=opts)
        if o.row is not None:  # its rows read in place from their pack
            inp = store.load_listed(s.input, str(o.row[0]), [o.row])
        else:
            inp = store.load_shard(s.input, None)
        path = tempfile.mkdtemp(dir=tmp, prefix="shard-")
        named = {"scratch": scratch, "tag": os.path.basename(path) + "-"}
        kept = closure.kept_state(refs.function(spec))
        t0 = time.perf_counter()
        got = builder.run_stage(
            builder.offset_indices(spec, o.offset), [inp], key, path, place.root, **named
        )
        shardone.check_kept_state(spec, s, kept, closure.kept_state(refs.function(spec)))
        out.append(_Made(got, path, inp, time.perf_counter() - t0))
    liveness.check_built(place.root, todo[0].k.m.doc)  # the code that ran is the code hashed
    return out


def _publish(
    place: Place,
    todo: list[_One],
    keys: list[str],
    made: list[_Made],
    tmp: str,
    built: list[str],
) -> list[tuple[Any, str | None]]:
    """`made` (built under the keys `built`) written and published in the node's store
    under `keys`: runs of them as packs (`packbuild.of_results`, each range's content hash
    taken of what was written), the others as entries of their own (first writer wins),
    a result's key replaced by its new one where datasets wrote it (`shardone.keyed_as`); (rows,
    its pack or None) each."""
    from hfbuild.builds import builder

    store = place.store
    spec = todo[0].k.spec
    splits = [o.k.s.split for o in todo]
    # A shard of no rows keeps an entry of its own (its features are its input's).
    fit = [j for j, d in enumerate(made) if len(d.out)]
    runs = [
        [fit[r] for r in run]
        for run in packbuild.of_results([(splits[j], made[j].out) for j in fit])
    ]
    out: list[tuple[Any, str | None]] = [(len(d.out), None) for d in made]
    for run in runs:
        run_keys = [keys[j] for j in run]
        fp = packs.pack_key(run_keys)
        dest = tempfile.mkdtemp(dir=tmp, prefix="pack-")
        results = [made[j].out for j in run]
        info, hashes = packbuild.write_results(results, os.path.join(dest, "data"), fp[:64])
        dest, _ = shardone.keyed_as(store, dest, {}, built[run[0]], keys[run[0]], tmp)
        done: list[tuple[int, dict[str, Any]]] = []
        start = 0
        for j, h in zip(run, hashes, strict=True):
            d = made[j]
            part = builder.SaveInfo(len(d.out), h, 0, None, info.form)
            doc = shardone.shard_doc(spec, todo[j].k.s, part, d.out, d.seconds)
            doc["span"] = [start, start + len(d.out)]
            start += len(d.out)
            done.append((j, doc))
        packbuild.publish(place, spec, run_keys, packbuild.Pack(dest, info, done))
        for j in run:
            out[j] = (len(made[j].out), fp)
    scratch = os.path.join(tmp, builder.SCRATCH)
    in_pack = {j for run in runs for j in run}
    for j, d in enumerate(made):
        if j in in_pack:
            continue
        s = todo[j].k.s
        sources = shardone.input_sources(store, s.input, d.inp)
        info = builder.save(d.out, os.path.join(d.path, "data"), d.path, sources, scratch)
        doc = shardone.shard_doc(spec, s, info, d.out, d.seconds)
        path, doc = shardone.keyed_as(store, d.path, doc, built[j], keys[j], tmp)
        store.publish_first(path, keys[j], doc)
        out[j] = (info.rows, None)
    return out
