"""Growing data (issue #11): a load stage over several files is sharded, row-local stages run
file by file, and a change to the data rebuilds exactly the shards it must, with every result
identical to a full rebuild in a fresh store."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time
from collections import Counter

import pytest

from hfbuild.store import listform
from tests.helpers import Repo, read_python, run_hfbuild, run_python
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
    # The filter follows the idx shards whose output changed: a changed file of as many rows
    # leaves the idx output of the file after it as it was (the same rows, the same offset),
    # so that shard is cut off (issue #19).
    keep_new = idx_new - {"part-3"} if edit == "change" else idx_new
    assert _per_shard(c, "keep") == keep_new
    assert c["total:all"] == 1  # a whole-dataset stage takes every shard
    after = state(repo)
    assert after == _fresh(repo, tmp_path, tmp_path / "fresh.log")
    plain = _plain(repo)
    assert after["idx"]["rows"] == plain  # type: ignore[index]


def test_reordered_globs_rebuild_only_offset_shards(tmp_path: pathlib.Path) -> None:
    """Listing the same files in another order after the first (the first file's schema
    decides every load shard's features) keeps every offset-free shard (nothing is
    recomputed for feat) and equals a fresh build of the new order."""
    first, rest = '"data/part-0.parquet"', ['"data/part-1.parquet"', '"data/part-[23].parquet"']
    repo = make_project(Repo.init(tmp_path / "repo"), data=f"[{first}, {', '.join(rest)}]")
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    dodo = (repo.path / "dodo.py").read_text()
    (repo.path / "dodo.py").write_text(
        dodo.replace(f"[{first}, {', '.join(rest)}]", f"[{first}, {', '.join(rest[::-1])}]")
    )
    repo.commit("reorder")
    log.unlink()
    doit(repo, "run", "preprocess", log=log)
    c = calls(log)
    assert _per_shard(c, "feat") == set()
    assert _per_shard(c, "idx") == {"part-1", "part-2", "part-3"}  # their offsets moved
    after = state(repo)
    assert after["raw"]["rows"]["f"][10] == "part-2"  # type: ignore[index]
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
    feat = listform.expand(
        json.loads(
            next(
                p for p in (store / "objects").glob(f"*/{before['feat']['fp']}/manifest.json")
            ).read_text()
        )
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
    doc: dict[str, object] = listform.expand(
        json.loads(next((store / "objects").glob(f"*/{fp}/manifest.json")).read_text())
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
            "features": shard["features"],
            "form": shard["form"],
            "input": shard["shard"]["input"],
            "content": shard["shard"]["content"],
            "before": "",
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


# What a load's dataset_info.json says of the whole load, not of one file's rows in it.
_WHOLE_LOAD_INFO = (
    "splits",
    "download_size",
    "dataset_size",
    "size_in_bytes",
    "download_checksums",
)


def test_load_shard_is_load_dataset_of_its_one_file(tmp_path: pathlib.Path) -> None:
    """Each load shard holds what `load_dataset(builder, data_files=[its file])` saved with
    `save_to_disk` holds: the same file names, the same state.json (but datasets' own
    fingerprint), the same dataset_info.json but for what describes a whole load (its
    splits' sizes, download sizes: the missing shards are loaded by one `load_dataset`), the
    same features and data; its stored content hash is that data's hash."""
    import datasets

    from hfbuild.store.content import dataset_hash
    from hfbuild.store.entry import row_owner
    from hfbuild.store.store import Store

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
        # A shard loaded with the others is a row range of their pack, laid out as a part.
        ours = pathlib.Path(store.data_path(row_owner(row)))
        assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
        for name in ("dataset_info.json", "state.json"):
            mine, other = (json.loads((d / name).read_text()) for d in (ours, theirs))
            for key_of_a_whole_load in (*_WHOLE_LOAD_INFO, "_fingerprint"):
                mine.pop(key_of_a_whole_load, None)
                other.pop(key_of_a_whole_load, None)
            assert mine == other, name
        loaded = store.load_shard(key, state(repo)["raw"]["fp"])
        assert loaded.features == plain.features
        assert loaded.to_dict() == plain.to_dict()
        assert row[4]["content_hash"] == dataset_hash(plain)


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
    write_part(repo, "part-1", 7)  # not the first file: its schema is every shard's
    repo.commit("grow")
    out = run_hfbuild(repo, "explain", "raw")
    assert out.returncode == 1
    assert (
        "2 of 5 shards new: data/part-1.parquet (changed), data/part-4.parquet (added)"
        in out.stdout
    )
    out = run_hfbuild(repo, "status")
    assert "raw    stale: 2 of 5 shards new: data/part-1.parquet (changed)" in out.stdout
    # feat's key holds its input shards' contents, known once raw is built (issue #19).
    assert "feat   stale: input 'raw' is being rebuilt (may be cut off)" in out.stdout
    doit(repo, "run", "preprocess:raw", log=tmp_path / "calls.log")
    out = run_hfbuild(repo, "explain", "feat")
    assert out.returncode == 1
    assert (
        "2 of 5 shards new: data/part-1.parquet (changed), data/part-4.parquet (added)"
        in out.stdout
    )
    out = run_hfbuild(repo, "status")
    assert "feat   stale: 2 of 5 shards new: data/part-1.parquet (changed)" in out.stdout


def test_explain_says_a_sharded_result_is_its_listed_shards(tmp_path: pathlib.Path) -> None:
    """An up-to-date sharded stage has no data of its own: explain names the entry listing
    its shards, how many, and `pipe.result`, not a `data/` directory."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    fp = state(repo)["feat"]["fp"]
    entry = repo.path / ".hfbuild" / "objects" / fp[:2] / fp
    assert not (entry / "data").exists()
    out = run_hfbuild(repo, "explain", "feat")
    assert out.returncode == 0
    assert out.stdout.splitlines()[1] == (
        f"fingerprint {fp}; result: 4 shards listed by the entry {entry}; "
        "load it with pipe.result('feat')"
    )
    doc = json.loads(run_hfbuild(repo, "explain", "feat", "--json").stdout)
    assert (doc["result_kind"], doc["result_path"], doc["result_shards"]) == (
        "shards",
        str(entry),
        4,
    )


SPLIT_FILES = {
    "pkg/__init__.py": "",
    "pkg/t.py": """
        def feat(row):
            return {"y": row["x"] * 2}
        """,
    "dodo.py": """
        from hfbuild import Pipeline
        from pkg import t

        pipe = Pipeline()
        files = {
            "train": ["data/part-0.parquet", "data/part-1.parquet"],
            "test": ["data/part-2.parquet", "data/part-3.parquet"],
        }
        raw = pipe.load("raw", "parquet", data_files=files)
        feat = pipe.map("feat", raw, t.feat)


        def task_preprocess():
            yield from pipe.tasks()
        """,
}

SPLIT_ROWS = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
print(json.dumps({s: len(d) for s, d in dodo.pipe.result("feat").items()}))
"""


def test_sharded_split_rows_are_reported_in_the_datasets_split_order(
    tmp_path: pathlib.Path,
) -> None:
    """A sharded DatasetDict stage's rows per split are written in the order its result
    gives its splits (the `data_files` dict's, train before test, as datasets gives them),
    on the "built" and "up to date" lines alike."""
    repo = Repo.init(tmp_path / "repo").write(SPLIT_FILES)
    for i, n in enumerate((10, 10, 3, 3)):
        write_part(repo, f"part-{i}", 100 * i, rows=n)
    repo.commit("project")
    out = run_hfbuild(repo, "build")
    assert out.returncode == 0, out.stderr
    order = json.loads(read_python(SPLIT_ROWS, repo.path).stdout.strip().splitlines()[-1])
    assert list(order) == ["train", "test"]
    rows = ", ".join(f"{s} {n}" for s, n in order.items()) + " rows"
    assert f"feat: built 4 of 4 shards ({rows}) in " in out.stdout
    assert f"feat: up to date ({rows})" in run_hfbuild(repo, "build").stdout.splitlines()


CHECK_STORE = """
import dodo
from hfbuild.store.content import dataset_hash
from hfbuild.store.content import combined_hash
s = dodo.pipe.store
served = 0
for fp in s.fingerprints():
    if not s.has(fp):
        continue
    doc = s.read_manifest(fp)
    if "shards" in doc:
        parts = [(r[0], dataset_hash(s.load_shard(r[1], fp))) for r in doc["shards"]]
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
    ("hfbuild.builds.shardbuild:_publish_shard", 2, "before"),
    ("hfbuild.builds.shardbuild:_publish_shard", 6, "after"),
    ("hfbuild.builds.shardbuild:_publish", 1, "before"),
    ("hfbuild.builds.shardbuild:_publish", 2, "after"),
    ("hfbuild.store.store:Store.publish_first", 3, "before"),
    # a shard's manifest written, not yet moved
    ("hfbuild.store.publish:Publisher.seal", 3, "after"),
    ("hfbuild.store.store:Store.publish", 3, "before"),
    ("os:rename", 5, "after"),
    ("hfbuild.builds.builder:save", 7, "after"),
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
    read_python(CHECK_STORE, repo.path, env={"CALL_LOG": str(log)})  # fails on an error
    before = calls(log)
    log.unlink(missing_ok=True)
    doit(repo, "run", "preprocess", log=log)
    again = calls(log)
    if nth == "feat:part-2":  # the two shards published before the kill are kept
        assert _per_shard(before, "feat") == {"part-0", "part-1"}  # killed before logging
        assert _per_shard(again, "feat") == {"part-2", "part-3"}
    assert state(repo) == _fresh(repo, tmp_path, tmp_path / "fresh.log")
    if target == "hfbuild.builds.shardbuild:_publish_shard":  # the killed build's scratch: for gc
        assert any(p.name.startswith("trash.") for p in (repo.path / ".hfbuild/tmp").iterdir())
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
        assert c[f"feat:part-{i}"] == 10  # once per row
        assert c[f"idx:part-{i}"] == 10
        assert c[f"keep:part-{i}"] == 10
    assert c["total:all"] == 1
    # The same results as a build into an empty store. Not the same keys: a builder's watch
    # sees the others' opens as they start (`watch.py`: inotify names no process), so a
    # key may hold a read its transform never made (at worst a rebuild after that file
    # changes, never another result): seen 1 run in 20 at load ~5.
    fresh = _fresh(repo, tmp_path, tmp_path / "fresh.log")
    assert {k: {**v, "fp": None} for k, v in state(repo).items()} == {
        k: {**v, "fp": None} for k, v in fresh.items()
    }


def test_reads_seen_mid_build_rekey_the_shards_built_without_running_them_again(
    tmp_path: pathlib.Path,
) -> None:
    """A sharded map's build that sees, after some of its shards, reads it did not key them
    with (another process reading the project meanwhile: inotify sees every process's opens,
    as a second `doit run` starting up reads pyproject.toml) keys every shard with them, yet
    runs each shard's transform once: the shards published before are published under their
    new keys from their entries. A second builder started meanwhile finds every stage built,
    and the results are those of a build into an empty store."""
    import subprocess
    import sys

    repo = make_project(Repo.init(tmp_path / "repo"), parts=4)
    log = tmp_path / "calls.log"
    (tmp_path / "hold").write_text("feat:part-2")
    env = {**os.environ, "CALL_LOG": str(log)}
    cmd = [sys.executable, "-m", "doit", "run", "preprocess"]
    first = subprocess.Popen(cmd, cwd=repo.path, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (tmp_path / "hold-reached").exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    # The first builder holds feat's lock, past two shards: the second one starts meanwhile.
    second = subprocess.Popen(cmd, cwd=repo.path, env=env, stderr=subprocess.PIPE)
    (repo.path / "pyproject.toml").read_text()  # a read every builder's start makes, here sure
    (tmp_path / "hold-go").touch()
    for p in (first, second):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    lock = json.loads((repo.path / "hfbuild.lock").read_text())
    assert "pyproject.toml" in [p for p, _ in lock["stages"]["feat"]["observed"]]
    c = calls(log)
    for i in range(4):
        assert c[f"feat:part-{i}"] == 10  # once per row
        assert c[f"idx:part-{i}"] == 10
    assert c["total:all"] == 1
    # The same results as a build into an empty store; the keys may hold the other builder's
    # reads (as feat's does here), which that build did not see.
    fresh = _fresh(repo, tmp_path, tmp_path / "fresh.log")
    assert {k: {**v, "fp": None} for k, v in state(repo).items()} == {
        k: {**v, "fp": None} for k, v in fresh.items()
    }


def test_a_listing_of_the_root_leaves_out_the_file_a_lock_is_written_through(
    tmp_path: pathlib.Path,
) -> None:
    """A sharded transform that lists the project's root keeps its key while another process
    writes a lock there (through a `.tmp-*.hfbuild` file, until its rename): a builder that
    waited for the stage and resolves its key again finds it built, instead of building
    every shard once more."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    t = (repo.path / "pkg" / "t.py").read_text()
    t = t.replace('return {"y": row["x"] * 2}', 'os.listdir(".")\n    return {"y": row["x"] * 2}')
    (repo.path / "pkg" / "t.py").write_text(t)
    repo.commit("feat lists the root")
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    lock = json.loads((repo.path / "hfbuild.lock").read_text())
    assert [p for p, _ in lock["stages"]["feat"]["observed"]] == ["."]
    log.unlink()
    (repo.path / ".tmp-k2x9q1.hfbuild").write_text("{}")  # a lock being written meanwhile
    doit(repo, "run", "preprocess", log=log)
    assert calls(log) == Counter()


def test_file_read_at_run_time_is_in_every_shard_key(tmp_path: pathlib.Path) -> None:
    """A sharded transform that reads a project file at run time: the file enters the key all
    the stage's shards share, recorded under the stage's code key, so appending a data file
    still rebuilds one shard, while editing the file read rebuilds every shard."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    t = (repo.path / "pkg" / "t.py").read_text()
    t = t.replace(
        'return {"y": row["x"] * 2}',
        'k = int(open("conf/k.txt").read())\n    return {"y": row["x"] * k}',
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
    dodo = dodo.replace("t.feat)", "t.feat, num_proc=2)")
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
        assert c[f"feat:part-{i}"] == 10 and c[f"idx:part-{i}"] == 10
    assert state(repo, env) == serial
    assert list((tmp_path / "parallel-store" / "tmp").iterdir()) == []  # nothing left behind
    assert out.returncode == 0


def test_sharded_false_keeps_the_whole_input_build(tmp_path: pathlib.Path) -> None:
    """`sharded=False` on a map runs it over the whole input as before (one stored entry),
    while the load under it stays sharded and the rows are equal."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    sharded = state(repo)
    dodo = (repo.path / "dodo.py").read_text()
    (repo.path / "dodo.py").write_text(dodo.replace("t.feat)", "t.feat, sharded=False)"))
    repo.commit("opt out")
    log.unlink()
    doit(repo, "run", "preprocess", log=log)
    c = calls(log)
    assert sum(n for k, n in c.items() if k.startswith("feat:")) == 40  # once per row
    whole = state(repo)
    assert whole["feat"]["rows"] == sharded["feat"]["rows"]
    assert whole["feat"]["fp"] != sharded["feat"]["fp"]
    store = repo.path / ".hfbuild" / "objects"
    doc = json.loads(next(store.glob(f"*/{whole['feat']['fp']}/manifest.json")).read_text())
    assert "shards" not in doc and doc["files"]
    raw = listform.expand(
        json.loads(next(store.glob(f"*/{whole['raw']['fp']}/manifest.json")).read_text())
    )
    assert len(raw["shards"]) == 4


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
    doc = listform.expand(
        json.loads(next(store.glob(f"*/{before['feat']['fp']}/manifest.json")).read_text())
    )
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
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    out = read_python(
        "import warnings; warnings.simplefilter('ignore')\n"
        "import dodo\nds = dodo.pipe.result('raw')\n"
        "print(ds.features['f'].dtype, ds['f'][-2:], ds['x'][-2:], len(ds))",
        repo.path,
    )
    assert out.stdout.strip().splitlines()[-1] == "string [None, None] [1000, 1001] 22"


def test_publish_returns_the_manifest_it_wrote(tmp_path: pathlib.Path) -> None:
    """`Store.publish` returns the manifest exactly as the store then reads it back."""
    from hfbuild.store.store import Store

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


def _sealed(store: object, fp: str, content: bytes) -> str:
    """A build directory of `store` holding one data file with `content`."""
    build = pathlib.Path(store.new_build_dir(fp))  # type: ignore[attr-defined]
    (build / "data").mkdir()
    (build / "data" / "a.arrow").write_bytes(content)
    return str(build)


def test_publish_first_keeps_an_intact_entry_and_replaces_a_damaged_one(
    tmp_path: pathlib.Path,
) -> None:
    """`Store.publish_first` (a shard's publish, without its lock): the first entry stays
    and a second publish of the key returns it; a damaged entry in the way is moved aside
    and replaced; no lock file is made for the key unless something was in the way."""
    from hfbuild.store.store import Store

    store = Store(tmp_path / "store")
    fp = "cd" * 16
    first = store.publish_first(_sealed(store, "0" * 32, b"first"), fp, {"rows": 1})
    assert first == store.intact_manifest(fp)
    assert not (tmp_path / "store" / "locks" / f"{fp}.lock").exists()
    second = _sealed(store, "1" * 32, b"other")
    assert store.publish_first(second, fp, {"rows": 1}) == first
    assert not os.path.exists(second)  # to the trash
    assert (pathlib.Path(store.data_path(fp)) / "a.arrow").read_bytes() == b"first"
    (pathlib.Path(store.data_path(fp)) / "a.arrow").write_bytes(b"cut")  # damaged
    third = store.publish_first(_sealed(store, "2" * 32, b"third"), fp, {"rows": 1})
    assert third == store.intact_manifest(fp)
    assert (pathlib.Path(store.data_path(fp)) / "a.arrow").read_bytes() == b"third"
    assert any(".corrupt-" in p.name for p in (tmp_path / "store" / "tmp").iterdir())


RACER = """
import os, pathlib, sys, time
from hfbuild.store.store import Store
store = Store(sys.argv[1])
build = pathlib.Path(store.new_build_dir(sys.argv[3]))
(build / "data").mkdir()
(build / "data" / "a.arrow").write_bytes(sys.argv[3].encode())
while not os.path.exists(sys.argv[4]):
    time.sleep(0.001)
doc = store.publish_first(str(build), sys.argv[2], {"rows": 1})
print(doc["manifest_digest"])
"""


def test_racing_publish_first_one_entry_wins(tmp_path: pathlib.Path) -> None:
    """Six processes publish the same key at once without its lock: one entry is in the
    store, intact, and every process was handed that entry's manifest."""
    import subprocess
    import sys

    from hfbuild.store.store import Store

    fp, go = "ef" * 16, tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path / "store"), fp, f"{i:032x}", str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    time.sleep(2)  # every racer ready: its build directory made
    go.touch()
    digests = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    doc = Store(tmp_path / "store").intact_manifest(fp)
    assert doc is not None and digests == {doc["manifest_digest"]}


