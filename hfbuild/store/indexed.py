"""Indices entries: a result stored as a selection of another store entry's rows.

A filter keeps some of its input's rows, in order; datasets holds that as an indices mapping
(`Dataset._indices`: one uint64 column `indices`) over its input's table, and so does the
store. When a result is such a selection of a table loaded from the store (the same Arrow
buffers, `same_rows`: datasets' `filter`, `select` of a list, `shuffle`, `train_test_split`
keep them, whatever the stage kind), its entry holds only the indices, in datasets' own
layout (an Arrow stream file `indices.arrow`), with `dataset_info.json`; its manifest's
`indices` part names the *base*, the entry whose rows the indices point into, and the base's
content hash when the entry was built. Over an input that is itself an indices entry,
datasets' indices are already relative to the underlying table, so the base is the input's
base: an indices entry never points at another indices entry. A result whose indices point
into any other table (a temporary one inside an apply) is written in full, as before
(`builder`).

The `indices` part of a manifest: `{"base": fp, "base_hash": h, "dict": bool, "parts":
[{"dir": "" (a Dataset) or the split's name, "split": Dataset.split, "base_split": the
base's split (None when the base is a Dataset), "fingerprint": Dataset._fingerprint}]}`.

Owns: recognising such a result (`selection`), writing its files (`write`), reading it back
over its loaded base (`load`), and the indices of consecutive shards concatenated
(`concat_indices`).
Must never: write table rows, name a base that is not an entry of the store, or import
`datasets`/`pyarrow` at module level (the store imports this module).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

from hfbuild.store.paths import safe_rel

INDICES_FILE = "indices.arrow"
INFO_FILE = "dataset_info.json"


class Source(NamedTuple):
    """A loaded input whose rows an entry may select: the entry holding its table rows
    (`base`, the input itself or its own base), that entry's content hash, and each table
    object the loaded input holds with the base's split it came from."""

    base: str
    base_hash: str
    tables: list[tuple[Any, str | None]]


class Part(NamedTuple):
    """One Dataset of a result (`dir` "" for a Dataset, else its split) and its base split."""

    dir: str
    ds: Any
    base_split: str | None


def _splits(ds: Any) -> list[tuple[str, Any]]:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        return [(str(s), d) for s, d in ds.items()]
    return [("", ds)]


def sources(store: Any, fps: Sequence[str], loaded: Sequence[Any]) -> list[Source]:
    """What each loaded input (`store.load(fp)` for `fp` in `fps`) offers as a base."""
    out = []
    for fp, ds in zip(fps, loaded, strict=True):
        doc = store.read_manifest(fp)
        if doc is None:
            continue
        ind = doc.get("indices")
        parts = _splits(ds)
        if isinstance(ind, dict):
            by_dir = {str(p.get("dir")): p.get("base_split") for p in ind.get("parts") or []}
            tables = [(d.data.table, by_dir.get(name)) for name, d in parts]
            out.append(Source(str(ind["base"]), str(ind.get("base_hash")), tables))
        else:
            tables = [(d.data.table, name or None) for name, d in parts]
            out.append(Source(fp, str(doc.get("content_hash")), tables))
    return out


def _plain_format(ds: Any) -> bool:
    return (
        ds._format_type is None
        and ds._format_columns is None
        and not ds._format_kwargs
        and not ds._output_all_columns
    )


def selection(result: Any, candidates: Sequence[Source]) -> tuple[Source, list[Part]] | None:
    """The source `result` is a selection of (every split of it an indices mapping over one
    of that source's tables, with no output format set), and its parts; else None."""
    parts = _splits(result)
    for src in candidates:
        found: list[Part] = []
        for name, ds in parts:
            if name and not safe_rel(name):
                return None
            idx = ds._indices
            if idx is None or idx.column_names != ["indices"] or not _plain_format(ds):
                return None
            table = ds.data.table
            hit = [split for t, split in src.tables if same_rows(t, table)]
            if not hit:
                break
            found.append(Part(name, ds, hit[0]))
        else:
            return src, found
    return None


def same_rows(a: Any, b: Any) -> bool:
    """Two Arrow tables are views of the same memory: the same columns (names, types) and
    chunks over the very same buffers (addresses) at the same offsets. datasets rebuilds its
    table object around a selection (`Dataset(self._data, ...)` replaces schema metadata), so
    the object itself is not kept; its buffers are, and equal buffers are equal rows."""
    if a is b:
        return True
    if a.num_rows != b.num_rows or a.column_names != b.column_names:
        return False
    for x, y in zip(a.columns, b.columns, strict=True):
        if x.type != y.type or x.num_chunks != y.num_chunks:
            return False
        for p, q in zip(x.chunks, y.chunks, strict=True):
            if p.offset != q.offset or len(p) != len(q):
                return False
            bp, bq = p.buffers(), q.buffers()
            if len(bp) != len(bq):
                return False
            for u, v in zip(bp, bq, strict=True):
                if (u is None) != (v is None) or (
                    u is not None and (u.address, u.size) != (v.address, v.size)
                ):
                    return False
    return True


