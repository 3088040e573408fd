"""Indices entries (issue #10): a filter's result is stored as indices over its input's entry,
loads, hashes and verifies as the full copy did, and gc, push and pull follow the reference."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import pytest

from tests.helpers import Repo, run_hfbuild
from tests.pipeline_project import ROWS, doit
from tests.pipeline_project import make_project as make_plain_project
from tests.shard_project import make_project as make_shard_project

DODO = """
from hfbuild import Pipeline
from pkg import transforms

pipe = Pipeline()
raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
feat = pipe.map("feat", raw, transforms.feat, {"k": 2}, batched=True)
kept = pipe.filter("kept", feat, transforms.keep, {"m": 3}, batched=True)
kept2 = pipe.filter("kept2", kept, transforms.keep, {"m": 5}, batched=True)
again = pipe.map("again", kept2, transforms.feat, {"k": 3}, batched=True)
split = pipe.apply("split", kept, transforms.split, {"seed": 0})


def task_preprocess():
    yield from pipe.tasks()
"""

SELECTIONS = ("kept", "kept2", "split")  # their entries hold indices over feat's rows


def _project(repo: Repo) -> Repo:
    make_plain_project(repo)
    repo.write({"dodo.py": DODO})
    repo.commit("filters over filters")
    return repo


def _expected() -> dict[str, list[int]]:
    ys = [x * 2 for x in range(ROWS)]
    kept = [x for x, y in zip(range(ROWS), ys, strict=True) if y % 3 != 0]
    kept2 = [x for x in kept if (x * 2) % 5 != 0]
    return {"feat": ys, "kept": [x * 2 for x in kept], "kept2": [x * 2 for x in kept2],
            "again": [x * 3 for x in kept2]}  # fmt: skip


def _fps(repo: Repo) -> dict[str, str]:
    stages = json.loads((repo.path / "hfbuild.lock").read_text())["stages"]
    return {name: str(e["fingerprint"]) for name, e in stages.items()}


def _store(repo: Repo, where: str = ".hfbuild") -> Any:
    from hfbuild.store.store import Store

    return Store(repo.path / where)


def _data_files(store: Any, fp: str) -> list[str]:
    return sorted(str(p.relative_to(store.data_path(fp))) for p in _walk(store.data_path(fp)))


def _walk(path: str) -> list[pathlib.Path]:
    return [p for p in pathlib.Path(path).rglob("*") if p.is_file()]


def _rows(store: Any, fp: str, column: str = "y") -> list[int]:
    return list(store.load(fp)[column])


def _full_write(ds: Any, where: pathlib.Path) -> Any:
    """`ds` saved as before this change (every row written, no base), and what was saved."""
    from hfbuild.builds import builder

    where.mkdir(parents=True)
    return builder.save(ds, str(where / "data"), str(where))


def test_filter_entry_is_indices_only_and_equals_a_full_write(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A filter's entry, a filter over it and an apply's train_test_split hold only uint64
    indices (memory-mapped on load) over the map's entry; each loads the rows and has the
    content hash that writing the same result in full gives; a map over a filter is a full
    entry with the right rows."""
    from datasets.table import MemoryMappedTable

    _project(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "log")
    fps, store, want = _fps(repo), _store(repo), _expected()
    for name in SELECTIONS:
        doc = store.read_manifest(fps[name])
        assert doc["indices"]["base"] == fps["feat"], name
        files = _data_files(store, fps[name])
        assert [f for f in files if f.endswith(".arrow")] == [
            f for f in files if f.endswith("indices.arrow")
        ]
        assert store.references(fps[name]) == [fps["feat"]]
        ds = store.load(fps[name])
        full = _full_write(ds, tmp_path / name)
        assert full.content_hash == doc["content_hash"] and full.rows == doc["rows"]
        assert full.indices is None
    for name in ("kept", "kept2"):
        ds = store.load(fps[name])
        assert isinstance(ds._indices, MemoryMappedTable)
        assert str(ds._indices.column(0).type) == "uint64"
        assert _rows(store, fps[name]) == want[name]
    split = store.load(fps["split"])
    assert sorted([*split["train"]["y"], *split["test"]["y"]]) == sorted(want["kept"])
    assert store.read_manifest(fps["again"]).get("indices") is None
    assert _rows(store, fps["again"]) == want["again"]
    assert run_hfbuild(repo, "verify", "--deep").returncode == 0