def test_cold_build_leaves_no_scratch_and_no_lock_per_shard(tmp_path: pathlib.Path) -> None:
    """After a sharded build's process exits, nothing of its scratch is left in the store:
    tmp/ is empty, entries hold only their manifest, data and files' identities, and locks/
    holds the stages' locks, not one file per shard."""
    repo = make_project(Repo.init(tmp_path / "repo"), parts=5)
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    store = repo.path / ".hfbuild"
    assert list((store / "tmp").iterdir()) == []
    entries = [e for d in (store / "objects").iterdir() for e in d.iterdir()]
    assert len(entries) > 5 * 4  # the shards of four sharded stages, and the stage entries
    assert {p.name for e in entries for p in e.iterdir()} <= {"manifest.json", "data"}
    locks = {p.name for p in (store / "locks").iterdir()}
    shard_keys = {
        row[1]
        for e in entries
        for row in listform.expand(json.loads((e / "manifest.json").read_text())).get("shards", [])
    }
    assert len(shard_keys) == 5 * 4
    assert not {f"{k}.lock" for k in shard_keys} & locks


SPLIT_ORDER = """
import json, tempfile, warnings
warnings.simplefilter("ignore")
import datasets
import dodo
out = {}
for name in ("raw", "whole", "order"):
    got = dodo.pipe.result(name)
    splits = list(got) if name != "order" else got["train"]["seen"][0]
    out[name] = {"fp": dodo.pipe[name].fingerprint, "splits": splits}
# A cache of its own: datasets' cache names one dataset for both orders of the same files.
plain = datasets.load_dataset("parquet", data_files=dodo.FILES, cache_dir=tempfile.mkdtemp())
out["plain"] = list(plain)
out["raw_rows"] = {s: dodo.pipe.result("raw")[s].to_dict() for s in plain}
out["plain_rows"] = {s: plain[s].to_dict() for s in plain}
print(json.dumps(out))
"""


