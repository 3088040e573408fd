"""Packs, as a sharded build makes and finds them (`keys/packs.py` keys them).

Owns: writing one load's rows as a pack (`write`: one part in the `save_to_disk` layout,
each shard's row range hashed as its own entry's would be), a batched stage's units built
now as packs (`of_results`: which results may be rows of one pack, `write_results`: several
results of one split written as one pack), publishing it (`publish`: an
ordinary entry keyed by its shards' keys, its manifest's `pack` listing each shard's key,
row range, content hash and label; the first to publish it wins), finding a listed shard
in a pack whose manifest was written again since (`in_pack`), a Ray task's shards built as
entries of their own written as packs, those entries then removed (`of_entries`), what a
list records of a shard of a pack in the store (`packed`), and writing a packed shard out
as a shard entry of its own from its pack's files, the same bytes in every store
(`unpack_from`; `unpack`, by a list's row).

Must never: publish a pack before every shard in it is keyed, list a shard under a range
whose content hash it does not have, or print.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from hfbuild.core.errors import BuildError
from hfbuild.core.spec import StageSpec
from hfbuild.keys import packs

if TYPE_CHECKING:
    from hfbuild.keys.place import Place


# A pack of results (`of_results`) holds at most this many bytes of rows (as save_to_disk's
# shards: a filter's selected rows are gathered in memory before they are written).
PACK_BYTES = 500 << 20


class Pack(NamedTuple):
    """The shards of one split a load built together (or a batched stage's units built
    now), written as one pack (`packs`): its
    directory (the entry's files, in `data/`), its description (rows, content hash, form,
    bytes written) and, per shard, (its position in the stage, its document with `span`,
    its rows in the pack)."""

    path: str
    info: Any
    shards: list[tuple[int, dict[str, Any]]]


def write(parts: Any, counts: list[int], dest: str, fingerprint: str) -> tuple[Any, list[str]]:
    """Every row of a load's result (`parts`, its `builder.PartWriter`), `counts` consecutive
    ranges of them from the first (they add up to the whole), written at `dest` as one part
    with the state `fingerprint`; (the pack's description, each range's content hash, taken
    of what was written as a part's is: the hash does not depend on chunking, so a range's
    is the hash its own part would have had)."""
    import pyarrow as pa

    from hfbuild.store.content import table_hash

    info = parts.write(0, sum(counts), dest, fingerprint)
    if info.rows != sum(counts):
        raise BuildError(f"a pack of {sum(counts)} rows was written with {info.rows}")
    with pa.memory_map(os.path.join(dest, parts.NAME)) as source:
        written = pa.ipc.open_stream(source).read_all()
    if written.num_rows != sum(counts):
        raise BuildError(f"a pack of {sum(counts)} rows holds {written.num_rows}")
    hashes = []
    start = 0
    for n in counts:
        hashes.append(table_hash(written.slice(start, n)))
        start += n
    return info, hashes


def of_results(results: Sequence[tuple[str, Any]]) -> list[list[int]]:
    """Which of `results` ((split, Dataset) in order: a batched stage's units built now) are
    kept as packs: runs of positions, in order, of results of one split and one form
    (features and format: a pack has one schema) with no format set and no feature whose
    save embeds external files (`save_to_disk` would; a pack writes the table as it is), at
    most `PACK_BYTES` each, two or more to a pack. The others are entries of their own (a
    map's unit of no rows has its input's features)."""
    from datasets.features.features import require_storage_embed

    from hfbuild.builds.builder import form_of

    runs: dict[tuple[str, str], list[list[int]]] = {}
    sizes: dict[tuple[str, str], int] = {}
    for i, (split, ds) in enumerate(results):
        if ds.format.get("type") is not None or require_storage_embed(ds.features):
            continue
        group = (split, form_of(ds))
        table = ds.data
        size = table.nbytes * len(ds) // max(table.num_rows, 1)  # a selection's share
        if group not in runs or sizes[group] + size > PACK_BYTES:
            runs.setdefault(group, []).append([])
            sizes[group] = 0
        runs[group][-1].append(i)
        sizes[group] += size
    return [run for each in runs.values() for run in each if len(run) >= 2]


def write_results(results: Sequence[Any], dest: str, fingerprint: str) -> tuple[Any, list[str]]:
    """`results` (Datasets of one split and one form, `of_results`), in order, written at
    `dest` as one pack with the state `fingerprint`, each a row range of it (`write`): their
    tables concatenated (a selection's rows, a filter's, taken from its table first, as
    saving it would), with the first one's info and split."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    from hfbuild.builds import builder

    tables = []
    for r in results:
        table = r.data.table
        tables.append(table if r._indices is None else table.take(r._indices.column(0)))
    first = results[0]
    whole = datasets.Dataset(
        InMemoryTable(pa.concat_tables(tables)),
        info=first.info.copy(),
        split=first.split,
        fingerprint=fingerprint,
    )
    return write(builder.PartWriter(whole), [len(r) for r in results], dest, fingerprint)


def publish(
    place: Place, spec: StageSpec, keys: Sequence[str], pack: Pack
) -> dict[str, dict[str, Any]]:
    """Publish a pack (`packs.py`: one entry holding the rows of shards built together,
    keyed by their keys; the first to publish it wins, as for a shard); for each of its
    shards, what the stage's list records of it (rows, content hash, form, the pack's
    files and manifest stamp, the pack and the shard's row range in it)."""
    store = place.store
    rows = [
        [key, doc["span"][0], doc["span"][1], doc["content_hash"], doc["shard"]["label"]]
        for key, (_, doc) in zip(keys, pack.shards, strict=True)
    ]
    doc = {
        "stage": spec.name,
        "pack": rows,
        "rows": pack.info.rows,
        "content_hash": pack.info.content_hash,
        "form": pack.info.form,
        "written_bytes": pack.info.written_bytes,
        "hfbuild": pack.shards[0][1]["hfbuild"],
    }
    features = {d.get("features") for _, d in pack.shards}
    if features != {None}:  # a map's units: one schema, so one features digest
        (doc["features"],) = features
    fp = packs.pack_key(keys)
    stored = store.publish_first(pack.path, fp, doc)
    return _listed_facts(stored, fp, store.manifest_stamp(fp))


def _listed_facts(stored: dict[str, Any], fp: str, stamp: Any) -> dict[str, dict[str, Any]]:
    """For each shard of the pack `fp` (its manifest `stored`, its stamp `stamp`), what a
    stage's list records of it."""
    out: dict[str, dict[str, Any]] = {}
    for key, start, end, content_hash, _ in stored["pack"]:
        out[key] = {
            "rows": end - start,
            "content_hash": content_hash,
            "form": stored.get("form"),
            "files": stored["files"],
            "stamp": stamp,
            "pack": fp,
            "span": [start, end],
        }
        if "features" in stored:
            out[key]["features"] = stored["features"]
    return out


def packed(store: Any, pack: str, key: str) -> dict[str, Any] | None:
    """What a stage's list records of shard `key`, a row range of the pack `pack` as this
    store holds it intact (`publish`'s facts), else None (no such pack, or it lacks `key`)."""
    return (packed_all(store, pack) or {}).get(key)


def packed_all(store: Any, pack: str) -> dict[str, dict[str, Any]] | None:
    """`packed` for every shard of the pack `pack` (by key), read once; None when this
    store holds no such pack intact."""
    doc = store.intact_manifest(pack)
    if doc is None or not isinstance(doc.get("pack"), list):
        return None
    return _listed_facts(doc, pack, store.manifest_stamp(pack))


def of_entries(place: Place, spec: StageSpec, keys: Sequence[str]) -> dict[str, str]:
    """Shards of `spec` built in `place.store` as entries of their own (`keys`, in order: a
    Ray task's), runs of them (`of_results`: one split and form; a shard of no rows, or a
    selection of its input's rows, keeps its own entry) written as packs and published
    there (`publish`), each range checked to have its shard's content hash; each packed
    shard's key -> its pack's key."""
    store = place.store
    docs = [store.intact_manifest(k) or {} for k in keys]
    fit = [
        i for i, d in enumerate(docs) if d.get("rows") and "indices" not in d and "pack" not in d
    ]
    loaded = [store.load(keys[i]) for i in fit]
    out: dict[str, str] = {}
    splits = [str(docs[i]["shard"]["split"]) for i in fit]
    for run in of_results(list(zip(splits, loaded, strict=True))):
        members = [fit[j] for j in run]
        run_keys = [keys[i] for i in members]
        fp = packs.pack_key(run_keys)
        if store.intact_manifest(fp) is None:  # else built by an earlier attempt
            _pack_entries(place, spec, [(keys[i], docs[i]) for i in members], loaded, run)
        for key in run_keys:
            # Its rows are the pack's: wherever a packed shard is an entry of its own, it
            # is written out of the pack (`unpack_from`), so every store holds the same
            # files for it.
            store.remove(key)
        out.update(dict.fromkeys(run_keys, fp))
    return out


def _pack_entries(
    place: Place,
    spec: StageSpec,
    members: list[tuple[str, dict[str, Any]]],
    loaded: list[Any],
    run: list[int],
) -> None:
    """The shards `members` ((key, manifest) each, their Datasets `loaded[j]` for `j` in
    `run`) written as one pack and published (`publish`)."""
    store = place.store
    keys = [k for k, _ in members]
    fp = packs.pack_key(keys)
    dest = store.new_build_dir(fp)
    try:
        info, hashes = write_results([loaded[j] for j in run], os.path.join(dest, "data"), fp[:64])
        if hashes != [str(d.get("content_hash")) for _, d in members]:
            raise BuildError(
                f"stage {spec.name!r}: shards written as one pack do not keep their content "
                f"hashes; build with the local executor (`--executor local`)."
            )
        shards: list[tuple[int, dict[str, Any]]] = []
        start = 0
        for i, (_, d) in enumerate(members):
            doc = {**d, "span": [start, start + int(d["rows"])]}
            start += int(d["rows"])
            shards.append((i, doc))
        publish(place, spec, keys, Pack(dest, info, shards))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def in_pack(
    store: Any,
    pack: str,
    key: str,
    facts: dict[str, Any],
    read: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """What a list records of shard `key`, a row range of the intact pack `pack` with the
    span and content hash `facts` gives it (its files and manifest stamp now), else None.
    `read`: the packs this caller looked up already, by name (a list names one pack in
    many rows: its manifest is read and checked once, not once a row)."""
    got = read.get(pack) if read is not None else None
    if got is None:
        doc = store.intact_manifest(pack)
        ranges: dict[tuple[Any, ...], Any] = {}
        for row in (doc or {}).get("pack") or []:
            ranges.setdefault((row[0], row[1], row[2]), row[3])  # the first, as a scan finds
        stamp = store.manifest_stamp(pack) if doc is not None else None
        got = (ranges, (doc or {}).get("files"), stamp)
        if read is not None:
            read[pack] = got
    ranges, files, stamp = got
    span = facts.get("span")
    if not (isinstance(span, list) and len(span) == 2):
        return None
    found = (key, span[0], span[1])
    if found not in ranges or ranges[found] != facts.get("content_hash"):
        return None
    return {**facts, "files": files, "stamp": stamp}


def unpack(place: Place, via: str, keys: Sequence[str]) -> None:
    """Each of the input shards `keys` that the list `via` keeps as a row range of a pack,
    written out of its pack as a shard entry of its own (`unpack_from`), so a worker pulls
    it by its key as any input shard."""
    from hfbuild.store.entry import row_pack

    store = place.store
    for key in keys:
        row = store.listed_row(via, key)
        where = row_pack(row) if row is not None else None
        if row is None or where is None or store.has(key):
            continue
        facts = row[4]
        shard = {"split": row[0], "label": row[2], "input": facts.get("input")}
        shard["before"] = facts.get("before") or ""
        unpack_from(place, where[0], key, shard)


def unpack_from(place: Place, pack: str, key: str, shard: dict[str, Any]) -> None:
    """Shard `key`, a row range of the pack `pack` this store holds intact (built here, or
    pulled: checked whole and range by range), written out as a shard entry of its own
    (the layout a load shard built by itself has; `shard`: its split, label, input and
    `before`, as its stage's list records them), refused unless its rows have the content
    hash the pack gives them. Every store writes a packed shard out by this function, from
    the pack's own files, so two stores holding it hold the same files (a filter's list
    records its shards' bases' files)."""
    from hfbuild.builds import builder
    from hfbuild.core.version import __version__

    store = place.store
    if store.has(key):
        return
    doc = store.intact_manifest(pack) or {}
    row = next((r for r in doc.get("pack") or [] if r[0] == key), None)
    if row is None:
        raise BuildError(f"input shard {shard.get('label')} ({key}) is not in the pack {pack}.")
    ds = store.load(pack)
    tmp = store.new_build_dir(key)
    try:
        dest = os.path.join(tmp, "data")
        info = builder.PartWriter(ds).write(int(row[1]), row[2] - row[1], dest, key[:64])
        if info.content_hash != row[3]:
            raise BuildError(
                f"input shard {shard.get('label')} ({key}): its rows in the pack {pack} do "
                f"not have the content hash its manifest records; run `hfbuild verify --deep`."
            )
        doc = {
            "stage": doc.get("stage"),
            "shard": shard,
            "rows": info.rows,
            "content_hash": info.content_hash,
            "form": info.form,
            "seconds": 0.0,
            "written_bytes": info.written_bytes,
            "hfbuild": __version__,
        }
        store.publish_first(tmp, key, doc)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
