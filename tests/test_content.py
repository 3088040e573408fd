"""The content hash: a digest of rows and schema, not of how they are chunked."""

from __future__ import annotations

import decimal
import itertools

import pyarrow as pa
import pytest

from hfbuild.store import content

ROWS = 5000


def _table() -> pa.Table:
    return pa.table(
        {
            "i": pa.array([i if i % 13 else None for i in range(ROWS)], pa.int64()),
            "s": pa.array([f"r{i}" * (i % 5) if i % 7 else None for i in range(ROWS)]),
            "l": pa.array([[i, None, i * 2] if i % 3 else None for i in range(ROWS)]),
            "st": pa.array([{"a": i, "b": str(i)} for i in range(ROWS)]),
            "d": pa.array([f"k{i % 4}" for i in range(ROWS)]).dictionary_encode(),
            # Rarer types, hashed by value: decimals, maps.
            "dec": pa.array([decimal.Decimal(i) / 8 for i in range(ROWS)], pa.decimal128(12, 3)),
            "m": pa.array([[("a", i)] for i in range(ROWS)], pa.map_(pa.string(), pa.int64())),
        }
    )


def _rechunked(table: pa.Table, size: int, offset: int = 0) -> pa.Table:
    """The same rows as record batches of `size` rows (after a first one of `offset`)."""
    bounds = [0, offset] if offset else [0]
    while bounds[-1] < ROWS:
        bounds.append(min(bounds[-1] + size, ROWS))
    return pa.Table.from_batches(
        [
            table.slice(a, b - a).combine_chunks().to_batches()[0]
            for a, b in itertools.pairwise(bounds)
        ]
    )


@pytest.mark.parametrize(("size", "offset"), [(1, 0), (7, 3), (1000, 0), (999, 500), (ROWS, 0)])
def test_hash_does_not_depend_on_chunking(
    size: int, offset: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same rows chunked any way (chunks hashed alone or joined into pieces) hash alike."""
    table = _table()
    want = content.table_hash(table.combine_chunks())
    assert content.table_hash(_rechunked(table, size, offset)) == want
    monkeypatch.setattr(content, "_PIECE_ROWS", 1)  # every chunk hashed alone
    assert content.table_hash(_rechunked(table, size, offset)) == want


def test_hash_changes_with_one_value() -> None:
    """Changing one value of one row, in any column, changes the hash."""
    table = _table()
    base = content.table_hash(_rechunked(table, 1000))
    changed = table.set_column(
        1, "s", pa.array(["x" if i == 4321 else v for i, v in enumerate(table["s"].to_pylist())])
    )
    assert content.table_hash(_rechunked(changed, 1000)) != base


def test_a_rare_type_column_hashes_as_before_in_one_chunk() -> None:
    """A column hashed by value (a decimal) in one chunk gives the digest earlier versions
    stored (the JSON of its values as one list), so stored content hashes stay valid."""
    import json

    values = [decimal.Decimal(i) / 8 for i in range(10)]
    table = pa.table({"dec": pa.array(values, pa.decimal128(12, 3))})
    s = content._Streams()
    s.feed("schema", b"dec:decimal128(12, 3)")
    s.feed("rows", b"10")
    s.feed("c:dec/valid", bytes([1] * 10))
    old = json.dumps(table["dec"].to_pylist(), sort_keys=True, default=str)
    s.feed("c:dec/py", old.encode())
    assert content.table_hash(table) == s.digest()
