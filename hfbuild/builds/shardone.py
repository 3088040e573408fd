"""Building one shard of a sharded stage, as a sharded build builds each.

Owns: one shard's build into a directory of its own inside the stage's build directory (a
load shard from its one data file, with the features `datasets` decides for the whole load;
a transform shard from its input shard, with its `with_indices` offset), the missing shards
of one split of a parquet load loaded together and cut by their files' row counts, a built
shard's document, its scratch to the store's trash, the check that the function kept no
state between shards, and a shard entry's files made the files of another key (`rekeyed`).
`shardbuild` orders a stage's shards and publishes them; `shardunits` builds one shard as a
unit of work of its own (`build_one`).

Must never: publish anything, or print.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hfbuild.builds import packbuild, rekey
from hfbuild.core.errors import BuildError
from hfbuild.core.spec import StageSpec
from hfbuild.core.version import __version__
from hfbuild.keys import shards
from hfbuild.keys.manifest import Manifest, Shard
from hfbuild.source import closure, liveness, refs
from hfbuild.store.paths import tree_size

if TYPE_CHECKING:
    from hfbuild.keys.place import Place


def build_one(
    place: Place, spec: StageSpec, m: Manifest, s: Shard, tmp: str, listed: list[Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """Build shard `s` of `m` by itself, exactly as `build` builds each shard, into a new
    directory inside `tmp`; (that directory, the shard's document). Nothing is published:
    for a shard built as a unit of work of its own (`shardunits`). A `with_indices` transform
    whose input shards before it are not in this store gets its offset in `spec` already
    (`builder.offset_indices`), with `s` at position 0. `listed`: a transform shard's input
    shard's row as its stage's list records it (a row range of a pack), read from there."""
    from hfbuild.builds import builder

    with quiet_datasets():
        return build_shard(place, spec, m, s, builder, tmp, listed=listed)


def together(spec: StageSpec) -> bool:
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


def load_together(
    place: Place,
    spec: StageSpec,
    m: Manifest,
    todo: Sequence[tuple[int, Shard]],
    builder: Any,
    tmp: str,
) -> packbuild.Pack | None:
    """The shards of `todo` (one split's, in order) loaded by one `load_dataset` over their
    files with the features datasets decides for the whole load, each shard then the rows
    of its file (its footer's row count; the rows of a parquet load are its files' rows in
    order): what loading each file by itself gives, without datasets' per-call cost (builder,
    locks, thread pools: ~12 ms a file), written as one pack whose row ranges are the
    shards (each with the content hash its own entry would have: `PartWriter.write_pack`).
    None where that cannot be done (not `together`, fewer than two files, or the load
    failed: each file is then loaded by itself, which names the file a failure is about)."""
    if len(todo) < 2 or not together(spec):
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
        out = builder.run_stage(one, [], todo[0][1].key, path, place.root, {split: paths}, **named)
    except (BuildError, OSError):
        _drop(place.store, path, scratch)
        return None
    if isinstance(out, dict):
        out = out[split]
    if sum(counts) != len(out):
        _drop(place.store, path, scratch)
        return None
    loaded = tree_size(scratch)  # the load's cache files, counted with the pack
    liveness.check_built(place.root, m.doc)  # the code that ran is the code hashed
    dest = tempfile.mkdtemp(dir=tmp, prefix="pack-")
    parts = builder.PartWriter(out)
    info, hashes = packbuild.write(parts, counts, os.path.join(dest, "data"), todo[0][1].key[:64])
    each = (time.perf_counter() - t0) / len(todo)
    done = []
    start = 0
    for (i, s), n, h in zip(todo, counts, hashes, strict=True):
        part = builder.SaveInfo(n, h, 0, None, info.form)
        doc = shard_doc(spec, s, part, out, each)
        doc["span"] = [start, start + n]
        start += n
        done.append((i, doc))
    del out, parts
    _drop(place.store, path, scratch)
    return packbuild.Pack(dest, info._replace(written_bytes=info.written_bytes + loaded), done)


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


def build_shard(
    place: Place,
    spec: StageSpec,
    m: Manifest,
    s: Shard,
    builder: Any,
    tmp: str,
    *,
    shared: bool = False,
    via: str | None = None,
    listed: list[Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Build one shard into a directory inside the stage's build dir; (dir, its document).
    datasets' cache files go to a scratch directory: with `shared`, the one all shards of
    the stage built one after another in this process use (two directories fewer per
    shard: `_clear` empties it after each); else the shard's own. What is left there
    goes to the store's trash (`Store.discard`), before the shard is published. A transform
    shard's input: its own entry, else its row of the list `via`, or the row `listed` (a
    row range of a pack, found without its list)."""
    store = place.store
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
            out = builder.run_stage(one, [], s.key, path, place.root, files, **named)
        except BuildError as e:
            if not builder.no_data(e.__cause__):
                raise
            # A file of no rows: datasets refuses a split of no rows, not a file of none in
            # a split with others (`_check_rows` fails the stage as datasets would).
            out = builder.empty(one.options["features"], s.split)
        if isinstance(out, dict):
            out = out[s.split]
    else:
        if listed is not None:  # its rows read in place from their pack
            inp = store.load_listed(s.input, str(listed[0]), [listed])
        else:
            inp = store.load_shard(s.input, via)  # a packed input shard: its row of `via`
        one = builder.offset_indices(spec, _offset(place, spec, m, s, via))
        kept = closure.kept_state(refs.function(spec))
        out = builder.run_stage(one, [inp], s.key, path, place.root, **named)
        check_kept_state(spec, s, kept, closure.kept_state(refs.function(spec)))
        sources = input_sources(store, s.input, inp)
    liveness.check_built(place.root, m.doc)  # the code that ran is the code hashed
    info = builder.save(out, os.path.join(path, "data"), path, sources, scratch if shared else None)
    if shared:
        _clear(store, scratch)
    else:
        store.discard(scratch)  # out of the entry, before it is published
    return path, shard_doc(spec, s, info, out, time.perf_counter() - t0)


def rekeyed(place: Place, old: str, new: str, tmp: str) -> tuple[str, dict[str, Any]] | None:
    """Shard `new` made from the intact shard entry `old`, without running the transform:
    for a shard whose key changed during its stage's build only by files read after it
    was built (`shardbuild`), which its own build did not read (`_as_keyed`). None when
    `old` is not intact, is a pack, or holds its key otherwise."""
    store = place.store
    doc = store.intact_manifest(old)
    if doc is None or "pack" in doc or len(old) != len(new) or old == new:
        return None
    kept = {k: v for k, v in doc.items() if k not in ("files", "fingerprint", "ids", "stamp")}
    return _as_keyed(store, store.data_path(old), doc["files"], kept, old, new, tmp)


def keyed_as(
    store: Any, path: str, doc: dict[str, Any], old: str, new: str, tmp: str
) -> tuple[str, dict[str, Any]]:
    """A shard built now under key `old` (its entry's directory `path`, its document), to
    be published under `new` (`shardbuild`: its build, or one before it, read files `old`
    lacks): written under `new` (`_as_keyed`); as it is when the keys are one or its files
    cannot be rewritten."""
    if old == new:
        return path, doc
    data = os.path.join(path, "data")
    got = _as_keyed(store, data, rekey.files_of(data), doc, old, new, tmp)
    if got is None:
        return path, doc
    store.discard(path)
    return got


def _as_keyed(
    store: Any, data: str, files: Any, doc: dict[str, Any], old: str, new: str, tmp: str
) -> tuple[str, dict[str, Any]] | None:
    """A directory inside `tmp` holding the files `files` of `data` with key `old` replaced
    by `new` where datasets writes it (an Arrow file's schema message, `state.json`): the
    bytes a build under `new` writes; and `doc`, an indices entry's parts naming `new` as
    their fingerprint, as `indexed.write` names the Dataset's. None for another layout."""
    path = rekey.rewritten(store, data, files, old, new, tmp, "shard-")
    if path is None:
        return None  # not the stream `_same_rows_file` knows
    if "indices" in doc:  # its parts name the Dataset's fingerprint: `old`
        doc = {**doc, "indices": json.loads(json.dumps(doc["indices"]).replace(old, new))}
    return path, {**doc, "written_bytes": tree_size(path)}


def shard_doc(spec: StageSpec, s: Shard, info: Any, out: Any, seconds: float) -> dict[str, Any]:
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
        doc["features"] = features_id(out.features)
    return doc


def features_id(features: Any) -> str:
    """A digest of a map shard's output features (`Features.to_dict`), compared across the
    stage's shards (`_check_features`)."""
    from hfbuild.core import canonical

    return canonical.digest(json.dumps(features.to_dict(), sort_keys=True).encode())


def check_kept_state(
    spec: StageSpec, s: Shard, before: Mapping[str, str], after: Mapping[str, str]
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
    features = schema_features(spec, first_schema(spec, m))
    return dataclasses.replace(spec, options={**spec.options, "features": features})


def first_schema(spec: StageSpec, m: Manifest) -> str:
    """The Arrow schema of a parquet load's first data file (`pq.read_schema`, as datasets'
    parquet builder reads it), serialized (base64 of Arrow's IPC form, metadata and all):
    what decides its shards' features (`schema_features`), read with pyarrow alone, so a
    Ray driver sends it without importing datasets (`raytree`)."""
    import base64

    first = shards.first_file({}, m.data_files)
    if first is None:
        raise BuildError(f"load stage {spec.name!r}: it has no data file to take features from.")
    try:
        import pyarrow.parquet as pq

        with open(str(first), "rb") as f:
            schema = pq.read_schema(f)
    except Exception as e:
        raise _schema_error(spec, first, e) from e
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def schema_features(spec: StageSpec, schema: str, first: object = "") -> Any:
    """The features datasets gives a parquet load whose first data file's schema is
    `schema` (`first_schema`): `Features.from_arrow_schema`, as its parquet builder makes
    them (`first`: that file's name, for the error)."""
    import base64

    import datasets
    import pyarrow as pa

    try:
        arrow = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(schema)))
        return datasets.Features.from_arrow_schema(arrow)
    except Exception as e:
        raise _schema_error(spec, first or "its first data file", e) from e


