"""Saving a stage's result: the layout `datasets.load_from_disk` reads, whatever the path."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import datasets
import pyarrow as pa
import pytest

from hfbuild.builds import builder
from hfbuild.store.content import dataset_hash


def _base() -> Any:
    ds = datasets.Dataset.from_dict(
        {
            "x": list(range(3000)),
            "t": [f"r{i}" * (i % 7) if i % 11 else None for i in range(3000)],
            "l": [[i, None] if i % 3 else None for i in range(3000)],
        }
    )
    # Two memory-mapped blocks, so a selection crosses chunks.
    more = ds.map(lambda b: {"x": [v + 1 for v in b["x"]]}, batched=True)
    return datasets.concatenate_datasets([ds, more])


SELECTIONS = {
    "filter": lambda ds: ds.filter(lambda b: [v % 3 == 0 for v in b["x"]], batched=True),
    "shuffle": lambda ds: ds.shuffle(seed=0),
    "select": lambda ds: ds.select([5, 2, 4000]),
    "filter of a filter": lambda ds: ds.filter(lambda r: r["x"] % 2 == 0).filter(
        lambda r: r["x"] % 5 == 0
    ),
    "nothing kept": lambda ds: ds.filter(lambda r: False),
}


def _batches(path: pathlib.Path) -> tuple[pa.Schema, list[pa.RecordBatch]]:
    with pa.OSFile(str(path), "rb") as f:
        reader = pa.ipc.open_stream(f)
        return reader.schema, list(reader)


@pytest.mark.parametrize("size", ["several selections", "one selection"])
@pytest.mark.parametrize("how", sorted(SELECTIONS))
def test_selection_is_saved_as_save_to_disk_saves_it(
    tmp_path: pathlib.Path, how: str, size: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dataset behind an indices mapping is written by `save` (`_save_selected`, whatever
    its size: a selection of a few thousand rows, a unit's filter after an append, too)
    with the same rows, shards, record batches, schema and JSON files as
    `Dataset.save_to_disk`, and hashes the same."""
    datasets.disable_progress_bars()
    if size == "several selections":
        monkeypatch.setattr(builder, "_TAKE_ROWS", 2500)  # several selections per shard
    sel = SELECTIONS[how](_base())
    assert sel._indices is not None
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    builder._save_dataset(sel, str(ours), [str(tmp_path)])
    sel.save_to_disk(str(theirs))
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    for name in ("state.json", "dataset_info.json"):
        assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text())
    for arrow in theirs.glob("*.arrow"):
        (schema_a, a), (schema_b, b) = _batches(ours / arrow.name), _batches(arrow)
        assert schema_a.equals(schema_b, check_metadata=True)
        assert [x.num_rows for x in a] == [x.num_rows for x in b]
        assert all(x.equals(y) for x, y in zip(a, b, strict=True))
    loaded = datasets.load_from_disk(str(ours))
    assert loaded.to_list() == sel.to_list()
    assert dataset_hash(loaded) == dataset_hash(datasets.load_from_disk(str(theirs)))


def test_a_map_over_a_filter_that_kept_nothing_is_saved_readable(tmp_path: pathlib.Path) -> None:
    """A map over a filter that kept no row returns a slice of its input without record
    batches, for which `save_to_disk` writes no data file (and `load_from_disk` fails on
    what it wrote): `builder.save` writes one empty Arrow file with the result's schema and
    reads it back (found by tests/test_differential.py)."""
    datasets.disable_progress_bars()
    nothing = datasets.Dataset.from_dict({"x": [0, 1]}).filter(lambda r: False)
    result = nothing.map(lambda r: {"y": 1})
    no_columns = nothing.map(lambda r: {"y": 1}, remove_columns=["x"])
    assert no_columns.column_names == []
    cases = (
        ("one", result),
        ("dict", datasets.DatasetDict({"train": result})),
        ("no column", no_columns),
    )
    for name, value in cases:
        dest = tmp_path / name / "data"
        info = builder.save(value, str(dest), str(tmp_path / name))
        back = builder._reload(str(dest))
        part = back["train"] if name == "dict" else back
        assert (
            len(part) == 0
            and part.features == (value["train"] if name == "dict" else value).features
        )
        assert info.content_hash == dataset_hash(value)