def _plain_kept(repo: Repo) -> list[dict[str, Any]]:
    """The shard project's `kept` rows computed by plain datasets over the same files."""
    import datasets

    files = sorted(str(p) for p in (repo.path / "data").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=None)
    ds = ds.map(lambda b: {"y": [x * 2 for x in b["x"]]}, batched=True, batch_size=7)
    ds = ds.map(lambda b, i: {"i": list(i)}, batched=True, with_indices=True)
    ds = ds.filter(lambda b: [y % 3 != 0 for y in b["y"]], batched=True)
    return list(ds.to_list())


EXTRA = {
    "pkg/more.py": """
        def keep5(row):
            return row["y"] % 5 != 0

        def twice(row):
            return {"z": row["y"] * 2}
        """,
}
MORE = """
from pkg import more
kept2 = pipe.filter("kept2", kept, more.keep5)
after = pipe.map("after", kept2, more.twice)
whole = pipe.filter("whole", idx, t.keep, sharded=False)
"""


def test_sharded_filter_shards_are_indices_and_equal_plain_datasets(tmp_path: pathlib.Path) -> None:
    """Each shard of a sharded filter (and of a filter over it) holds indices over its input
    shard's base; the concatenated result, a map over it, and an unsharded filter over the
    sharded input equal plain datasets; each shard's hash is that of its rows written in
    full; an apply sorting the sharded result holds indices over it."""
    repo = make_shard_project(Repo.init(tmp_path / "repo"))
    dodo = (repo.path / "dodo.py").read_text()
    repo.write(
        {
            **EXTRA,
            "dodo.py": dodo.replace("\n\ndef task_preprocess", MORE + "\n\ndef task_preprocess"),
        }
    )
    repo.commit("more")
    doit(repo, "run", "preprocess", log=tmp_path / "log")
    fps, store = _fps(repo), _store(repo)
    idx_shards = [r[1] for r in store.read_manifest(fps["idx"])["shards"]]
    for stage in ("kept", "kept2"):
        rows = store.read_manifest(fps[stage])["shards"]
        assert [r[4]["base"] for r in rows] == idx_shards  # kept2 composes to idx's shards
        for n, row in enumerate(rows):
            doc = store.read_manifest(row[1])
            assert doc["indices"]["base"] == idx_shards[n]
            full = _full_write(store.load(row[1]), tmp_path / f"{stage}-{n}")
            assert full.content_hash == doc["content_hash"]
    plain = _plain_kept(repo)
    assert store.load(fps["kept"]).to_list() == plain
    assert store.load(fps["whole"]).to_list() == plain
    assert store.read_manifest(fps["whole"])["indices"]["base"] == fps["idx"]
    kept2 = [r for r in plain if r["y"] % 5 != 0]
    assert store.load(fps["kept2"]).to_list() == kept2
    assert list(store.load(fps["after"])["z"]) == [r["y"] * 2 for r in kept2]
    total = store.read_manifest(fps["total"])  # an apply's sort: indices over kept's rows
    assert total["indices"]["base"] == fps["kept"]
    assert store.load(fps["total"]).to_list() == sorted(plain, key=lambda r: r["i"])
    assert run_hfbuild(repo, "verify", "--deep").returncode == 0


def test_gc_keeps_the_bases_of_kept_filter_entries(tmp_path: pathlib.Path) -> None:
    """gc keeping only a sharded filter stage keeps its shards and the map shards they select
    rows of (so the result still loads), and removes everything once nothing is kept."""
    repo = make_shard_project(Repo.init(tmp_path / "repo"))
    doit(repo, "run", "preprocess", log=tmp_path / "log")
    fps, store = _fps(repo), _store(repo)
    before = store.load(fps["kept"]).to_list()
    shards = [r[1] for r in store.read_manifest(fps["kept"])["shards"]]
    bases = [r[1] for r in store.read_manifest(fps["idx"])["shards"]]
    store.gc({fps["kept"]}, 0, dry_run=False)
    assert set(store.fingerprints()) == {fps["kept"], *shards, *bases}
    assert store.has(fps["kept"]) and store.load(fps["kept"]).to_list() == before
    store.gc(set(), 0, dry_run=False)
    assert store.fingerprints() == []