def write(
    dest: str, src: Source, parts: Sequence[Part], as_dict: bool, owned: Sequence[str] = ()
) -> dict[str, Any]:
    """Write each part's indices and info under `dest`; the manifest's `indices` part. An
    indices file datasets wrote in one of the `owned` directories (the build's: a filter's
    cache file) is moved into place rather than written again."""
    import pyarrow as pa
    from datasets.utils.py_utils import asdict  # the one save_to_disk uses

    listed = []
    for p in parts:
        d = os.path.join(dest, p.dir) if p.dir else dest
        os.makedirs(d, exist_ok=True)
        own = _owned_file(p.ds._indices, owned)
        if own is not None:
            os.rename(own, os.path.join(d, INDICES_FILE))
        else:
            table = p.ds._indices.table
            with (
                pa.OSFile(os.path.join(d, INDICES_FILE), "wb") as sink,
                pa.ipc.new_stream(sink, table.schema) as writer,
            ):
                writer.write_table(table)
        info = asdict(p.ds._info)
        with open(os.path.join(d, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump({k: info[k] for k in sorted(info)}, f, indent=2)
        listed.append(
            {
                "dir": p.dir,
                "split": str(p.ds.split) if p.ds.split is not None else None,
                "base_split": p.base_split,
                "fingerprint": p.ds._fingerprint,
            }
        )
    return {"base": src.base, "base_hash": src.base_hash, "dict": as_dict, "parts": listed}


def _owned_file(indices: Any, owned: Sequence[str]) -> str | None:
    """The file holding exactly `indices` (a memory-mapped table, datasets' one `indices`
    column of uint64, with nothing pending on it but new schema metadata: the positions
    are the file's), when it is in an `owned` directory."""
    import pyarrow as pa
    from datasets.table import MemoryMappedTable

    if not owned or not isinstance(indices, MemoryMappedTable):
        return None
    if any(op[0] != "replace_schema_metadata" for op in indices.replays):
        return None
    if indices.schema.names != ["indices"] or indices.schema.types != [pa.uint64()]:
        return None
    path = os.path.realpath(str(indices.path))
    if not path.startswith(tuple(os.path.realpath(d) + os.sep for d in owned)):
        return None
    return path


def load(data: str, ind: dict[str, Any], base: Any, key: str) -> Any:
    """The Dataset (or DatasetDict) an indices entry holds: its memory-mapped indices over
    `base`, the loaded base entry (no row is copied)."""
    import datasets
    from datasets.table import MemoryMappedTable

    out = {}
    for p in ind["parts"]:
        name = str(p["dir"])
        if name and not safe_rel(name):
            raise ValueError(f"unsafe part name {name!r}")
        d = os.path.join(data, name) if name else data
        with open(os.path.join(d, INFO_FILE), encoding="utf-8") as f:
            info = datasets.DatasetInfo.from_dict(json.load(f))
        rows = base[p["base_split"]] if p.get("base_split") is not None else base
        split = datasets.Split(p["split"]) if p.get("split") is not None else None
        out[name] = datasets.Dataset(
            rows._data,
            info=info,
            split=split,
            indices_table=MemoryMappedTable.from_file(os.path.join(d, INDICES_FILE)),
            fingerprint=str(p.get("fingerprint") or key),
        )
    if ind.get("dict"):
        return datasets.DatasetDict(out)
    return out[""]


def read_indices(path: str) -> Any:
    """An indices file's positions, memory-mapped (a numpy uint64 array)."""
    import numpy as np
    from datasets.table import MemoryMappedTable

    col = MemoryMappedTable.from_file(path).column(0)
    if col.num_chunks == 1:
        return col.chunk(0).to_numpy()
    return np.asarray(col.to_numpy(), dtype=np.uint64)


def concat_indices(parts: Sequence[tuple[int, Any]]) -> Any:
    """The indices table of consecutive shards over their tables concatenated: each shard's
    (rows of its table, its positions or None for all rows) shifted by the rows before it."""
    import numpy as np
    import pyarrow as pa
    from datasets.table import InMemoryTable

    arrays = []
    offset = 0
    for n, idx in parts:
        if idx is None:
            arrays.append(np.arange(offset, offset + n, dtype=np.uint64))
        else:
            arrays.append(idx.astype(np.uint64, copy=False) + np.uint64(offset))
        offset += n
    joined = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint64)
    return InMemoryTable(pa.table({"indices": pa.array(joined, type=pa.uint64())}))
