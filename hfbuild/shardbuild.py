"""Building a sharded stage: only the shards the store lacks, then the stage's shard list.

Owns: the order of a sharded stage's build, with the stage's build lock held (`build.py`
takes it): each shard the store does not hold is built by itself (a load shard from its one
data file; a transform shard from its input shard, its `with_indices` offset being the rows
of the input shards before it) in a directory inside the stage's build directory, and
published under its key as soon as it is built and what the build read so far at run time is
within the key it assumed (the key all the stage's shards share, see `shards.py`); last the
stage's entry, a manifest listing its shards in order (with each shard's files, rows and
content hash, so the next build takes the shards it lists by a stat of their files). A kill
at any point leaves only complete shard entries and no stage entry; its next build reuses
the shards. A shard's scratch leaves it before it is published, into the store's trash
(`Store.discard`: removed when the process exits, after the build's file creations).

Must never: publish a shard under a key whose observed files it was not built with, publish
the stage entry before every shard it lists is in the store, or print.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from hfbuild import __version__, closure, inputid, liveness, progress, refs, shards
from hfbuild.errors import BuildError, HfbuildError
from hfbuild.fingerprint import Manifest
from hfbuild.fullkey import Observed, entry_doc, observing
from hfbuild.spec import Report, StageSpec, stored_rows
from hfbuild.storepaths import tree_size

if TYPE_CHECKING:
    from hfbuild.pipeline import Pipeline

_PROGRESS_SHARDS = 8  # fewer shards than this build without a progress bar


def build(
    pipe: Pipeline, spec: StageSpec, m: Manifest, manifests: Mapping[str, Manifest]
) -> tuple[Report, dict[str, Any]]:
    """Build the stage's missing shards, publishing each as it is done, then the stage's
    entry; (report, stored document)."""
    from hfbuild import builder

    store = pipe.store
    t0 = time.perf_counter()
    tmp = store.new_build_dir(m.static_fingerprint)
    built = 0
    written = 0
    known: dict[str, dict[str, Any] | None] = {}  # shard key -> its intact manifest, or None
    prior = _listed(store, spec.name)  # what the last build listed, found in place
    try:
        with observing(pipe, tmp) as seen:
            observed: Observed = m.observed
            pending = True
            while pending:
                pending = False
                cur = dataclasses.replace(m, observed=observed)
                keyed = cur
                todo: list[tuple[int, shards.Shard]] = []
                for i, s in enumerate(cur.shard_list):
                    if s.key not in known:
                        doc = prior.get(s.key) or store.intact_manifest(s.key)
                        if doc is None:
                            todo.append((i, s))
                        known[s.key] = doc
                bar = progress.bar(len(todo), spec.name, unit="shard", at_least=_PROGRESS_SHARDS)
                with bar, quiet_datasets():
                    now: set[tuple[str, str]] = set()
                    for i, path, doc, fresh in _run(pipe, spec, cur, todo, builder, tmp):
                        _one_load_count()
                        written += int(doc["written_bytes"])
                        if fresh:  # else built by the same datasets call as the last one
                            now = set(seen.identify(m))
                        if not now <= set(observed):
                            # It read files the assumed key does not hold: every shard's key
                            # takes them. Shards built from now on are published with them;
                            # those published before are built again (the next pass).
                            observed = tuple(sorted(now | set(observed)))
                            keyed = dataclasses.replace(m, observed=observed)
                            known.clear()
                            pending = True
                        key = keyed.shard_list[i].key
                        # What was just written (or found intact) under the key: the stage's
                        # entry lists it without reading it back (`_publish`).
                        known[key] = _publish_shard(pipe, key, path, doc)
                        built += 1
                        bar.update(1)
        final = dataclasses.replace(m, observed=observed)
        names = seen.listed(observed)
        doc = _publish(pipe, spec, final, manifests, built, written, tmp, t0, known, names)
        seen.publish(m.static_fingerprint, observed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    shards_built = (built, len(final.shard_list))
    rows = stored_rows(doc)
    report = Report(spec.name, final.fingerprint, "built", rows, seconds, shards_built, doc)
    return report, doc


def build_one(
    pipe: Pipeline, spec: StageSpec, m: Manifest, s: shards.Shard, tmp: str
) -> tuple[str, dict[str, Any]]:
    """Build shard `s` of `m` by itself, exactly as `build` builds each shard, into a new
    directory inside `tmp`; (that directory, the shard's document). Nothing is published:
    for a shard built as a unit of work of its own (`shardunits`). A `with_indices` transform
    whose input shards before it are not in this store gets its offset in `spec` already
    (`builder.offset_indices`), with `s` at position 0."""
    from hfbuild import builder

    with quiet_datasets():
        return _build_shard(pipe, spec, m, s, builder, tmp)


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
    pipe: Pipeline,
    spec: StageSpec,
    m: Manifest,
    todo: Sequence[tuple[int, shards.Shard]],
    builder: Any,
    tmp: str,
) -> Iterator[tuple[int, str, dict[str, Any], bool]]:
    """Build `todo`'s shards, yielding (position, directory, document, fresh) as each is
    done (`fresh` False for a shard built by the same datasets call as the one before it:
    nothing was read since): in this process, or in fork-started workers (what they read
    reaches the recording through its spool files, written before each result comes back;
    their scratch goes to this process's trash, made before the fork)."""
    n = _workers(spec, len(todo))
    if n == 1:
        for split_todo in _by_split(todo):
            together = _load_together(pipe, spec, m, split_todo, builder, tmp)
            if together is not None:
                for k, (i, path, doc) in enumerate(together):
                    yield i, path, doc, k == 0
                continue
            for i, s in split_todo:
                yield (i, *_build_shard(pipe, spec, m, s, builder, tmp, shared=True), True)
        return
    import multiprocessing

    pipe.store.prepare_discard()
    global _JOB
    one = dataclasses.replace(
        spec, options={k: v for k, v in spec.options.items() if k != "num_proc"}
    )
    _JOB = (pipe, one, m, todo, builder, tmp)
    try:
        with multiprocessing.get_context("fork").Pool(n) as pool:
            for got in pool.imap_unordered(_worker, range(len(todo))):
                if got[0] == "error":
                    raise BuildError(str(got[1]))
                yield got[1], got[2], got[3], True
    finally:
        _JOB = None


def _by_split(
    todo: Sequence[tuple[int, shards.Shard]],
) -> Iterator[list[tuple[int, shards.Shard]]]:
    """`todo` in runs of consecutive shards of one split, in order."""
    run: list[tuple[int, shards.Shard]] = []
    for item in todo:
        if run and run[-1][1].split != item[1].split:
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def _together(spec: StageSpec) -> bool:
    """Whether a sharded load's missing shards may be loaded in one `load_dataset` call and
    cut into shards by their files' row counts: parquet, whose row counts a file's footer
    gives, with every row of every file loaded (no `filters=`, no file skipped by
    `on_bad_files`)."""
    o = spec.options
    return (
        spec.kind == "load"
        and o.get("builder") == "parquet"
        and o.get("filters") is None
        and o.get("on_bad_files") in (None, "error")
    )


def _load_together(
    pipe: Pipeline,
    spec: StageSpec,
    m: Manifest,
    todo: Sequence[tuple[int, shards.Shard]],
    builder: Any,
    tmp: str,
) -> list[tuple[int, str, dict[str, Any]]] | None:
    """The shards of `todo` (one split's, in order) loaded by one `load_dataset` over their
    files with the features datasets decides for the whole load, each shard then the rows
    of its file (its footer's row count; the rows of a parquet load are its files' rows in
    order): what loading each file by itself gives, without datasets' per-call cost (builder,
    locks, thread pools: ~12 ms a file). None where that cannot be done (not `_together`,
    fewer than two files, or the load failed: each file is then loaded by itself, which
    names the file a failure is about)."""
    if len(todo) < 2 or not _together(spec):
        return None
    group = _group_of(m, todo[0][1].split)
    if group is None or any(s.pos >= len(group) for _, s in todo):
        return None
    split = todo[0][1].split
    paths = [group[s.pos] for _, s in todo]
    t0 = time.perf_counter()
    one = decided_features(spec, m)
    path = tempfile.mkdtemp(dir=tmp, prefix="group-")
    scratch = os.path.join(tmp, builder.SCRATCH)
    named = {"scratch": scratch, "tag": os.path.basename(path) + "-"}
    try:
        counts = [builder.parquet_rows(p) for p in paths]
        out = builder.run_stage(one, [], todo[0][1].key, path, pipe.root, {split: paths}, **named)
    except (BuildError, OSError):
        _drop(pipe.store, path, scratch)
        return None
    if isinstance(out, dict):
        out = out[split]
    if sum(counts) != len(out):
        _drop(pipe.store, path, scratch)
        return None
    loaded = tree_size(scratch)  # the load's cache files, counted with the first shard
    liveness.check_built(pipe.root, m.doc)  # the code that ran is the code hashed
    done = []
    start = 0
    parts = builder.PartWriter(out)
    each = (time.perf_counter() - t0) / len(todo)
    for (i, s), n in zip(todo, counts, strict=True):
        dest = tempfile.mkdtemp(dir=tmp, prefix="shard-")
        t1 = time.perf_counter()
        info = parts.write(start, n, os.path.join(dest, "data"), s.key[:64])
        start += n
        doc = shard_doc(spec, s, info, out, each + time.perf_counter() - t1)
        doc["written_bytes"] += loaded
        loaded = 0
        done.append((i, dest, doc))
    del out, parts
    _drop(pipe.store, path, scratch)
    return done


def _drop(store: Any, path: str, scratch: str) -> None:
    """What a load of shards together left (its directory, the load's cache files in the
    stage's shared scratch) to the trash."""
    store.discard(path)
    if os.path.isdir(scratch):
        _clear(store, scratch)


def _group_of(m: Manifest, split: str) -> list[str] | None:
    """The data files of a load's `split`, in order (None when the checkout lacks them)."""
    files = m.data_files
    group = files.get(split) if isinstance(files, dict) else files
    return list(group) if group else None


def _worker(k: int) -> tuple[Any, ...]:
    """One shard in a forked worker; an error comes back as its message (it may not pickle)."""
    assert _JOB is not None
    pipe, spec, m, todo, builder, tmp = _JOB
    i, s = todo[k]
    try:
        return ("ok", i, *_build_shard(pipe, spec, m, s, builder, tmp))
    except HfbuildError as e:
        return ("error", str(e))
    except Exception as e:
        return ("error", f"stage {spec.name!r}, shard {s.label}: {type(e).__name__}: {e}")


def _publish_shard(pipe: Pipeline, key: str, path: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Publish one shard (another stage or pipeline may build the same one: the first to
    publish it wins, `Store.publish_first`); the manifest of the shard now in the store
    (ours as written, or the intact one found there)."""
    return pipe.store.publish_first(path, key, doc)


def _publish(
    pipe: Pipeline,
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
    store = pipe.store
    listed: list[list[Any]] = []
    for s in m.shard_list:
        stored = known.get(s.key) or store.intact_manifest(s.key)
        if stored is None:
            raise BuildError(
                f"stage {spec.name!r}: shard {s.label} ({s.key}) vanished from the store "
                f"while the stage was built (a concurrent `hfbuild gc`?); build it again."
            )
        # Sizes for `Store.check`; rows and content hash for the next build (`_listed`),
        # with the stamp of the manifest they were read from; an indices shard's base.
        facts = {
            "rows": stored.get("rows"),
            "content_hash": stored.get("content_hash"),
            "stamp": stored.get("stamp") or store.manifest_stamp(s.key),
            **_row_base(pipe, spec, stored),
        }
        if spec.kind == "map":
            facts["features"] = stored.get("features") or _stored_features(store, s.key)
        if isinstance(stored.get("form"), str):
            facts["form"] = stored["form"]
        # What `explain` compares a rebuild with.
        facts.update(input=s.input, before=s.before)
        if s.content:
            facts["content"] = s.content
        listed.append([s.split, s.key, s.label, stored["files"], facts])
    if spec.kind == "map":
        _check_features(spec, listed)
    if spec.kind == "load":
        _check_rows(spec, _rows_by_split(listed))
    done = Listed(listed, count, written, _is_dict(pipe, spec), names)
    return publish_list(pipe, spec, m, manifests, done, tmp, t0)


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
    pipe: Pipeline,
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
    store = pipe.store
    rows = _rows_by_split(done.rows)
    hashes = [(str(row[0]), str(row[4].get("content_hash"))) for row in done.rows]
    form = _list_form(done.as_dict, list(rows), done.rows)
    doc = entry_doc(
        spec.name,
        m,
        {i: manifests[i].fingerprint for i in spec.inputs},
        rows=rows if done.as_dict else next(iter(rows.values())),
        content_hash=shards.combined_hash(hashes),
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
    return store.publish(tmp, fp, doc)


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
    return _features_id(info.features)


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


def _listed(store: Any, name: str) -> dict[str, dict[str, Any]]:
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
    for row in rows if isinstance(rows, list) else []:
        if not (isinstance(row, list) and len(row) >= 5):
            continue
        key, files, facts = row[1], row[3], row[4]
        if not (isinstance(files, dict) and isinstance(facts, dict) and isinstance(key, str)):
            continue
        if not all(isinstance(v, int) for v in files.values()):
            continue
        if facts.get("content_hash") is None or not store.files_intact(key, files):
            continue
        if facts.get("stamp") is None or facts["stamp"] != store.manifest_stamp(key):
            continue
        out[key] = {**facts, "files": files}
    return out


def _is_dict(pipe: Pipeline, spec: StageSpec) -> bool:
    """Whether the stage's result is a DatasetDict: its sharded load's is (a sharded
    transform's input is sharded, down to a load), as the load's options say; they are in
    its key, so every entry of it says the same (no need to read the input's entry)."""
    while spec.kind != "load":
        spec = pipe[spec.inputs[0]].spec
    return shards.is_dict(spec.options)


def _build_shard(
    pipe: Pipeline,
    spec: StageSpec,
    m: Manifest,
    s: shards.Shard,
    builder: Any,
    tmp: str,
    *,
    shared: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Build one shard into a directory inside the stage's build dir; (dir, its document).
    datasets' cache files go to a scratch directory: with `shared`, the one all shards of
    the stage built one after another in this process use (two directories fewer per
    shard: `_clear` empties it after each); else the shard's own. What is left there
    goes to the store's trash (`Store.discard`), before the shard is published."""
    store = pipe.store
    t0 = time.perf_counter()
    path = tempfile.mkdtemp(dir=tmp, prefix="shard-")
    scratch = os.path.join(tmp, builder.SCRATCH) if shared else builder.scratch_dir(path)
    named = {"scratch": scratch, "tag": os.path.basename(path) + "-"}
    sources: list[Any] = []
    if spec.kind == "load":
        files = m.data_files
        group = files.get(s.split) if isinstance(files, dict) else files
        if not group or s.pos >= len(group):
            raise BuildError(
                f"load stage {spec.name!r}: the data file {s.label} is not in the checkout; "
                f"it cannot be built here."
            )
        files = {s.split: [group[s.pos]]}
        one = decided_features(spec, m)
        try:
            out = builder.run_stage(one, [], s.key, path, pipe.root, files, **named)
        except BuildError as e:
            if not builder.no_data(e.__cause__):
                raise
            # A file of no rows: datasets refuses a split of no rows, not a file of none in
            # a split with others (`_check_rows` fails the stage as datasets would).
            out = builder.empty(one.options["features"], s.split)
        if isinstance(out, dict):
            out = out[s.split]
    else:
        inp = store.load(s.input)
        one = builder.offset_indices(spec, _offset(pipe, spec, m, s))
        kept = closure.kept_state(refs.function(spec))
        out = builder.run_stage(one, [inp], s.key, path, pipe.root, **named)
        _check_kept_state(spec, s, kept, closure.kept_state(refs.function(spec)))
        sources = _sources(store, s.input, inp)
    liveness.check_built(pipe.root, m.doc)  # the code that ran is the code hashed
    info = builder.save(out, os.path.join(path, "data"), path, sources, scratch if shared else None)
    if shared:
        _clear(store, scratch)
    else:
        store.discard(scratch)  # out of the entry, before it is published
    return path, shard_doc(spec, s, info, out, time.perf_counter() - t0)


def shard_doc(
    spec: StageSpec, s: shards.Shard, info: Any, out: Any, seconds: float
) -> dict[str, Any]:
    """A built shard's manifest document (its key and checksum are added at publish)."""
    doc = {
        "stage": spec.name,
        "shard": {
            "split": s.split,
            "label": s.label,
            "input": s.input,
            "before": s.before,
            **({"content": s.content} if s.content else {}),
        },
        "rows": info.rows,
        "content_hash": info.content_hash,
        "form": info.form,
        "seconds": round(seconds, 3),
        "written_bytes": info.written_bytes,
        "hfbuild": __version__,
    }
    if info.indices is not None:
        doc["indices"] = info.indices
    if spec.kind == "map":
        doc["features"] = _features_id(out.features)
    return doc


def _features_id(features: Any) -> str:
    """A digest of a map shard's output features (`Features.to_dict`), compared across the
    stage's shards (`_check_features`)."""
    from hfbuild import canonical

    return canonical.digest(json.dumps(features.to_dict(), sort_keys=True).encode())


def _check_kept_state(
    spec: StageSpec, s: shards.Shard, before: Mapping[str, str], after: Mapping[str, str]
) -> None:
    """A shard's build left what its function keeps between calls as it found it, or the
    stage fails: its output for a file would depend on the files built before it in the
    same process (a counter, a set of rows seen), which a build of only the new files
    cannot reproduce."""
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        raise BuildError(
            f"{spec.kind} stage {spec.name!r}: its function changed {', '.join(changed[:3])} "
            f"while it ran over {s.label}: it keeps state between calls, so its output for "
            f"a file depends on the rows before it, which a build file by file cannot "
            f"reproduce. Give the stage sharded=False (it is then built whole, as plain "
            f"datasets runs it), or make the function keep no state."
        )


def decided_features(spec: StageSpec, m: Manifest) -> StageSpec:
    """A load shard's spec with the features `datasets` decides for the whole load
    (`shards.features_decider`): the stage's own `features=`, or, for parquet, the first
    data file's schema, as datasets' parquet builder reads it."""
    if spec.options.get("features") is not None:
        return spec
    files = m.data_files
    first = shards.first_file({}, files)
    if first is None:
        raise BuildError(f"load stage {spec.name!r}: it has no data file to take features from.")
    from hfbuild import builder

    try:
        features = builder.parquet_features(str(first))
    except Exception as e:
        raise BuildError(
            f"load stage {spec.name!r}: datasets takes the features of the first data file, "
            f"{first}, and reading its schema failed: {type(e).__name__}: {e}"
        ) from e
    return dataclasses.replace(spec, options={**spec.options, "features": features})


def _clear(store: Any, scratch: str) -> None:
    """Send what one shard's build left in the stage's shared scratch to the trash, keeping
    the two directory levels every build of the stage makes again (datasets' cache dir and
    its `<builder>/` directory; what a load leaves is below them, in a directory named
    after its data file's config, or a lock file): the next shard then starts from an
    empty cache, as it would in a scratch of its own."""
    for top in os.scandir(scratch):
        if not top.is_dir(follow_symlinks=False):
            store.discard(top.path)
            continue
        for sub in os.scandir(top.path):
            if not sub.is_dir(follow_symlinks=False):
                store.discard(sub.path)
                continue
            for leaf in os.scandir(sub.path):
                store.discard(leaf.path)


# -- a filter shard: indices over its input's base (indexed.py) ----------------------------------


def _sources(store: Any, key: str, inp: Any) -> list[Any]:
    """What a transform shard's result may select rows of: its input shard's base."""
    from hfbuild import indexed

    return indexed.sources(store, [key], [inp])


def _row_base(pipe: Pipeline, spec: StageSpec, stored: Mapping[str, Any]) -> dict[str, Any]:
    """For an indices shard, its base and the base's file sizes in the stage's list, so
    `Store.check` stats them as it stats the shard's own ({} for other shards). `stored` is
    the shard's manifest, or what the last listing recorded of it (`_listed`)."""
    if "base" in stored:
        return {"base": stored["base"], "base_files": stored.get("base_files")}
    ind = stored.get("indices")
    if not isinstance(ind, dict):
        return {}
    base = str(ind.get("base"))
    based = pipe.store.intact_manifest(base)
    if based is None:
        raise BuildError(
            f"stage {spec.name!r}: the entry {base} a shard selects rows of vanished from "
            f"the store while the stage was built (a concurrent `hfbuild gc`?); build it again."
        )
    # A base made of shards has no files of its own: the row then names it without sizes,
    # and `Store.check` checks the shard, its base and the base's shards in full.
    files = None if isinstance(based.get("shards"), list) else based["files"]
    return {"base": base, "base_files": files}


def _offset(pipe: Pipeline, spec: StageSpec, m: Manifest, s: shards.Shard) -> int:
    """The rows of the input shards before `s` in its split (0 unless with_indices)."""
    if not spec.options.get("with_indices") or s.pos == 0:
        return 0
    rows = 0
    for t in m.shard_list:
        if t.split == s.split and t.pos < s.pos:
            rows += int((pipe.store.read_manifest(t.input) or {}).get("rows") or 0)
    return rows


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """datasets' own bars (a map's, a save's) off while shards build: the stage's bar over
    its shards is the one a long build shows, and each bar costs more than a small shard."""
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    counts = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts
        if was_on:
            datasets.enable_progress_bars()


def _one_load_count() -> None:
    """`load_dataset` pings the Hub's download counter (a network request) on every call:
    once per stage, as for an unsharded load, not once per data file."""
    import datasets

    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