def test_pull_brings_the_base_and_refuses_an_entry_without_it(tmp_path: pathlib.Path) -> None:
    """A filter entry pushed to a file:// remote is pulled into an empty store with its base
    and serves its rows; when the remote lacks the base, the pull fails and serves nothing."""
    repo = _project(Repo.init(tmp_path / "repo"))
    doit(repo, "run", "preprocess", log=tmp_path / "log")
    fps = _fps(repo)
    remote = tmp_path / "remote"
    url = f"file://{remote}"
    assert run_hfbuild(repo, "push", "kept2", "--remote", url).returncode == 0
    # kept2's key holds its input's result, which the committed lock names (issue #19).
    repo.git("add", "hfbuild.lock")
    repo.commit("lock")
    clone = repo.clone(tmp_path / "clone")
    out = run_hfbuild(clone, "pull", "kept2", "--remote", url)
    assert out.returncode == 0, out.stdout + out.stderr
    store = _store(clone)
    assert store.has(fps["kept2"]) and store.has(fps["feat"])
    assert _rows(store, fps["kept2"]) == _expected()["kept2"]
    shutil.rmtree(remote / "objects" / fps["feat"][:2] / fps["feat"])
    other = repo.clone(tmp_path / "other")
    out = run_hfbuild(other, "pull", "kept2", "--remote", url)
    assert out.returncode == 1
    assert "base it selects rows of" in out.stdout + out.stderr
    assert not _store(other).has(fps["kept2"])