@pytest.mark.parametrize("order", [("train", "test"), ("test", "train")])
def test_split_order_of_a_dict_load_is_in_its_key_and_its_result(
    tmp_path: pathlib.Path, order: tuple[str, str]
) -> None:
    """A load over `data_files={split: files}` gives its splits in the dict's order, as
    plain datasets does, sharded or not (and an apply sees that order); the other order is
    another fingerprint, while each file's load shard is shared by both."""
    repo = Repo.init(tmp_path / "repo")
    for i in range(2):
        write_part(repo, f"tr-{i}", 10 * i)
        write_part(repo, f"te-{i}", 100 + 10 * i)
    pats = {"train": "data/tr-*.parquet", "test": "data/te-*.parquet"}
    files = {s: pats[s] for s in order}
    repo.write(
        {
            "pkg/__init__.py": "",
            "pkg/o.py": "import datasets\n\n"
            "def order(dd):\n"
            "    return datasets.DatasetDict({'train': datasets.Dataset.from_dict("
            "{'seen': [','.join(dd)]})})\n",
            "dodo.py": f"""
                from hfbuild import Pipeline
                from pkg import o

                FILES = {files!r}
                pipe = Pipeline()
                raw = pipe.load("raw", "parquet", data_files=FILES)
                whole = pipe.load("whole", "parquet", data_files=FILES, sharded=False)
                seen = pipe.apply("order", raw, o.order)


                def task_preprocess():
                    yield from pipe.tasks()
                """,
        },
        commit="project",
    )
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")

    got = json.loads(read_python(SPLIT_ORDER, repo.path).stdout.strip().splitlines()[-1])
    assert got["plain"] == list(order)
    assert got["raw"]["splits"] == got["whole"]["splits"] == list(order)
    assert got["order"]["splits"] == ",".join(order)
    assert got["raw_rows"] == got["plain_rows"]
    other = {s: pats[s] for s in reversed(order)}
    dodo = (repo.path / "dodo.py").read_text().replace(repr(files), repr(other))
    repo.write({"dodo.py": dodo}, commit="other order")
    store = repo.path / ".hfbuild"
    before = {p.name for d in (store / "objects").iterdir() for p in d.iterdir()}
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    after = {p.name for d in (store / "objects").iterdir() for p in d.iterdir()}
    # The three stages' entries, and the four load shards: the first split's first file,
    # whose schema datasets gives every file, is another one (it is in every shard's key);
    # each split's shards, loaded together, are one pack.
    assert len(after - before) == 3 + 2
    swapped = json.loads(read_python(SPLIT_ORDER, repo.path).stdout.strip().splitlines()[-1])
    for name in ("raw", "whole", "order"):
        assert swapped[name]["fp"] != got[name]["fp"], name
    assert swapped["raw"]["splits"] == swapped["plain"] == list(reversed(order))


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
    from hfbuild.store.paths import MANIFEST
    from hfbuild.store.store import Store

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
feat = pipe.map("feat", raw, t.feat)
kept = pipe.filter("kept", feat, t.keep)


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
plain = plain.map(t.feat).filter(t.keep)
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


