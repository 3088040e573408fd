"""The content hash: a digest of rows and schema, not of how they are chunked."""

from __future__ import annotations

import itertools

import pyarrow as pa
import pytest

from hfbuild import content

ROWS = 5000


def _table() -> pa.Table:
    return pa.table(
        {
            "i": pa.array([i if i % 13 else None for i in range(ROWS)], pa.int64()),
            "s": pa.array([f"r{i}" * (i % 5) if i % 7 else None for i in range(ROWS)]),
            "l": pa.array([[i, None, i * 2] if i % 3 else None for i in range(ROWS)]),
            "st": pa.array([{"a": i, "b": str(i)} for i in range(ROWS)]),
            "d": pa.array([f"k{i % 4}" for i in range(ROWS)]).dictionary_encode(),
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
