"""Building a sharded stage: only the shards the store lacks, then the stage's shard list.

Owns: the order of a sharded stage's build, with the stage's build lock held (`stage.py`
takes it): each shard the store does not hold is built by itself (a load shard from its one
data file; a transform shard from its input shard, its `with_indices` offset being the rows
of the input shards before it) in a directory inside the stage's build directory, and
published under its key as soon as it is built and what the build read so far at run time is
within the key it assumed (the key all the stage's shards share, see `shards.py`); last the
stage's entry, a manifest listing its shards in order (with each shard's files, rows and
content hash, so the next build takes the shards it lists by a stat of their files). Each
shard is built by `shardone`'s code, as a unit of work of its own is. A kill at any point
leaves only complete shard entries and no stage entry; its next build reuses the shards. A
shard's scratch leaves it before it is published, into the store's trash (`Store.discard`:
removed when the process exits, after the build's file creations). A shard published before
the build read more (another process's reads count: inotify sees them all) is published
under its new key from its entry, not built again, while the files it was keyed with hold.

Must never: publish a shard under a key that lacks a file its build read, publish
the stage entry before every shard it lists is in the store, or print. It receives the
pipeline's `Place` (forked workers inherit it, not the pipeline), never the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from hfbuild.builds import packbuild, shardone
from hfbuild.core import progress
from hfbuild.core.errors import BuildError, HfbuildError
from hfbuild.core.spec import Report, StageSpec, stored_rows
from hfbuild.keys import inputid, shards
from hfbuild.keys.fullkey import entry_doc, observing
from hfbuild.keys.manifest import Manifest, Observed, Shard
from hfbuild.store.entry import row_owner, row_pack

if TYPE_CHECKING:
    from hfbuild.keys.place import Place

_PROGRESS_SHARDS = 8  # fewer shards than this build without a progress bar
_LIST_AT = 64  # shards to look for from which the store's directories are listed instead


def build(
    place: Place,
    spec: StageSpec,
    m: Manifest,
    manifests: Mapping[str, Manifest],
    packed: Mapping[str, dict[str, Any]] | None = None,
) -> tuple[Report, dict[str, Any]]:
    """Build the stage's missing shards, publishing each as it is done, then the stage's
    entry; (report, stored document). `packed`: shards held here as row ranges of packs
    no list names yet (a Ray build's, `shardunits`), by key, with what the list records
    of each (`packbuild.packed`)."""
    from hfbuild.builds import builder

    store = place.store
    t0 = time.perf_counter()
    tmp = store.new_build_dir(m.static_fingerprint)
    built = 0
    written = 0
    known: dict[str, dict[str, Any] | None] = {}  # shard key -> its intact manifest, or None
    mine: dict[int, tuple[str, Observed]] = {}  # published by this build: key, files it read
    prior = listed_here(store, spec.name)  # what the last build listed, found in place
    prior.update(packed or {})
    via = manifests[spec.inputs[0]].fingerprint if spec.kind != "load" else None
    try:
        with observing(place, tmp) as seen:
            observed: Observed = m.observed
            pending = True
            while pending:
                pending = False
                cur = dataclasses.replace(m, observed=observed)
                keyed = cur
                todo: list[tuple[int, Shard]] = []
                new = [s.key for s in cur.shard_list if s.key not in known and s.key not in prior]
                absent = store.absent(new) if len(new) >= _LIST_AT else set()
                for i, s in enumerate(cur.shard_list):
                    if s.key not in known:
                        doc = prior.get(s.key) or (
                            None if s.key in absent else store.intact_manifest(s.key)
                        )
                        if doc is None and (doc := _rekeyed(place, mine.get(i), s, cur, tmp)):
                            written += int(doc["written_bytes"])
                        if doc is None:
                            todo.append((i, s))
                        known[s.key] = doc
                bar = progress.bar(len(todo), spec.name, unit="shard", at_least=_PROGRESS_SHARDS)
                with bar, shardone.quiet_datasets():
                    now: set[tuple[str, str]] = set()
                    held: list[int] = []  # the positions of a pack's shards built so far
                    done = _run(place, spec, cur, todo, builder, tmp, via)
                    for i, path, doc, fresh, pack in done:
                        shardone.one_load_count()
                        written += int(doc["written_bytes"])
                        if fresh:  # else built by the same datasets call as the last one
                            now = set(seen.identify(m))
                        if not now <= set(observed):
                            # It read files the assumed key does not hold: every shard's key
                            # takes them. Shards built from now on are published with them;
                            # those published before again, from their entries (`_rekeyed`).
                            observed = tuple(sorted(now | set(observed)))
                            keyed = dataclasses.replace(m, observed=observed)
                            known.clear()
                            pending = True
                        key = keyed.shard_list[i].key
                        built += 1
                        bar.update(1)
                        if pack is not None:
                            # A pack is published once its last shard is keyed (what the
                            # build read is known after its first: `fresh`).
                            held.append(i)
                            if len(held) == len(pack.shards):
                                written += pack.info.written_bytes
                                keys = [keyed.shard_list[k].key for k in held]
                                known.update(packbuild.publish(place, spec, keys, pack))
                                held = []
                            continue
                        # What was just written (or found intact) under the key: the stage's
                        # entry lists it without reading it back (`_publish`); re-keyed when
                        # built under a key its build's reads then grew (`keyed_as`).
                        old = cur.shard_list[i].key
                        path, doc = shardone.keyed_as(store, path, doc, old, key, tmp)
                        known[key] = _publish_shard(place, key, path, doc)
                        mine[i] = (key, observed)
        final = dataclasses.replace(m, observed=observed)
        names = seen.listed(observed)
        doc = _publish(place, spec, final, manifests, built, written, tmp, t0, known, names)
        seen.publish(m.static_fingerprint, observed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    shards_built = (built, len(final.shard_list))
    rows = stored_rows(doc)
    report = Report(spec.name, final.fingerprint, "built", rows, seconds, shards_built, doc)
    return report, doc


def _workers(spec: StageSpec, todo: int) -> int:
    """Processes building the stage's shards side by side: its own `num_proc` (each shard
    then runs in one process), unless the function sees its rank (`with_rank`: the number of
    processes is part of its output, so datasets splits each shard as before)."""
    n = spec.options.get("num_proc")
    if not isinstance(n, int) or isinstance(n, bool) or n < 2 or spec.options.get("with_rank"):
        return 1
    return min(n, todo)


_JOB: tuple[Any, ...] | None = None  # what forked workers build from (set before the fork)


def _run(
    place: Place,
    spec: StageSpec,
    m: Manifest,
    todo: Sequence[tuple[int, Shard]],
    builder: Any,
    tmp: str,
    via: str | None,
) -> Iterator[tuple[int, str, dict[str, Any], bool, packbuild.Pack | None]]:
    """Build `todo`'s shards, yielding (position, directory, document, fresh, pack) as each
    is done (`fresh` False for a shard built by the same datasets call as the one before it:
    nothing was read since; `pack` the pack a shard loaded with others is a row range of,
    its directory then ""): in this process, or in fork-started workers (what they read
    reaches the recording through its spool files, written before each result comes back;
    their scratch goes to this process's trash, made before the fork). `via` is a transform's
    input list, where an input shard kept in a pack is found by its key."""
    n = _workers(spec, len(todo))
    if n == 1:
        for split_todo in _by_split(todo):
            together = shardone.load_together(place, spec, m, split_todo, builder, tmp)
            if together is not None:
                for k, (i, doc) in enumerate(together.shards):
                    yield i, "", doc, k == 0, together
                continue
            for i, s in split_todo:
                path, doc = shardone.build_shard(
                    place, spec, m, s, builder, tmp, shared=True, via=via
                )
                yield i, path, doc, True, None
        return
    import multiprocessing

    place.store.prepare_discard()
    global _JOB
    one = dataclasses.replace(
        spec, options={k: v for k, v in spec.options.items() if k != "num_proc"}
    )
    _JOB = (place, one, m, todo, builder, tmp, via)
    try:
        with multiprocessing.get_context("fork").Pool(n) as pool:
            for got in pool.imap_unordered(_worker, range(len(todo))):
                if got[0] == "error":
                    raise BuildError(str(got[1]))
                yield got[1], got[2], got[3], True, None
    finally:
        _JOB = None


def _by_split(
    todo: Sequence[tuple[int, Shard]],
) -> Iterator[list[tuple[int, Shard]]]:
    """`todo` in runs of consecutive shards of one split, in order."""
    run: list[tuple[int, Shard]] = []
    for item in todo:
        if run and run[-1][1].split != item[1].split:
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def _worker(k: int) -> tuple[Any, ...]:
    """One shard in a forked worker; an error comes back as its message (it may not pickle)."""
    assert _JOB is not None
    place, spec, m, todo, builder, tmp, via = _JOB
    i, s = todo[k]
    try:
        return ("ok", i, *shardone.build_shard(place, spec, m, s, builder, tmp, via=via))
    except HfbuildError as e:
        return ("error", str(e))
    except Exception as e:
        return ("error", f"stage {spec.name!r}, shard {s.label}: {type(e).__name__}: {e}")


def _rekeyed(
    place: Place, was: tuple[str, Observed] | None, s: Shard, m: Manifest, tmp: str
) -> dict[str, Any] | None:
    """A shard this build published (`was`: its key, the files read when it was keyed)
    whose key changed only by files read after it (each file it was keyed with has the
    same id): published under its new key from its entry, its transform not run again
    (another process's reads may have been seen meanwhile: concurrent builders of a
    project each read it as they start); None when it is to be built again."""
    if was is None or not set(was[1]) <= set(m.observed):
        return None
    made = shardone.rekeyed(place, was[0], s.key, tmp)
    return None if made is None else _publish_shard(place, s.key, *made)


def _publish_shard(place: Place, key: str, path: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Publish one shard (another stage or pipeline may build the same one: the first to
    publish it wins, `Store.publish_first`); the manifest of the shard now in the store
    (ours as written, or the intact one found there)."""
    return place.store.publish_first(path, key, doc)


def _publish(
    place: Place,
    spec: StageSpec,
    m: Manifest,
    manifests: Mapping[str, Manifest],
    count: int,
    written: int,
    tmp: str,
    t0: float,
    known: Mapping[str, dict[str, Any] | None],
    names: Mapping[str, list[str] | None] | None = None,
) -> dict[str, Any]:
    """The stage's entry: its shards in order, their rows and combined content hash (from
    the shard manifests `known` found intact, the others read now), the names of the
    directories its builds listed; the entry's manifest as the store holds it (ours as
    published, or the intact one another build published)."""
    store = place.store
    listed: list[list[Any]] = []
    for s in m.shard_list:
        stored = known.get(s.key) or store.intact_manifest(s.key)
        if stored is None:
            raise BuildError(
                f"stage {spec.name!r}: shard {s.label} ({s.key}) vanished from the store "
                f"while the stage was built (a concurrent `hfbuild gc`?); build it again."
            )
        # Sizes for `Store.check`; rows and content hash for the next build (`listed_here`),
        # with the stamp of the manifest they were read from; an indices shard's base.
        facts = {
            "rows": stored.get("rows"),
            "content_hash": stored.get("content_hash"),
            "stamp": stored.get("stamp") or store.manifest_stamp(s.key),
            **_row_base(place, spec, stored),
        }
        if spec.kind == "map":
            facts["features"] = stored.get("features") or _stored_features(store, s.key)
        if isinstance(stored.get("form"), str):
            facts["form"] = stored["form"]
        if "pack" in stored:  # a row range of a pack, not an entry of its own
            facts.update(pack=stored["pack"], span=stored["span"])
        # What `explain` compares a rebuild with.
        facts.update(input=s.input, before=s.before)
        if s.content:
            facts["content"] = s.content
        listed.append([s.split, s.key, s.label, stored["files"], facts])
    if spec.kind == "map":
        _check_features(spec, listed)
    if spec.kind == "load":
        _check_rows(spec, _rows_by_split(listed))
    done = Listed(listed, count, written, _is_dict(place, spec), names)
    return publish_list(place, spec, m, manifests, done, tmp, t0)


class Listed(NamedTuple):
    """A stage's list of shards (or units) once built: its `[split, key, label, files,
    facts]` rows in order, how many were built now, the bytes written, whether the result
    is a DatasetDict, the names of the directories its builds listed."""

    rows: list[list[Any]]
    built: int
    written: int
    as_dict: bool
    names: Mapping[str, list[str] | None] | None = None


def _rows_by_split(listed: Sequence[list[Any]]) -> dict[str, int]:
    rows: dict[str, int] = {}
    for row in listed:
        rows[row[0]] = rows.get(row[0], 0) + int(row[4].get("rows") or 0)
    return rows


def publish_list(
    place: Place,
    spec: StageSpec,
    m: Manifest,
    manifests: Mapping[str, Manifest],
    done: Listed,
    tmp: str,
    t0: float,
) -> dict[str, Any]:
    """The stage's entry listing `done.rows` (their rows by split and combined content hash
    from their facts); what is left in `tmp` goes to the trash; the entry's manifest as the
    store holds it (ours as published, or the intact one another build published)."""
    from hfbuild.store.content import combined_hash

    store = place.store
    rows = _rows_by_split(done.rows)
    hashes = [(str(row[0]), str(row[4].get("content_hash"))) for row in done.rows]
    form = _list_form(done.as_dict, list(rows), done.rows)
    doc = entry_doc(
        spec.name,
        m,
        {i: manifests[i].fingerprint for i in spec.inputs},
        rows=rows if done.as_dict else next(iter(rows.values())),
        content_hash=combined_hash(hashes),
        seconds=time.perf_counter() - t0,
        written_bytes=done.written,
        observed=m.observed,
        listed=done.names,
        form=form,
    )
    doc.update({"shards": done.rows, "shards_built": done.built, "dict": done.as_dict})
    for name in os.listdir(tmp):  # what is left is scratch: the entry holds the list only
        store.discard(os.path.join(tmp, name))
    fp = m.fingerprint
    stored = store.intact_manifest(fp)
    if stored is not None:
        store.discard(tmp)
        return stored
    # Not flushed, as its shards are not: a list lost to a power loss fails its checksum and
    # is made again from the shards the store holds (a flush: 0.3-0.8 ms of wall clock per
    # stage on this machine's idle disk, ~4 ms in a profiled run while others wrote).
    return store.publish(tmp, fp, doc, durable=False)


def _list_form(as_dict: bool, splits: list[str], listed: Sequence[list[Any]]) -> str:
    """The form of the stage's result: that of its first shard with rows (the result leaves
    empty shards out; its shards share their features: `_check_features` for a map, a load's
    cast to what decides them, a filter's its input's), else of its first shard; "" when
    that shard was built before shards recorded their form (its consumers are then keyed
    by the stage's fingerprint, as before: inputid.py)."""
    if not listed:
        return ""
    first = next((row for row in listed if row[4].get("rows") != 0), listed[0])
    shard_form = first[4].get("form")
    if not isinstance(shard_form, str) or not shard_form:
        return ""
    return inputid.list_form(as_dict, splits, shard_form)


def _stored_features(store: Any, key: str) -> str:
    """The features digest of a map shard stored before shards recorded it."""
    import datasets

    with open(os.path.join(store.data_path(key), "dataset_info.json"), encoding="utf-8") as f:
        info = datasets.DatasetInfo.from_dict(json.load(f))
    return shardone.features_id(info.features)


def _check_rows(spec: StageSpec, rows: Mapping[str, int]) -> None:
    """A sharded load whose served split has no rows at all fails as `load_dataset` fails
    (its shards, each of a file of no rows, were built empty)."""
    for split, n in rows.items():
        if n == 0:
            raise BuildError(
                f'stage {spec.name!r} failed: ValueError: Instruction "{split}" corresponds '
                f"to no data! (every data file of split {split!r} is empty, as datasets "
                f"says.) Earlier stages stay cached and the store is unchanged."
            )


def _check_features(spec: StageSpec, listed: Sequence[list[Any]]) -> None:
    """A sharded map's shards with rows all have the same output features, or the stage
    fails: datasets' map over the whole input fixes its features by the first rows it
    writes and casts the others to them (or fails), which shards built apart cannot
    reproduce. (An empty shard's are its input's: the result leaves it out.)"""
    first: tuple[str, str] | None = None
    for row in listed:
        facts = row[4]
        if facts.get("rows") == 0:
            continue
        if first is None:
            first = (str(row[2]), str(facts["features"]))
        elif facts["features"] != first[1]:
            raise BuildError(
                f"map stage {spec.name!r}: its function gives other column types for "
                f"{row[2]} than for {first[0]}. Plain datasets casts its whole output to the "
                f"types of the first rows it writes (or fails), which a build file by file "
                f"cannot reproduce; give the stage sharded=False, or make the function return "
                f"the same types for every file (say, float values in every file)."
            )


def listed_here(store: Any, name: str) -> dict[str, dict[str, Any]]:
    """The shards the stage's last entry (its ref) lists whose files are there with the
    sizes and identities it records (a shard whose files' identities differ is checked
    by itself, `Store.files_intact`), and whose manifest is the one the listing was made
    from (its stamp: a shard published again since, say by another pipeline after a
    repair, is read again): shard key -> the rows, content hash, stamp and files its
    listing records. A rebuild that keeps most shards then makes a few stats per shard
    instead of reading every shard's manifest; what the listing lacks (an older entry) is
    read as before.
    The listing is as trustworthy as the shard's own manifest: both are checksummed
    manifests, and `Store.check` of a stage entry makes the same stats."""
    fp = store.get_ref(name)
    doc = store.read_manifest(fp) if fp is not None else None
    rows = doc.get("shards") if doc is not None else None
    if isinstance(rows, list) and fp is not None and doc is not None:
        store.check_list(fp, doc)  # the identities of the shards it lists, checked at once
    out: dict[str, dict[str, Any]] = {}
    owners: dict[str, bool] = {}  # a pack named by many rows: checked once
    packs: dict[str, Any] = {}  # and, written again since, read once
    for row in rows if isinstance(rows, list) else []:
        if not (isinstance(row, list) and len(row) >= 5):
            continue
        key, files, facts = row[1], row[3], row[4]
        if not (isinstance(files, dict) and isinstance(facts, dict) and isinstance(key, str)):
            continue
        if not all(isinstance(v, int) for v in files.values()):
            continue
        if facts.get("content_hash") is None or facts.get("stamp") is None:
            continue
        owner = row_owner(row)  # a packed shard's files are its pack's
        ok = owners.get(owner)
        if ok is None:
            ok = store.files_intact(owner, files) and facts["stamp"] == store.manifest_stamp(owner)
            owners[owner] = ok
        if ok:
            out[key] = {**facts, "files": files}
        elif row_pack(row) is not None:
            # A pack whose manifest was written again (its identity record, say): the
            # shard is still the row range its manifest names, with the same content.
            found = packbuild.in_pack(store, owner, key, facts, packs)
            if found is not None:
                out[key] = found
    return out


def _is_dict(place: Place, spec: StageSpec) -> bool:
    """Whether the stage's result is a DatasetDict: its sharded load's is (a sharded
    transform's input is sharded, down to a load), as the load's options say; they are in
    its key, so every entry of it says the same (no need to read the input's entry)."""
    while spec.kind != "load":
        spec = place.stages[spec.inputs[0]]
    return shards.is_dict(spec.options)


def _row_base(place: Place, spec: StageSpec, stored: Mapping[str, Any]) -> dict[str, Any]:
    """For an indices shard, its base and the base's file sizes in the stage's list, so
    `Store.check` stats them as it stats the shard's own ({} for other shards). `stored` is
    the shard's manifest, or what the last listing recorded of it (`listed_here`)."""
    if "base" in stored:
        return {"base": stored["base"], "base_files": stored.get("base_files")}
    ind = stored.get("indices")
    if not isinstance(ind, dict):
        return {}
    base = str(ind.get("base"))
    based = place.store.intact_manifest(base)
    if based is None:
        raise BuildError(
            f"stage {spec.name!r}: the entry {base} a shard selects rows of vanished from "
            f"the store while the stage was built (a concurrent `hfbuild gc`?); build it again."
        )
    # A base made of shards has no files of its own: the row then names it without sizes,
    # and `Store.check` checks the shard, its base and the base's shards in full.
    files = None if isinstance(based.get("shards"), list) else based["files"]
    return {"base": base, "base_files": files}