SIFT = """
    import os


    def twice(row):
        return {"y": row["x"] * 2}


    def sift(row):
        with open(os.environ["CALL_LOG"], "a") as out:
            out.write("sift\\n")
        if row["x"] >= 20:  # the last file's rows read the shelf
            with open("shelf/n.txt") as f:
                return row["x"] % int(f.read()) != 0
        return row["x"] % 2 != 0
    """

SIFT_DODO = """
    from hfbuild import Pipeline
    from pkg import u

    pipe = Pipeline()
    raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
    feat = pipe.map("feat", raw, u.twice)
    kept = pipe.filter("kept", feat, u.sift)


    def task_preprocess():
        yield from pipe.tasks()
    """

SIFT_PARTS = """
import hashlib, json, os, dodo
s = dodo.pipe.store
out = []
for r in s.read_manifest(dodo.pipe["kept"].fingerprint)["shards"]:
    files = {}
    for rel in sorted(r[3]):
        with open(os.path.join(s.data_path(r[1]), rel), "rb") as f:
            files[rel] = hashlib.sha256(f.read()).hexdigest()
    out.append([r[1], s.read_manifest(r[1])["indices"]["parts"], files])
print(json.dumps(out))
"""


def test_a_rekeyed_indices_shard_names_its_new_key_as_a_build_under_it_does(
    tmp_path: pathlib.Path,
) -> None:
    """A sharded filter (its shards indices entries over the map's) whose last shard reads
    a file its key lacked: the shards built before are re-keyed, not built again, and the
    last one too (built under the key before its read). Each one's files and manifest hold
    its new key where a clone's build, which knew the key from the start, writes it: its
    `indices.arrow`'s schema, its manifest's fingerprint for its Dataset (the last shard's
    files held the key it was built under; every shard's manifest did)."""
    repo = make_project(Repo.init(tmp_path / "repo"), parts=0)
    repo.write({"dodo.py": SIFT_DODO, "pkg/u.py": SIFT, "shelf/n.txt": "3\n"})
    for i in range(3):
        write_part(repo, f"part-{i}", 10 * i, rows=5)
    repo.commit("sift project")
    doit(repo, "run", "preprocess", log=tmp_path / "a.log")
    assert calls(tmp_path / "a.log")["sift"] == 15  # each row once
    repo.commit("lock")
    clone = repo.clone(tmp_path / "clone")
    doit(clone, "run", "preprocess", log=tmp_path / "b.log")
    first = json.loads(run_python(SIFT_PARTS, repo.path).stdout.splitlines()[-1])
    assert first == json.loads(run_python(SIFT_PARTS, clone.path).stdout.splitlines()[-1])
    assert [[p["fingerprint"] for p in parts] for _, parts, _ in first] == [
        [k] for k, _, _ in first
    ]
