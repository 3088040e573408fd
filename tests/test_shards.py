"""Growing data (issue #11): a load stage over several files is sharded, row-local stages run
file by file, and a change to the data rebuilds exactly the shards it must, with every result
identical to a full rebuild in a fresh store."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections import Counter

import pytest

from tests.helpers import Repo, run_hfbuild, run_python
from tests.pipeline_project import calls, doit
from tests.shard_project import make_project, state, write_part

PER_SHARD = ("feat", "idx", "keep")


def _per_shard(c: Counter[str], stage: str) -> set[str]:
    return {k.split(":", 1)[1] for k in c if k.startswith(stage + ":")}


def _fresh(repo: Repo, tmp_path: pathlib.Path, log: pathlib.Path) -> dict[str, object]:
    """The state after a full build of the same tree into an empty store."""
    env = {"HFBUILD_STORE": str(tmp_path / "fresh-store")}
    doit(repo, "run", "preprocess", log=log, env=env)
    return state(repo, env)


def _plain(repo: Repo) -> dict[str, list[object]]:
    """What plain `datasets` computes over the same files, in order (no hfbuild, no shards
    beyond datasets' own), for the idx stage."""
    import sys

    import datasets

    sys.path.insert(0, str(repo.path))
    files = sorted(str(p) for p in (repo.path / "data").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=None)
    ds = ds.map(lambda b: {"y": [x * 2 for x in b["x"]]}, batched=True)
    ds = ds.map(lambda b, i: {"i": list(i)}, batched=True, with_indices=True)
    return dict(ds.to_dict())


EDITS = {
    # edit name -> (what to do, the files whose feat shard must be rebuilt, idx shards rebuilt)
    "append": (lambda r: write_part(r, "part-4", 400), {"part-4"}, {"part-4"}),
    "insert": (
        lambda r: write_part(r, "part-1a", 150),
        {"part-1a"},
        {"part-1a", "part-2", "part-3"},
    ),
    "change": (lambda r: write_part(r, "part-2", 250), {"part-2"}, {"part-2", "part-3"}),
    "delete": (
        lambda r: (r.path / "data" / "part-1.parquet").unlink(),
        set(),
        {"part-2", "part-3"},
    ),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_data_edit_rebuilds_exactly_its_shards(tmp_path: pathlib.Path, edit: str) -> None:
    """Appending, inserting, changing or deleting one data file rebuilds exactly the shards it
    must (with_indices shards after an insertion too), and every stage's fingerprint, content
    hash and rows equal a full rebuild's in a fresh store."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    assert _per_shard(calls(log), "feat") == {f"part-{i}" for i in range(4)}
    change, feat_new, idx_new = EDITS[edit]
    change(repo)
    repo.commit(edit)
    log.unlink()
    doit(repo, "run", "preprocess", log=log)
    c = calls(log)
    assert _per_shard(c, "feat") == feat_new
    assert _per_shard(c, "idx") == idx_new
    assert _per_shard(c, "keep") == idx_new  # the filter follows the idx shards
    assert c["total:all"] == 1  # a whole-dataset stage takes every shard
    after = state(repo)
    assert after == _fresh(repo, tmp_path, tmp_path / "fresh.log")
    plain = _plain(repo)
    assert after["idx"]["rows"] == plain  # type: ignore[index]


def test_reordered_globs_rebuild_only_offset_shards(tmp_path: pathlib.Path) -> None:
    """Listing the same files in another order keeps every offset-free shard (nothing is
    recomputed for feat) and equals a fresh build of the new order."""
    repo = make_project(
        Repo.init(tmp_path / "repo"), data='["data/part-0.parquet", "data/part-[123].parquet"]'
    )
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    dodo = (repo.path / "dodo.py").read_text()
    (repo.path / "dodo.py").write_text(
        dodo.replace(
            '["data/part-0.parquet", "data/part-[123].parquet"]',
            '["data/part-[123].parquet", "data/part-0.parquet"]',
        )
    )
    repo.commit("reorder")
    log.unlink()
    doit(repo, "run", "preprocess", log=log)
    c = calls(log)
    assert _per_shard(c, "feat") == set()
    assert _per_shard(c, "idx") == {f"part-{i}" for i in range(4)}  # every offset moved
    after = state(repo)
    assert after["raw"]["rows"]["f"][0] == "part-1"  # type: ignore[index]
    assert after == _fresh(repo, tmp_path, tmp_path / "fresh.log")


def test_noop_after_append_builds_nothing(tmp_path: pathlib.Path) -> None:
    """Once built, a second run calls no transform, and the lock names the shard keys' stage
    fingerprints (a clone computes the same keys)."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    log.unlink()
    doit(repo, "run", "preprocess", log=log)
    assert calls(log) == Counter()
    lock = json.loads((repo.path / "hfbuild.lock").read_text())
    s = state(repo)
    for name in s:
        assert lock["stages"][name]["fingerprint"] == s[name]["fp"]


def test_build_line_and_du_count_shards(tmp_path: pathlib.Path) -> None:
    """A sharded stage's build line says how many of its shards were built, and `hfbuild du`
    counts each stage's shards as its own (nothing of the current results under "other")
    and every stored byte once; after an append the old stage entries, not the shared
    shards, become "other"."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    log = tmp_path / "calls.log"
    out = doit(repo, "run", "preprocess", log=log)
    assert "feat: built 4 of 4 shards (40 rows)" in out.stderr + out.stdout

    def du() -> dict[str, object]:
        got = run_hfbuild(repo, "du", "--json")
        assert got.returncode == 0, got.stderr
        doc: dict[str, object] = json.loads(got.stdout)
        return doc

    def stored() -> int:
        return sum(
            p.stat().st_size for p in (repo.path / ".hfbuild" / "objects").rglob("*") if p.is_file()
        )

    first = du()
    sizes = {r["stage"]: r["bytes"] for r in first["stages"]}  # type: ignore[attr-defined]
    assert first["other_bytes"] == 0
    assert sum(sizes.values()) == stored()
    entry = (repo.path / ".hfbuild" / "objects").glob(f"*/{state(repo)['feat']['fp']}")
    assert sizes["feat"] > 2 * sum(p.stat().st_size for d in entry for p in d.rglob("*"))

    write_part(repo, "part-4", 400)
    repo.commit("append")
    out = doit(repo, "run", "preprocess", log=log)
    assert "feat: built 1 of 5 shards (50 rows)" in out.stderr + out.stdout
    second = du()
    again = {r["stage"]: r["bytes"] for r in second["stages"]}  # type: ignore[attr-defined]
    assert sum(again.values()) + int(second["other_bytes"]) == stored()  # type: ignore[call-overload]
    assert again["feat"] > sizes["feat"]  # the four old shards are still counted as feat's
    assert int(second["other_bytes"]) > 0  # type: ignore[call-overload]


def test_missing_shard_is_never_served_and_is_rebuilt(tmp_path: pathlib.Path) -> None:
    """A stage result whose shard entry is gone or corrupt is not served (`result()` refuses
    it, doit rebuilds); the rebuild makes only that shard, and gc keeps referenced shards."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    before = state(repo)
    store = repo.path / ".hfbuild"
    feat = json.loads(
        next(
            p for p in (store / "objects").glob(f"*/{before['feat']['fp']}/manifest.json")
        ).read_text()
    )
    victim = feat["shards"][2][1]
    shutil.rmtree(store / "objects" / victim[:2] / victim)
    out = run_hfbuild(repo, "status")
    assert "feat" in out.stdout
    log.unlink()
    doit(repo, "run", "preprocess", log=log)
    assert _per_shard(calls(log), "feat") == {"part-2"}
    assert state(repo) == before
    out = run_hfbuild(repo, "gc", "--keep-days", "0")
    assert out.returncode == 0, out.stderr
    assert state(repo) == before  # every referenced shard survived gc
    out = run_hfbuild(repo, "verify", "--deep")
    assert out.returncode == 0, out.stdout + out.stderr


def _entry(store: pathlib.Path, fp: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(
        next((store / "objects").glob(f"*/{fp}/manifest.json")).read_text()
    )
    return doc


def test_rebuild_takes_listed_shards_only_while_their_files_are_intact(
    tmp_path: pathlib.Path,
) -> None:
    """A stage entry lists each shard with the rows and content hash its own manifest
    records (and that manifest's stamp); the next build takes a listed shard while its files
    have the listed sizes, and rebuilds one whose data file was overwritten: the result
    equals a fresh full build."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    store = repo.path / ".hfbuild"
    feat = _entry(store, state(repo)["feat"]["fp"])
    rows = feat["shards"]
    assert isinstance(rows, list) and len(rows) == 4
    for row in rows:
        shard = _entry(store, row[1])
        st = next((store / "objects").glob(f"*/{row[1]}/manifest.json")).stat()
        assert row[4] == {
            "rows": shard["rows"],
            "content_hash": shard["content_hash"],
            "stamp": [st.st_mtime_ns, st.st_size],
        }
    victim = next(r for r in rows if r[2] == "data/part-2.parquet")[1]
    arrow = next((store / "objects" / victim[:2] / victim / "data").glob("*.arrow"))
    with open(arrow, "ab") as f:
        f.write(b"overwritten")  # its manifest is untouched; only the size tells
    write_part(repo, "part-4", 400)
    repo.commit("grow")
    log.unlink()
    doit(repo, "run", "preprocess", log=log)
    assert _per_shard(calls(log), "feat") == {"part-2", "part-4"}
    assert state(repo) == _fresh(repo, tmp_path, tmp_path / "fresh.log")


def test_load_shard_is_load_dataset_of_its_one_file(tmp_path: pathlib.Path) -> None:
    """Each load shard holds what `load_dataset(builder, data_files=[its file])` saved with
    `save_to_disk` holds: the same file names, the same dataset_info.json and state.json (but
    datasets' own fingerprint), the same features and data; its stored content hash is that
    data's hash."""
    import datasets

    from hfbuild.content import dataset_hash
    from hfbuild.store import Store

    repo = make_project(Repo.init(tmp_path / "repo"))
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    store = Store(repo.path / ".hfbuild")
    raw = _entry(repo.path / ".hfbuild", state(repo)["raw"]["fp"])
    rows = raw["shards"]
    assert isinstance(rows, list) and len(rows) == 4
    for row in rows:
        key, label = row[1], row[2]
        theirs = tmp_path / "theirs" / key
        plain = datasets.load_dataset(
            "parquet",
            data_files=[str(repo.path / label)],
            split="train",
            cache_dir=str(tmp_path / "hf"),
        )
        plain.save_to_disk(str(theirs))
        ours = pathlib.Path(store.data_path(key))
        assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
        for name in ("dataset_info.json", "state.json"):
            mine, other = (json.loads((d / name).read_text()) for d in (ours, theirs))
            mine.pop("_fingerprint", None)
            other.pop("_fingerprint", None)
            assert mine == other, name
        loaded = store.load(key)
        assert loaded.features == plain.features
        assert loaded.to_dict() == plain.to_dict()
        assert _entry(repo.path / ".hfbuild", key)["content_hash"] == dataset_hash(plain)


def test_push_pull_per_shard(tmp_path: pathlib.Path) -> None:
    """A sharded result pushed to a file:// remote is pulled by a clone with an empty store,
    shard by shard, and serves the same rows without building anything."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    remote = tmp_path / "remote"
    env = {"HFBUILD_REMOTE": f"file://{remote}", "HFBUILD_PUSH": "1"}
    doit(repo, "run", "preprocess", log=tmp_path / "a.log", env=env)
    before = state(repo)
    clone = repo.clone(tmp_path / "clone")
    for p in (repo.path / "data").glob("*.parquet"):
        shutil.copy(p, clone.path / "data" / p.name)
    log = tmp_path / "b.log"
    doit(clone, "run", "preprocess", log=log, env={"HFBUILD_REMOTE": f"file://{remote}"})
    assert calls(log) == Counter()
    assert state(clone) == before
    assert os.path.isdir(remote / "objects")


def test_explain_and_status_name_the_new_shards(tmp_path: pathlib.Path) -> None:
    """After appending a file, `explain` and `status` say how many shards are new and which
    file each comes from; a changed file is told apart from an added one."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    write_part(repo, "part-4", 400)
    write_part(repo, "part-0", 7)
    repo.commit("grow")
    out = run_hfbuild(repo, "explain", "feat")
    assert out.returncode == 1
    assert (
        "2 of 5 shards new: data/part-0.parquet (changed), data/part-4.parquet (added)"
        in out.stdout
    )
    out = run_hfbuild(repo, "status")
    assert "feat   stale: 2 of 5 shards new: data/part-0.parquet (changed)" in out.stdout
    assert "raw    stale: 2 of 5 shards new" in out.stdout


CHECK_STORE = """
import dodo
from hfbuild.content import dataset_hash
from hfbuild.shards import combined_hash
s = dodo.pipe.store
served = 0
for fp in s.fingerprints():
    if not s.has(fp):
        continue
    doc = s.read_manifest(fp)
    if "shards" in doc:
        parts = [(r[0], dataset_hash(s.load(r[1]))) for r in doc["shards"]]
        got = combined_hash(parts)
    else:
        got = dataset_hash(s.load(fp))
    assert got == doc["content_hash"], (fp, "served but incomplete")
    served += 1
print(served)
"""

KILLS = [
    ("KILL_IN", "feat:part-2", ""),
    ("KILL_IN", "idx:part-1", ""),
    ("hfbuild.shardbuild:_publish_shard", 2, "before"),
    ("hfbuild.shardbuild:_publish_shard", 6, "after"),
    ("hfbuild.shardbuild:_publish", 1, "before"),
    ("hfbuild.shardbuild:_publish", 2, "after"),
    ("hfbuild.store:Store.publish", 3, "before"),
    ("os:rename", 5, "after"),
    ("hfbuild.builder:save", 7, "after"),
]


@pytest.mark.parametrize(
    ("target", "nth", "when"), KILLS, ids=[f"{t.split(':')[-1]}-{n}-{w}" for t, n, w in KILLS]
)
def test_killed_sharded_build_leaves_nothing_partial(
    tmp_path: pathlib.Path, target: str, nth: object, when: str
) -> None:
    """A SIGKILL inside a sharded build leaves no incomplete entry that would be served; the
    rerun builds only the shards not yet published and equals a fresh full build."""
    import signal
    import subprocess
    import sys

    from tests.helpers import run_python

    repo = make_project(Repo.init(tmp_path / "repo"))
    log = tmp_path / "calls.log"
    env = {**os.environ, "CALL_LOG": str(log)}
    killer = str(pathlib.Path(__file__).resolve().parent / "killer.py")
    if target == "KILL_IN":
        cmd = [sys.executable, "-m", "doit", "run", "preprocess"]
        env["KILL_IN"] = str(nth)
    else:
        cmd = [sys.executable, killer, target, str(nth), when, "run", "preprocess"]
    died = subprocess.run(cmd, cwd=repo.path, env=env, capture_output=True, check=False)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    run_python(CHECK_STORE, repo.path, env={"CALL_LOG": str(log)})
    before = calls(log)
    log.unlink(missing_ok=True)
    doit(repo, "run", "preprocess", log=log)
    again = calls(log)
    if nth == "feat:part-2":  # the two shards published before the kill are kept
        assert _per_shard(before, "feat") == {"part-0", "part-1"}  # killed before logging
        assert _per_shard(again, "feat") == {"part-2", "part-3"}
    assert state(repo) == _fresh(repo, tmp_path, tmp_path / "fresh.log")
    gc = run_hfbuild(repo, "gc", "--keep-days", "0")
    assert gc.returncode == 0, gc.stderr
    assert list((repo.path / ".hfbuild" / "tmp").iterdir()) == []


def test_four_concurrent_builders_build_each_shard_once(tmp_path: pathlib.Path) -> None:
    """Four `doit run` processes started together on a cold sharded pipeline: every shard's
    transform runs once in all, and all four finish with the same results."""
    import subprocess
    import sys

    repo = make_project(Repo.init(tmp_path / "repo"), parts=6)
    log = tmp_path / "calls.log"
    env = {**os.environ, "CALL_LOG": str(log)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "doit", "run", "preprocess"],
            cwd=repo.path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    c = calls(log)
    for i in range(6):
        assert c[f"feat:part-{i}"] == 2  # two batches of 7 rows over its 10
        assert c[f"idx:part-{i}"] == 1
        assert c[f"keep:part-{i}"] == 1
    assert c["total:all"] == 1
    assert state(repo) == _fresh(repo, tmp_path, tmp_path / "fresh.log")


def test_file_read_at_run_time_is_in_every_shard_key(tmp_path: pathlib.Path) -> None:
    """A sharded transform that reads a project file at run time: the file enters the key all
    the stage's shards share, recorded under the stage's code key, so appending a data file
    still rebuilds one shard, while editing the file read rebuilds every shard."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    t = (repo.path / "pkg" / "t.py").read_text()
    t = t.replace(
        'return {"y": [x * 2 for x in batch["x"]]}',
        'k = int(open("conf/k.txt").read())\n    return {"y": [x * k for x in batch["x"]]}',
    )
    (repo.path / "pkg" / "t.py").write_text(t)
    (repo.path / "conf").mkdir()
    (repo.path / "conf" / "k.txt").write_text("2\n")
    repo.commit("feat reads conf/k.txt")
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    lock = json.loads((repo.path / "hfbuild.lock").read_text())
    assert [p for p, _ in lock["stages"]["feat"]["observed"]] == ["conf/k.txt"]
    log.unlink()
    doit(repo, "run", "preprocess", log=log)
    assert calls(log) == Counter()
    write_part(repo, "part-4", 400)
    repo.commit("append")
    doit(repo, "run", "preprocess", log=log)
    assert _per_shard(calls(log), "feat") == {"part-4"}
    log.unlink()
    (repo.path / "conf" / "k.txt").write_text("5\n")
    repo.commit("k")
    doit(repo, "run", "preprocess", log=log)
    assert _per_shard(calls(log), "feat") == {f"part-{i}" for i in range(5)}
    s = state(repo)
    assert s["feat"]["rows"]["y"][:2] == [0, 5]  # type: ignore[index]
    assert s == _fresh(repo, tmp_path, tmp_path / "fresh.log")


def test_num_proc_builds_shards_in_parallel_processes(tmp_path: pathlib.Path) -> None:
    """With `num_proc=2` the shards are built by two processes, each shard once, and every
    fingerprint, content hash and row equals the one-process build's."""
    repo = make_project(Repo.init(tmp_path / "repo"), parts=5)
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    serial = state(repo)
    dodo = (repo.path / "dodo.py").read_text()
    dodo = dodo.replace("batch_size=7)", "batch_size=7, num_proc=2)")
    dodo = dodo.replace("with_indices=True)", "with_indices=True, num_proc=2)")
    (repo.path / "dodo.py").write_text(dodo)
    repo.commit("num_proc")
    pids = tmp_path / "pids.log"
    env = {"HFBUILD_STORE": str(tmp_path / "parallel-store"), "PID_LOG": str(pids)}
    log.unlink()
    out = doit(repo, "run", "preprocess", log=log, env=env)
    assert len({line for line in pids.read_text().split() if line.startswith("feat:")}) == 2
    c = calls(log)
    for i in range(5):
        assert c[f"feat:part-{i}"] == 2 and c[f"idx:part-{i}"] == 1
    assert state(repo, env) == serial
    assert list((tmp_path / "parallel-store" / "tmp").iterdir()) == []  # nothing left behind
    assert out.returncode == 0


def test_sharded_false_keeps_the_whole_input_build(tmp_path: pathlib.Path) -> None:
    """`sharded=False` on a map runs it over the whole input as before (one stored entry,
    batches across files), while the load under it stays sharded and the rows are equal."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    sharded = state(repo)
    dodo = (repo.path / "dodo.py").read_text()
    (repo.path / "dodo.py").write_text(
        dodo.replace("batch_size=7)", "batch_size=7, sharded=False)")
    )
    repo.commit("opt out")
    log.unlink()
    doit(repo, "run", "preprocess", log=log)
    c = calls(log)
    # Batches of 7 over 40 rows (one line per file in a batch): 3 batches span two files,
    # 9 lines; file by file it would be 2 batches a file, 8 lines.
    assert sum(n for k, n in c.items() if k.startswith("feat:")) == 9
    whole = state(repo)
    assert whole["feat"]["rows"] == sharded["feat"]["rows"]
    assert whole["feat"]["fp"] != sharded["feat"]["fp"]
    store = repo.path / ".hfbuild" / "objects"
    doc = json.loads(next(store.glob(f"*/{whole['feat']['fp']}/manifest.json")).read_text())
    assert "shards" not in doc and doc["files"]


def test_deep_verify_finds_a_damaged_shard_and_the_stage_is_not_served(
    tmp_path: pathlib.Path,
) -> None:
    """Same-size damage to one shard's Arrow file: `verify --deep` reports it and moves it
    aside, after which the stages listing it are not served and a build remakes that shard."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    before = state(repo)
    store = repo.path / ".hfbuild" / "objects"
    doc = json.loads(next(store.glob(f"*/{before['feat']['fp']}/manifest.json")).read_text())
    key = doc["shards"][1][1]
    arrow = next((store / key[:2] / key / "data").glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[-200] ^= 0xFF
    arrow.write_bytes(bytes(data))
    out = run_hfbuild(repo, "verify", "--deep")
    assert out.returncode == 1
    assert key in out.stdout + out.stderr
    out = run_hfbuild(repo, "status")
    assert "feat   stale: 1 of 4 shards new: data/part-1.parquet" in out.stdout
    log.unlink()
    doit(repo, "run", "preprocess", log=log)
    assert _per_shard(calls(log), "feat") == {"part-1"}
    assert state(repo) == before


def test_shards_with_different_schemas_load_aligned(tmp_path: pathlib.Path) -> None:
    """A file whose column holds only nulls (its own schema says `null`) loads as its own
    shard; the stage's result aligns the shards' features as `concatenate_datasets` does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = make_project(Repo.init(tmp_path / "repo"), parts=2)
    table = pa.table({"x": pa.array([1000, 1001]), "f": pa.array([None, None], pa.null())})
    pq.write_table(table, repo.path / "data" / "part-9.parquet")
    dodo = (repo.path / "dodo.py").read_text()
    (repo.path / "dodo.py").write_text(
        dodo.split("feat = ")[0] + dodo[dodo.index("\n\ndef task_") :]
    )
    repo.commit("a file of nulls")
    from tests.helpers import run_python

    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    out = run_python(
        "import warnings; warnings.simplefilter('ignore')\n"
        "import dodo\nds = dodo.pipe.result('raw')\n"
        "print(ds.features['f'].dtype, ds['f'][-2:], ds['x'][-2:], len(ds))",
        repo.path,
    )
    assert out.stdout.strip().splitlines()[-1] == "string [None, None] [1000, 1001] 22"


def test_publish_returns_the_manifest_it_wrote(tmp_path: pathlib.Path) -> None:
    """`Store.publish` returns the manifest exactly as the store then reads it back."""
    from hfbuild.store import Store

    store = Store(tmp_path / "store")
    build = pathlib.Path(store.new_build_dir("0" * 32))
    (build / "data" / "sub").mkdir(parents=True)
    (build / "data" / "a.arrow").write_bytes(b"x" * 7)
    (build / "data" / "sub" / "b.json").write_text('{"k": 1}')
    fp = "ab" * 16
    with store.lock(fp):
        got = store.publish(str(build), fp, {"rows": 3, "content_hash": "h"}, durable=False)
    assert got == store.read_manifest(fp) == store.intact_manifest(fp)
    assert got["files"] == {"a.arrow": 7, "sub/b.json": 8}


def test_lock_a_build_records_is_the_lock_of_the_store(tmp_path: pathlib.Path) -> None:
    """The hfbuild.lock a build writes, recording the entries it just published or found
    without reading them back, is the one `hfbuild lock` derives from the store, after a
    cold build and after an append."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    log = tmp_path / "calls.log"
    for step in ("cold", "append"):
        if step == "append":
            write_part(repo, "part-4", 400)
            repo.commit("append")
        doit(repo, "run", "preprocess", log=log)
        built = (repo.path / "hfbuild.lock").read_text()
        out = run_hfbuild(repo, "lock")
        assert out.returncode == 0, out.stderr
        assert (repo.path / "hfbuild.lock").read_text() == built


def test_list_of_shards_is_written_on_one_line(tmp_path: pathlib.Path) -> None:
    """A stage's list of shards is written as one line of JSON (other manifests stay
    indented), and reads back, checksum included, as the manifest published."""
    from hfbuild.store import MANIFEST, Store

    store = Store(tmp_path / "store")
    shard, stage = "ab" * 16, "cd" * 16
    for fp, doc in [
        (shard, {"rows": 3, "content_hash": "h"}),
        (stage, {"rows": 3, "content_hash": "k", "shards": [["train", shard, "a", {}, {}]]}),
    ]:
        build = pathlib.Path(store.new_build_dir(fp))
        (build / "data").mkdir()
        with store.lock(fp):
            got = store.publish(str(build), fp, doc)
        assert got == store.read_manifest(fp) == store.intact_manifest(fp)
    lines = [
        len((pathlib.Path(store.entry(fp)) / MANIFEST).read_text().splitlines())
        for fp in (shard, stage)
    ]
    assert lines[0] > 1 and lines[1] == 1


SPLITS = '{"a": "data/part-[01]*.parquet", "b": "data/part-[23]*.parquet"}'

SPLITS_DODO = f"""
from hfbuild import Pipeline
from pkg import t

pipe = Pipeline()
raw = pipe.load("raw", "parquet", data_files={SPLITS})
feat = pipe.map("feat", raw, t.feat, batched=True, batch_size=7)
kept = pipe.filter("kept", feat, t.keep, batched=True)


def task_preprocess():
    yield from pipe.tasks()
"""

READ_SPLITS = f"""
import glob, json, warnings
warnings.simplefilter("ignore")
import datasets, dodo
from pkg import t
out = {{}}
for name in ("raw", "feat", "kept"):
    dd = dodo.pipe.result(name)
    assert isinstance(dd, datasets.DatasetDict), (name, type(dd))
    out[name] = {{s: dd[s].to_dict() for s in dd}}
files = {{s: sorted(glob.glob(p)) for s, p in {SPLITS}.items()}}
plain = datasets.load_dataset("parquet", data_files=files)
plain = plain.map(t.feat, batched=True, batch_size=7).filter(t.keep, batched=True)
out["plain"] = {{s: plain[s].to_dict() for s in plain}}
print(json.dumps(out))
"""


def test_sharded_splits_stay_a_dataset_dict_through_rebuilds(tmp_path: pathlib.Path) -> None:
    """A sharded load without `split=` is a DatasetDict, and so are the sharded map and filter
    over it, in a full build and after appending a file to one split, with the rows plain
    `datasets` gives."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    (repo.path / "dodo.py").write_text(SPLITS_DODO)
    repo.commit("splits")
    log = tmp_path / "calls.log"
    for step in ("cold", "append"):
        if step == "append":
            write_part(repo, "part-1b", 150)
            repo.commit("append")
        doit(repo, "run", "preprocess", log=log)
        out = run_python(READ_SPLITS, repo.path, env={"CALL_LOG": os.devnull})
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["kept"] == got["plain"]
        assert sorted(got["raw"]) == ["a", "b"]
    assert len(got["raw"]["a"]["x"]) == 30