def _schema_error(spec: StageSpec, first: object, e: Exception) -> BuildError:
    return BuildError(
        f"load stage {spec.name!r}: datasets takes the features of the first data file, "
        f"{first}, and reading its schema failed: {type(e).__name__}: {e}"
    )


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


def input_sources(store: Any, key: str, inp: Any) -> list[Any]:
    """What a transform shard's result may select rows of: its input shard's base."""
    from hfbuild.store import indexed

    return indexed.sources(store, [key], [inp])


def _offset(place: Place, spec: StageSpec, m: Manifest, s: Shard, via: str | None) -> int:
    """The rows of the input shards before `s` in its split (0 unless with_indices), as
    the input's list `via` records them (else each input shard's manifest)."""
    if not spec.options.get("with_indices") or s.pos == 0:
        return 0
    rows = 0
    store = place.store
    for t in m.shard_list:
        if t.split == s.split and t.pos < s.pos:
            row = store.listed_row(via, t.input) if via is not None else None
            facts = row[4] if row is not None else store.read_manifest(t.input) or {}
            rows += int(facts.get("rows") or 0)
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


def one_load_count() -> None:
    """`load_dataset` pings the Hub's download counter (a network request) on every call:
    once per stage, as for an unsharded load, not once per data file."""
    import datasets

    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