def test_deep_verify_finds_a_damaged_base(repo: Repo, tmp_path: pathlib.Path) -> None:
    """Same-size damage to the map entry a filter selects rows of: `verify --deep` reports
    the base and the filter entries over it and moves them aside; the rebuild is correct."""
    _project(repo)
    log = tmp_path / "log"
    doit(repo, "run", "preprocess", log=log)
    fps, store = _fps(repo), _store(repo)
    arrow = next(pathlib.Path(store.data_path(fps["feat"])).glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[-200] ^= 0xFF
    arrow.write_bytes(bytes(data))
    assert not store.has(fps["kept"])  # its base's identities changed: hashed, damaged
    out = run_hfbuild(repo, "verify", "--deep")
    assert out.returncode == 1
    for name in ("feat", *SELECTIONS):
        assert fps[name] in out.stdout + out.stderr, name
        assert not store.has(fps[name])
    doit(repo, "run", "preprocess", log=log)
    assert _rows(store, fps["kept2"]) == _expected()["kept2"]
    assert run_hfbuild(repo, "verify", "--deep").returncode == 0


def test_missing_or_rebuilt_base_is_not_served(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A filter entry whose base is gone, or holds other rows than it was built over (another
    content hash), fails `check` and is rebuilt rather than served."""
    _project(repo)
    log = tmp_path / "log"
    doit(repo, "run", "preprocess", log=log)
    fps, store = _fps(repo), _store(repo)
    doc = store.read_manifest(fps["feat"])
    with store.lock(fps["feat"]):
        moved = store.quarantine(fps["feat"])
    assert moved is not None
    assert "base" in (store.check(fps["kept"]) or "")
    tmp = store.new_build_dir(fps["feat"])
    shutil.copytree(os.path.join(moved, "data"), os.path.join(tmp, "data"))
    meta = {k: v for k, v in doc.items() if k not in ("fingerprint", "files", "manifest_digest")}
    store.publish(tmp, fps["feat"], {**meta, "content_hash": "0" * 32})
    assert "other rows" in (store.check(fps["kept"]) or "")
    assert run_hfbuild(repo, "status").returncode == 1
    doit(repo, "run", "preprocess", log=log)
    # kept's key holds feat's result (issue #19): the entry now under feat's key records
    # another content hash, so kept is built under another key, over feat's rows as they are.
    now = _fps(repo)
    assert now["kept"] != fps["kept"] and now["feat"] == fps["feat"]
    assert store.has(now["kept"]) and _rows(store, now["kept"]) == _expected()["kept"]


def test_entry_written_in_full_still_loads(repo: Repo, tmp_path: pathlib.Path) -> None:
    """An entry written before this change (the kept rows in full, no base) under a filter's
    key is still served, and the filter over it selects its rows."""
    _project(repo)
    log = tmp_path / "log"
    doit(repo, "run", "preprocess", log=log)
    fps, store = _fps(repo), _store(repo)
    doc = store.read_manifest(fps["kept"])
    tmp = store.new_build_dir(fps["kept"])
    info = _full_write(store.load(fps["kept"]), pathlib.Path(tmp) / "w")
    os.rename(os.path.join(tmp, "w", "data"), os.path.join(tmp, "data"))
    shutil.rmtree(os.path.join(tmp, "w"))
    meta = {k: v for k, v in doc.items() if k not in ("fingerprint", "files", "manifest_digest")}
    del meta["indices"]
    assert meta["content_hash"] == info.content_hash
    shutil.rmtree(store.entry(fps["kept"]))
    shutil.rmtree(store.entry(fps["kept2"]))
    store.publish(tmp, fps["kept"], meta)
    assert run_hfbuild(repo, "status").returncode == 1  # kept2 only
    doit(repo, "run", "preprocess", log=log)
    assert store.read_manifest(fps["kept2"])["indices"]["base"] == fps["kept"]
    assert _rows(store, fps["kept"]) == _expected()["kept"]
    assert _rows(store, fps["kept2"]) == _expected()["kept2"]
    assert run_hfbuild(repo, "status").returncode == 0


@pytest.mark.parametrize("n", [1, 70_000])
def test_selected_hash_equals_the_written_rows_hash(tmp_path: pathlib.Path, n: int) -> None:
    """The content hash of an indices mapping, taken piece by piece, is the hash of its rows
    written in full (increasing positions, random ones, and none kept), and of the rows
    datasets gathers when any are kept."""
    import datasets

    from hfbuild.store.content import dataset_hash, table_hash

    ds = datasets.Dataset.from_dict(
        {"x": list(range(n)), "t": [f"r{i}" if i % 7 else None for i in range(n)]}
    )
    sels = {
        "filter": ds.filter(lambda b: [v % 3 == 0 for v in b["x"]], batched=True),
        "shuffle": ds.shuffle(seed=1),
        "none": ds.filter(lambda b: [False] * len(b["x"]), batched=True),
    }
    for how, sel in sels.items():
        assert dataset_hash(sel) == _full_write(sel, tmp_path / how).content_hash, how
        if len(sel):
            assert dataset_hash(sel) == table_hash(sel.with_format("arrow")[:]), how


def test_du_counts_shards_and_bases_once(tmp_path: pathlib.Path) -> None:
    """`hfbuild du` counts a sharded stage's shards on its row, every byte once: after one
    build nothing is `other` and the total is every entry's bytes."""
    repo = make_shard_project(Repo.init(tmp_path / "repo"))
    doit(repo, "run", "preprocess", log=tmp_path / "log")
    out = run_hfbuild(repo, "du", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    store = _store(repo)
    assert got["other_bytes"] == 0
    assert all(r["bytes"] > store.size(r["fingerprint"]) for r in got["stages"][:4])
    assert sum(r["bytes"] for r in got["stages"]) == sum(
        store.size(fp) for fp in store.fingerprints()
    )


def test_indices_shards_with_different_schemas_load_aligned(tmp_path: pathlib.Path) -> None:
    """Filter shards over input shards whose schemas differ (a file of nulls) load through
    `concatenate_datasets` with their indices: the rows plain filtering keeps, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = make_shard_project(Repo.init(tmp_path / "repo"), parts=2)
    table = pa.table({"x": pa.array([1000, 1001]), "f": pa.array([None, None], pa.null())})
    pq.write_table(table, repo.path / "data" / "part-9.parquet")
    repo.commit("a file of nulls")
    doit(repo, "run", "preprocess", log=tmp_path / "log")
    fps, store = _fps(repo), _store(repo)
    rows = store.read_manifest(fps["kept"])["shards"]
    assert all(store.read_manifest(r[1]).get("indices") for r in rows)
    xs = [*range(10), *range(100, 110), 1000, 1001]
    fs = ["part-0"] * 10 + ["part-1"] * 10 + [None, None]
    want = [
        {"x": x, "f": f, "y": 2 * x, "i": i}
        for i, (x, f) in enumerate(zip(xs, fs, strict=True))
        if (2 * x) % 3 != 0
    ]
    got = store.load(fps["kept"])
    assert got.features["f"].dtype == "string"
    assert got.to_list() == want


def test_rebuild_keeps_the_base_of_indices_shards_it_takes_from_the_listing(
    tmp_path: pathlib.Path,
) -> None:
    """After an append, the filter's new list names the base of every indices shard, the
    ones taken from the last listing too, so a damaged base of an old shard still makes
    the stage unusable (and it is rebuilt, equal to a fresh build)."""
    from tests.shard_project import write_part

    repo = make_shard_project(Repo.init(tmp_path / "repo"))
    doit(repo, "run", "preprocess", log=tmp_path / "a.log")
    write_part(repo, "part-4", 400)
    repo.commit("append")
    doit(repo, "run", "preprocess", log=tmp_path / "b.log")
    fps, store = _fps(repo), _store(repo)
    rows = store.read_manifest(fps["kept"])["shards"]
    assert len(rows) == 5
    for row in rows:
        base = store.read_manifest(row[1])["indices"]["base"]
        assert row[4]["base"] == base
        assert row[4]["base_files"] == store.read_manifest(base)["files"]
    assert store.check(fps["kept"]) is None
    before = store.load(fps["kept"]).to_list()
    victim = rows[0][4]["base"]
    name = next(n for n in sorted(rows[0][4]["base_files"]) if n.endswith(".arrow"))
    with open(os.path.join(store.data_path(victim), name), "ab") as f:
        f.write(b"\0")
    assert victim in (store.check(fps["kept"]) or "")
    doit(repo, "run", "preprocess", log=tmp_path / "c.log")
    assert store.check(fps["kept"]) is None
    assert store.load(fps["kept"]).to_list() == before


def test_a_filters_own_indices_file_is_moved_not_written_again(tmp_path: pathlib.Path) -> None:
    """The indices file a filter wrote in the build's directory becomes the entry's
    indices file (moved: same inode), holding the same positions; one it did not write there
    (an input's, or a selection kept in memory) is written, never moved."""
    import datasets
    import numpy as np

    from hfbuild.store import indexed

    base = datasets.Dataset.from_dict({"x": list(range(50))})
    base.save_to_disk(str(tmp_path / "base"))
    loaded = datasets.load_from_disk(str(tmp_path / "base"))
    build = tmp_path / "build"
    build.mkdir()
    cache = str(build / "filter.arrow")
    kept = loaded.filter(
        lambda b: [v % 4 == 0 for v in b["x"]], batched=True, cache_file_name=cache
    )
    src = indexed.Source("b" * 32, "h", [(loaded.data.table, None)])
    inode = os.stat(cache).st_ino
    indexed.write(str(tmp_path / "out"), src, [indexed.Part("", kept, None)], False, [str(build)])
    assert os.stat(tmp_path / "out" / indexed.INDICES_FILE).st_ino == inode
    assert not os.path.exists(cache)
    got = indexed.read_indices(str(tmp_path / "out" / indexed.INDICES_FILE))
    assert got.tolist() == list(range(0, 50, 4))
    in_memory = loaded.filter(lambda b: [v < 5 for v in b["x"]], batched=True, keep_in_memory=True)
    indexed.write(
        str(tmp_path / "mem"), src, [indexed.Part("", in_memory, None)], False, [str(build)]
    )
    assert np.array_equal(
        indexed.read_indices(str(tmp_path / "mem" / indexed.INDICES_FILE)),
        np.arange(5, dtype=np.uint64),
    )
    elsewhere = loaded.filter(
        lambda b: [v > 45 for v in b["x"]],
        batched=True,
        cache_file_name=str(tmp_path / "other.arrow"),
    )
    indexed.write(
        str(tmp_path / "far"), src, [indexed.Part("", elsewhere, None)], False, [str(build)]
    )
    assert os.path.exists(tmp_path / "other.arrow")  # not the build's: copied
