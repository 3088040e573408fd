"""Loading a store entry as a Dataset or DatasetDict.

Owns: `Loader`: an entry in the `save_to_disk` layout by `load_from_disk`, memory-mapped; one
shard entry (Arrow files, no indices, no format) memory-mapped without `load_from_disk`'s
per-call overhead; a stage result made of shards as the concatenation of its shards, split by
split (one table over their memory-mapped files when their schemas agree, the indices of
indices shards shifted into one mapping; else `concatenate_datasets`); some consecutive rows of
one split (`load_listed`) and their features alone (`listed_features`: the Arrow files'
schemas, no record batch read); an indices entry over its loaded base (`indexed.py`).

Must never: unpickle or execute anything it reads (`load_from_disk` reads Arrow files and
JSON), check an entry (the caller's `has` does), import `datasets` at module level.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from hfbuild.core.errors import StoreError
from hfbuild.store.entry import (
    Manifests,
    row_base,
    row_indexed,
    row_owner,
    row_pack,
    without_empty,
)
from hfbuild.store.paths import FP, Layout, safe_rel


class Loader:
    """Loads the entries of one store. `has` tells whether an entry is there intact."""

    def __init__(self, layout: Layout, manifests: Manifests, has: Callable[[str], bool]) -> None:
        self.layout = layout
        self.manifests = manifests
        self._has = has
        self._rows: dict[str, dict[str, list[Any]]] = {}  # list -> its rows by shard key
        self._packs: dict[str, tuple[Any, Any]] = {}  # a pack's files -> (identities, table)

    def load(self, fp: str) -> Any:
        """The stored Dataset or DatasetDict, memory-mapped. Nothing is unpickled:
        `load_from_disk` reads Arrow files and JSON. A result made of shards is their
        concatenation, split by split, over the memory-mapped shard files (no copy)."""
        import datasets

        doc = self.manifests.read(fp)
        if doc is not None and isinstance(doc.get("indices"), dict):
            return self.load_indices(fp, doc, self.layout.data_path(fp))
        if doc is not None and isinstance(doc.get("shards"), list):
            return self._load_shards(doc)
        if doc is not None and isinstance(doc.get("shard"), dict):
            return self._load_shard(fp, str(doc["shard"].get("split")))
        return datasets.load_from_disk(self.layout.data_path(fp), keep_in_memory=False)

    def load_indices(self, fp: str, doc: dict[str, Any], data: str) -> Any:
        """An indices entry (`indexed.py`) whose files are at `data` (its entry's, or a
        download's), over its base, loaded from this store."""
        from hfbuild.store import indexed

        ind = doc["indices"]
        base = str(ind.get("base"))
        if not FP.match(base) or not self._has(base):
            raise StoreError(
                f"the entry {fp} selects rows of {base!r}, which the store does not hold "
                f"intact; build it again (`doit run`)."
            )
        return indexed.load(data, ind, self.load(base), fp)

    def _load_shard(self, key: str, split: str) -> Any:
        """One shard entry (a Dataset saved by hfbuild: Arrow files, no indices, no format),
        its files memory-mapped as `load_from_disk` does, without its per-call overhead."""
        import datasets
        from datasets.table import MemoryMappedTable

        base = self.layout.data_path(key)
        with open(os.path.join(base, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
        with open(os.path.join(base, "dataset_info.json"), encoding="utf-8") as f:
            info = datasets.DatasetInfo.from_dict(json.load(f))
        names = [str(d.get("filename")) for d in state["_data_files"]]
        if not all(safe_rel(n) for n in names):
            raise StoreError(f"shard {key} lists unsafe file names; run `hfbuild verify --deep`.")
        tables = [MemoryMappedTable.from_file(os.path.join(base, n)) for n in names]
        table = tables[0] if len(tables) == 1 else datasets.table.concat_tables(tables)
        return datasets.Dataset(table, info=info, split=datasets.Split(split), fingerprint=key)

    def load_listed(self, fp: str, split: str, rows: list[list[Any]]) -> Any:
        """Some of the shard rows of one split of the list `fp` (consecutive, in its order),
        as one Dataset over their memory-mapped files, as `load` concatenates a split's:
        what a unit reading a few of a thousand input shards loads."""
        return self._concat_shards(fp, split, without_empty(rows))

    def listed_features(self, fp: str, split: str, rows: list[list[Any]]) -> Any:
        """The features `load_listed(fp, split, rows)` gives, from the schemas of the rows'
        Arrow files and the first's `dataset_info.json`, as datasets makes a Dataset's
        features from the two, without reading their record batches: a unit's build asks
        for its input split's first shard's, and mapping that shard's pack (a million rows,
        a thousand record batches) to learn them cost ~5 ms. A row that is not a plain one
        (no files listed, an indices shard, a base) or files of differing schemas: from the
        rows loaded, as before."""
        import datasets
        import pyarrow as pa
        from datasets.table import InMemoryTable

        from hfbuild.store import indexed

        kept = without_empty(rows)
        schemas: list[Any] = []
        for row in kept:
            files = row[3] if len(row) >= 4 and isinstance(row[3], dict) else None
            if (
                files is None
                or row_base(row) is not None
                or row_indexed(row)
                or indexed.INDICES_FILE in files
            ):
                return self.load_listed(fp, split, rows).features
            data = self.layout.data_path(row_owner(row))
            for n in sorted(n for n in files if n.endswith(".arrow") and safe_rel(n)):
                with pa.memory_map(os.path.join(data, n)) as source:
                    schemas.append(pa.ipc.open_stream(source).schema)
        if not schemas or any(s != schemas[0] for s in schemas):
            return self.load_listed(fp, split, rows).features
        first = self.layout.data_path(row_owner(kept[0]))
        with open(os.path.join(first, "dataset_info.json"), encoding="utf-8") as f:
            info = datasets.DatasetInfo.from_dict(json.load(f))
        empty = InMemoryTable(schemas[0].empty_table())
        return datasets.Dataset(
            empty, info=info, split=datasets.Split(split), fingerprint=fp
        ).features

    def _pack_table(self, data: str, names: list[str]) -> Any:
        """A pack's Arrow files at `data` as one memory-mapped table, mapped once per
        process while the files are the same ones (by inode, mtime and size): a batched
        stage's units each read a few of its shards' rows."""
        from datasets.table import MemoryMappedTable, concat_tables

        paths = [os.path.join(data, n) for n in names]
        ident = tuple(
            (p, st.st_ino, st.st_mtime_ns, st.st_size) for p in paths if (st := os.stat(p))
        )
        held = self._packs.get(data)
        if held is not None and held[0] == ident:
            return held[1]
        mapped = [MemoryMappedTable.from_file(p) for p in paths]
        table = mapped[0] if len(mapped) == 1 else concat_tables(mapped)
        self._packs[data] = (ident, table)
        return table

    def listed_row(self, via: str, key: str) -> list[Any] | None:
        """The row of the list of shards `via` naming shard `key`, else None: how a shard
        kept as a row range of a pack (no entry of its own) is found by its key. A list's
        rows are read once per process (an entry's manifest is never rewritten but for its
        identity record)."""
        rows = self._rows.get(via)
        if rows is None:
            doc = self.manifests.read(via) or {}
            listed = doc.get("shards")
            rows = {
                str(r[1]): r
                for r in (listed if isinstance(listed, list) else [])
                if isinstance(r, list) and len(r) >= 5
            }
            self._rows[via] = rows
        return rows.get(key)

    def load_shard(self, key: str, via: str | None) -> Any:
        """Shard `key` as a Dataset: its own entry, else its row of the list `via` (the
        list of the stage it belongs to: a packed shard is found by its key there)."""
        if via is not None and self.manifests.read(key) is None:
            row = self.listed_row(via, key)
            if row is not None:
                return self.load_listed(via, str(row[0]), [row])
        return self.load(key)

    def _load_shards(self, doc: dict[str, Any]) -> Any:
        import datasets

        by_split: dict[str, list[list[Any]]] = {}
        for row in doc["shards"]:
            by_split.setdefault(str(row[0]), []).append(row)
        by_split = {s: without_empty(rows) for s, rows in by_split.items()}
        parts = {
            s: self._concat_shards(str(doc["fingerprint"]), s, rows) for s, rows in by_split.items()
        }
        if doc.get("dict"):
            return datasets.DatasetDict(parts)
        return next(iter(parts.values()))

    def _concat_shards(self, fp: str, split: str, rows: list[list[Any]]) -> Any:
        """One split's shards as one Dataset over their memory-mapped files. When every
        shard has the same schema (the usual case) the tables are concatenated directly,
        with the first shard's features; otherwise `concatenate_datasets` aligns them."""
        import datasets
        from datasets.table import MemoryMappedTable, concat_tables

        from hfbuild.store import indexed

        tables: list[Any] = []
        selected: list[tuple[int, Any]] = []  # per shard: (its table rows, positions or None)
        packs: dict[str, Any] = {}  # a pack's table, mapped once
        runs: dict[str, tuple[int, int, int]] = {}  # pack -> its last slice: from, to, tables
        for row in rows:
            key = str(row[1])
            files = row[3] if len(row) >= 4 and isinstance(row[3], dict) else None
            base = row_base(row)
            if files is None or (
                base is None and (row_indexed(row) or indexed.INDICES_FILE in files)
            ):
                break
            owner, listed = base if base is not None else (row_owner(row), files)
            names = sorted(n for n in listed if n.endswith(".arrow") and safe_rel(n))
            data = self.layout.data_path(owner)
            pack = row_pack(row)
            if pack is not None:
                whole = packs.get(owner)
                if whole is None:
                    whole = packs[owner] = self._pack_table(data, names)
                _, start, end = pack
                if end > whole.num_rows:
                    raise StoreError(
                        f"shard {key} names rows {start}-{end} of the pack {owner}, which "
                        f"holds {whole.num_rows}; run `hfbuild verify --deep`."
                    )
                run = runs.get(owner)
                if run is not None and run[1] == start and run[2] == len(tables):
                    # The next rows of the pack: one slice of it for the run (fewer chunks),
                    # taken when the run ends (a slice costs ~0.2 ms: not one per shard).
                    runs[owner] = (run[0], end, len(tables))
                    selected.append((end - start, None))
                    continue
                if run is not None:  # the pack's last run ended: its one slice
                    tables[run[2] - 1] = whole.slice(run[0], run[1] - run[0])
                mine = [whole.slice(start, end - start)]  # a view: still mapped, no copy
                runs[owner] = (start, end, len(tables) + 1)
            else:
                mine = [MemoryMappedTable.from_file(os.path.join(data, n)) for n in names]
            tables.extend(mine)
            idx = None
            if base is not None:
                path = os.path.join(self.layout.data_path(key), indexed.INDICES_FILE)
                idx = indexed.read_indices(path)
            selected.append((sum(t.num_rows for t in mine), idx))
        else:
            for owner, (start, end, at) in runs.items():  # each pack's last run's slice
                tables[at - 1] = packs[owner].slice(start, end - start)
            if tables and all(t.schema == tables[0].schema for t in tables):
                first = self.layout.data_path(row_owner(rows[0]))
                with open(os.path.join(first, "dataset_info.json"), encoding="utf-8") as f:
                    info = datasets.DatasetInfo.from_dict(json.load(f))
                table = tables[0] if len(tables) == 1 else concat_tables(tables)
                indices = None
                if any(idx is not None for _, idx in selected):
                    indices = indexed.concat_indices(selected)
                return datasets.Dataset(
                    table,
                    info=info,
                    split=datasets.Split(split),
                    indices_table=indices,
                    fingerprint=fp,
                )
        # Each by its own manifest (a packed shard by its row: it is no entry of its own).
        shards = [
            self._concat_shards(fp, split, [r]) if row_pack(r) else self.load(str(r[1]))
            for r in rows
        ]
        return shards[0] if len(shards) == 1 else datasets.concatenate_datasets(shards)
