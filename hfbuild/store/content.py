"""The content hash of a built table: a digest of the data, not of how it is stored.

Owns: hashing Arrow data so that the same rows and schema give the same digest whatever the
chunking, slicing offsets, buffer padding or bytes under null slots. Each component stream of
each column (validity, lengths, values) is hashed separately and streamed chunk by chunk, so
no column is ever concatenated in memory.

Must never: be imported by an up-to-date check (it imports pyarrow).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from hfbuild.core import canonical


class _Streams:
    def __init__(self) -> None:
        self.h: dict[str, Any] = {}
        self.lists: set[str] = set()  # keys fed JSON values by `feed_values`, still open

    def feed_values(self, key: str, values: list[Any]) -> None:
        """Values as one JSON list over every call for `key`: the stream is the same however
        the values arrive in chunks (and a single chunk's is `json.dumps(values)`'s bytes)."""
        text = ", ".join(json.dumps(v, sort_keys=True, default=str) for v in values)
        if key in self.lists:
            self.feed(key, (", " + text).encode())
        else:
            self.lists.add(key)
            self.feed(key, ("[" + text).encode())

    def feed(self, key: str, data: bytes | memoryview | np.ndarray) -> None:
        h = self.h.get(key)
        if h is None:
            h = self.h[key] = xxhash.xxh3_128()
        h.update(data if not isinstance(data, np.ndarray) else np.ascontiguousarray(data).data)

    def digest(self) -> str:
        for key in sorted(self.lists):
            self.feed(key, b"]")
        self.lists.clear()
        top = xxhash.xxh3_128()
        for key in sorted(self.h):
            top.update(f"{key}={self.h[key].hexdigest()};".encode())
        return top.hexdigest()


def _array(s: _Streams, key: str, arr: pa.Array) -> None:
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    if arr.null_count:
        s.feed(key + "/valid", arr.is_valid().to_numpy(zero_copy_only=False).astype(np.uint8))
    else:
        s.feed(key + "/valid", np.ones(len(arr), dtype=np.uint8))
    if pa.types.is_null(t) or len(arr) == 0:
        return
    if pa.types.is_struct(t):
        for i in range(t.num_fields):
            _array(s, f"{key}/{t.field(i).name}", arr.field(i))
        return
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).cast(pa.int64())
        s.feed(key + "/len", lengths.to_numpy(zero_copy_only=False))
        _array(s, key + "/item", pc.list_flatten(arr))
        return
    if (
        pa.types.is_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_string(t)
        or (pa.types.is_large_binary(t))
    ):
        filled = pc.fill_null(arr, pa.scalar(b"" if "binary" in str(t) else "", t))
        lengths = pc.binary_length(filled).cast(pa.int64()).to_numpy(zero_copy_only=False)
        s.feed(key + "/len", lengths)
        width = np.int64 if pa.types.is_large_string(t) or pa.types.is_large_binary(t) else np.int32
        bufs = filled.buffers()
        offs = np.frombuffer(bufs[1], dtype=width)[filled.offset : filled.offset + len(filled) + 1]
        if bufs[2] is not None and len(offs):
            s.feed(key + "/data", memoryview(bufs[2])[int(offs[0]) : int(offs[-1])])
        return
    if pa.types.is_boolean(t):
        vals = pc.fill_null(arr, False).to_numpy(zero_copy_only=False).astype(np.uint8)
        s.feed(key + "/data", vals)
        return
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_temporal(t):
        filled = arr if not arr.null_count else pc.fill_null(arr, pa.scalar(0).cast(t))
        s.feed(key + "/data", filled.to_numpy(zero_copy_only=False).view(np.uint8))
        return
    # Anything rarer (decimals, maps, unions…): by value, slowly but exactly.
    s.feed_values(key + "/py", arr.to_pylist())


def table_hash(table: pa.Table) -> str:
    """A digest of a table's schema (names and types) and data, independent of chunking."""
    s = _Streams()
    s.feed("schema", ";".join(f"{f.name}:{f.type}" for f in table.schema).encode())
    s.feed("rows", str(table.num_rows).encode())
    for name, col in zip(table.column_names, table.columns, strict=True):
        for piece in _pieces(col.chunks):
            _array(s, "c:" + name, piece)
    return s.digest()


# Consecutive chunks are hashed together up to this many rows: datasets writes 1,000-row
# record batches, and hashing each alone costs more in Python than in hashing.
_PIECE_ROWS = 65_536


def _pieces(chunks: list[pa.Array]) -> Any:
    """The chunks, consecutive small ones concatenated (the digest does not depend on
    chunking; this only saves per-chunk overhead). Chunks that cannot be concatenated (say,
    dictionaries that differ) are yielded as they are."""
    group: list[pa.Array] = []
    rows = 0
    for chunk in chunks:
        group.append(chunk)
        rows += len(chunk)
        if rows >= _PIECE_ROWS:
            yield from _joined(group)
            group, rows = [], 0
    yield from _joined(group)


def _joined(group: list[pa.Array]) -> Any:
    if len(group) <= 1 or pa.types.is_dictionary(group[0].type):
        yield from group
        return
    try:
        joined = pa.concat_arrays(group)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError):
        yield from group
        return
    yield joined


def select_rows(table: pa.Table, idx: np.ndarray) -> pa.Table:
    """The rows of `table` at positions `idx` (a numpy array), in that order. Increasing
    positions (a filter's) are selected with a mask over their span, several times faster
    than a `take` of string columns."""
    idx = idx.astype(np.int64, copy=False)
    if len(idx) and bool(np.all(idx[1:] > idx[:-1])):
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        mask = np.zeros(hi - lo, dtype=bool)
        mask[idx - lo] = True
        return table.slice(lo, hi - lo).filter(pa.array(mask))
    return table.take(pa.array(idx))


def selected_hash(table: pa.Table, indices: pa.ChunkedArray) -> str:
    """`table_hash` of `table`'s rows at `indices` (a datasets indices mapping), selected
    `_PIECE_ROWS` at a time: the selection is never gathered whole, nor row by row."""
    s = _Streams()
    s.feed("schema", ";".join(f"{f.name}:{f.type}" for f in table.schema).encode())
    s.feed("rows", str(len(indices)).encode())
    for lo in range(0, len(indices), _PIECE_ROWS):
        part = select_rows(table, indices.slice(lo, _PIECE_ROWS).to_numpy())
        for name, col in zip(part.column_names, part.columns, strict=True):
            for piece in _pieces(col.chunks):
                _array(s, "c:" + name, piece)
    return s.digest()


def dataset_hash(ds: Any) -> str:
    """The content hash of a Dataset (through its indices mapping, if any) or a DatasetDict."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        top = xxhash.xxh3_128()
        for split in sorted(ds.keys()):
            top.update(f"{split}={dataset_hash(ds[split])};".encode())
        return top.hexdigest()
    table = ds.data.table
    if ds._indices is not None:
        return selected_hash(table, ds._indices.column(0))
    return table_hash(table)


def combined_hash(hashes: Sequence[tuple[str, str]]) -> str:
    """The content hash of a sharded result from its shards' ([split, hash]) in order."""
    return _digest_json({"shard_hashes": [list(h) for h in hashes]})


def _digest_json(doc: Any) -> str:
    return canonical.digest(canonical.dumps(doc).encode())


def pack_mismatch(table: pa.Table, rows: Sequence[Any]) -> str | None:
    """Why a pack's table does not hold what its manifest's `pack` rows ([shard key, from,
    to, content hash, label] each) give its shards (a range out of its rows, or whose
    rows' hash is another), else None."""
    for row in rows:
        if not (isinstance(row, list) and len(row) == 5):
            return "its list of the shards it holds is malformed"
        key, start, end, want, label = row
        if not (isinstance(start, int) and isinstance(end, int)):
            return "its list of the shards it holds is malformed"
        if not (0 <= start <= end <= table.num_rows):
            return f"its rows of shard {key} ({label}) are out of its {table.num_rows} rows"
        if table_hash(table.slice(start, end - start)) != want:
            return f"its rows of shard {key} ({label}) do not match their content hash"
    return None
