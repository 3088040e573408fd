"""Packs (issue #24): a load's shards built together are kept as row ranges of one stored
entry, each still keyed and found by its own shard key; the lock, appends, the remote, gc
and `verify --deep` follow them. The shard project (tests/shard_project.py) loads parquet
files into row-local transforms, each shard of which reads its input shard by key."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

from hfbuild.store import listform
from tests.helpers import Repo, read_python, run_hfbuild
from tests.pipeline_project import calls, doit
from tests.shard_project import make_project, state, write_part

ROWS = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
from hfbuild.store.entry import row_pack

s = dodo.pipe.store
fp = dodo.pipe["raw"].fingerprint
doc = s.read_manifest(fp)
rows = [[r[2], r[1], (row_pack(r) or [None])[0]] for r in doc["shards"]]
packs = sorted(k for k in s.fingerprints() if "pack" in (s.read_manifest(k) or {}))
kept = dodo.pipe.result("kept")
print(json.dumps({"rows": rows, "packs": packs, "kept": kept.to_dict()}))
"""


def _listing(repo: Repo) -> dict[str, object]:
    out = read_python(ROWS, repo.path).stdout.strip().splitlines()[-1]
    got: dict[str, object] = json.loads(out)
    return got


def _objects(repo: Repo) -> set[str]:
    store = repo.path / ".hfbuild" / "objects"
    return {p.name for d in store.iterdir() for p in d.iterdir()}


def test_an_append_adds_one_pack_and_finds_the_old_shards_by_key(tmp_path: pathlib.Path) -> None:
    """A cold build keeps its load's shards as one pack; appending two files builds only
    them, as a second pack, and the stage's new list names the first pack's shards by the
    same keys and row ranges. The served result is the same as a fresh build's."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    doit(repo, "run", "preprocess", log=tmp_path / "a.log")
    cold = _listing(repo)
    assert len(cold["packs"]) == 1  # type: ignore[arg-type]
    assert {r[2] for r in cold["rows"]} == set(cold["packs"])  # type: ignore[union-attr, attr-defined]
    write_part(repo, "part-4", 400)
    write_part(repo, "part-5", 500)
    repo.commit("two more files")
    log = tmp_path / "b.log"
    doit(repo, "run", "preprocess", log=log)
    assert calls(log)["feat:part-4"] and calls(log)["feat:part-5"]
    assert not any(k.endswith(("part-0", "part-1", "part-2", "part-3")) for k in calls(log))
    again = _listing(repo)
    packs = again["packs"]
    assert isinstance(packs, list) and len(packs) == 2 and cold["packs"][0] in packs  # type: ignore[index]
    assert again["rows"][:4] == cold["rows"]  # type: ignore[index]
    new = {r[2] for r in again["rows"][4:]}  # type: ignore[index]
    assert new == set(packs) - set(cold["packs"])  # type: ignore[arg-type]
    fresh = make_project(Repo.init(tmp_path / "fresh"), parts=6)
    doit(fresh, "run", "preprocess", log=tmp_path / "c.log")
    assert _listing(fresh)["kept"] == again["kept"]
    assert state(fresh) == state(repo)


def test_an_append_in_a_copied_store_builds_only_the_new_file(tmp_path: pathlib.Path) -> None:
    """A project copied whole (`cp -a`: every pack's file has another identity) still
    finds the packed shards its stage's list names, by their pack's rows read once: an
    append builds only the new file, and serves what a fresh build serves."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    doit(repo, "run", "preprocess", log=tmp_path / "a.log")
    subprocess.run(["cp", "-a", str(repo.path), str(tmp_path / "copy")], check=True)
    copy = Repo(tmp_path / "copy")
    write_part(copy, "part-4", 400)
    copy.commit("one more file")
    log = tmp_path / "b.log"
    doit(copy, "run", "preprocess", log=log)
    assert calls(log)["feat:part-4"]
    assert not any(k.endswith(("part-0", "part-1", "part-2", "part-3")) for k in calls(log))
    fresh = make_project(Repo.init(tmp_path / "fresh"), parts=5)
    doit(fresh, "run", "preprocess", log=tmp_path / "c.log")
    assert _listing(fresh)["kept"] == _listing(copy)["kept"]
    assert state(fresh) == state(copy)


NO_PACKS = """
import sys
from hfbuild.builds import packbuild, shardone

shardone.load_together = lambda *a, **k: None  # every shard loaded by itself, as before packs
packbuild.of_results = lambda results: []  # every batch unit an entry of its own
from doit.doit_cmd import DoitMain
from doit.cmd_base import ModuleTaskLoader
import dodo

sys.exit(DoitMain(ModuleTaskLoader(dodo)).run(["run", "preprocess"]))
"""


DOUBLE = """
    def double(batch):
        return {"y": [x * 2 for x in batch["x"]]}
    """

LOAD_AND_UNITS = """
    from hfbuild import Pipeline
    from pkg import u

    pipe = Pipeline()
    raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
    feat = pipe.map("feat", raw, u.double, batched=True)


    def task_preprocess():
        yield from pipe.tasks()
    """


def test_a_500_file_lock_is_the_one_shard_entries_give(tmp_path: pathlib.Path) -> None:
    """Packing changes where a shard's rows are stored, never its key or content hash: a
    500-file project's hfbuild.lock (fingerprints, content hashes, `shard_hashes`) is byte
    for byte the one a build loading each file by itself into its own entry writes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    locks = []
    for name, packed in (("packed", True), ("apart", False)):
        repo = Repo.init(tmp_path / name)
        make_project(repo, parts=0)
        repo.write({"dodo.py": LOAD_AND_UNITS, "pkg/u.py": DOUBLE})
        (repo.path / "data").mkdir()
        for i in range(500):
            t = pa.table({"x": [i * 3, i * 3 + 1, i * 3 + 2], "f": [f"p{i:03d}"] * 3})
            pq.write_table(t, repo.path / "data" / f"p{i:03d}.parquet")
        repo.commit("500 files")
        if packed:
            doit(repo, "run", "preprocess", log=tmp_path / f"{name}.log")
        else:
            out = subprocess.run(
                [sys.executable, "-c", NO_PACKS],
                cwd=repo.path,
                env={**_env(), "CALL_LOG": str(tmp_path / f"{name}.log")},
                capture_output=True,
                text=True,
                check=False,
            )
            assert out.returncode == 0, out.stderr[-3000:]
        locks.append((repo.path / "hfbuild.lock").read_text())
        entries = len(_objects(repo))
        # The 2 stages' lists, the map's 2 units (1 pack, or 2) and the load's shards (1
        # pack, or 500).
        assert entries == (2 + 1 + 1 if packed else 2 + 2 + 500), entries
    assert locks[0] == locks[1]
    assert len(json.loads(locks[0])["stages"]["raw"]["shard_hashes"]) == 500


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_a_pack_is_pushed_and_pulled_by_a_fresh_clone(tmp_path: pathlib.Path) -> None:
    """A sharded result whose load is a pack is pushed with its pack and pulled by a clone
    with an empty store, which builds nothing; a pack whose shard rows were forged on the
    remote (its manifest's hashes swapped, checksum made again) is refused."""
    from hfbuild.store.paths import manifest_digest

    repo = make_project(Repo.init(tmp_path / "repo"))
    remote = tmp_path / "remote"
    env = {"HFBUILD_REMOTE": f"file://{remote}", "HFBUILD_PUSH": "1"}
    doit(repo, "run", "preprocess", log=tmp_path / "a.log", env=env)
    (pack,) = _listing(repo)["packs"]  # type: ignore[misc]
    assert any(p.name == pack for p in remote.rglob("*") if p.is_dir())
    before = state(repo)
    clone = repo.clone(tmp_path / "clone")
    for p in (repo.path / "data").glob("*.parquet"):
        shutil.copy(p, clone.path / "data" / p.name)
    log = tmp_path / "b.log"
    doit(clone, "run", "preprocess", log=log, env={"HFBUILD_REMOTE": f"file://{remote}"})
    assert calls(log) == {}
    assert state(clone) == before
    assert _listing(clone)["packs"] == [pack]

    # The same pack on the remote with two shards' rows swapped in its manifest.
    (manifest,) = [p for p in remote.rglob("manifest.json") if p.parent.name == pack]
    doc = listform.expand(json.loads(manifest.read_text()))
    rows = doc["pack"]
    rows[0][3], rows[1][3] = rows[1][3], rows[0][3]
    doc = listform.compact(doc)
    doc["manifest_digest"] = manifest_digest(doc)
    manifest.write_text(json.dumps(doc, sort_keys=True))
    other = repo.clone(tmp_path / "other")
    for p in (repo.path / "data").glob("*.parquet"):
        shutil.copy(p, other.path / "data" / p.name)
    log = tmp_path / "c.log"
    out = doit(other, "run", "preprocess", log=log, env={"HFBUILD_REMOTE": f"file://{remote}"})
    assert "do not match their content hash" in out.stdout + out.stderr
    assert state(other) == before
    # The load was built here: its pack is this store's own, not the remote's forged one.
    held = other.path / ".hfbuild" / "objects" / pack[:2] / pack / "manifest.json"
    assert "pulled_from" not in json.loads(held.read_text())


def test_gc_keeps_the_pack_a_kept_list_names_and_drops_the_old(tmp_path: pathlib.Path) -> None:
    """After an edit of the first file (every load shard's key holds its schema's source),
    the stage's list names a new pack: gc drops the old pack with the old list, keeps the
    new one, and the result is still served and verifies."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    doit(repo, "run", "preprocess", log=tmp_path / "a.log")
    (old,) = _listing(repo)["packs"]  # type: ignore[misc]
    write_part(repo, "part-0", 1000)
    repo.commit("first file changed")
    doit(repo, "run", "preprocess", log=tmp_path / "b.log")
    repo.commit("its lock")  # gc keeps what HEAD's lock names
    now = _listing(repo)
    assert old in now["packs"] and len(now["packs"]) == 2  # type: ignore[operator, arg-type]
    (new,) = set(now["packs"]) - {old}  # type: ignore[arg-type]
    assert {r[2] for r in now["rows"]} == {new}  # type: ignore[union-attr]
    out = run_hfbuild(repo, "gc", "--keep-days", "0")
    assert out.returncode == 0, out.stderr
    after = _objects(repo)
    assert new in after and old not in after
    assert _listing(repo)["kept"] == now["kept"]
    out = run_hfbuild(repo, "verify", "--deep")
    assert out.returncode == 0, out.stdout + out.stderr


def test_verify_deep_finds_a_damaged_pack_row(tmp_path: pathlib.Path) -> None:
    """A pack whose manifest gives a shard another row range's hash (its checksum made
    again, so only the rows tell) is found by `verify --deep`, moved aside with the lists
    over it, and the next build makes it again; so is a pack whose data bytes changed."""
    from hfbuild.store.paths import manifest_digest

    repo = make_project(Repo.init(tmp_path / "repo"))
    doit(repo, "run", "preprocess", log=tmp_path / "a.log")
    before = state(repo)
    (pack,) = _listing(repo)["packs"]  # type: ignore[misc]
    entry = repo.path / ".hfbuild" / "objects" / pack[:2] / pack
    manifest = entry / "manifest.json"
    doc = listform.expand(json.loads(manifest.read_text()))
    rows = doc["pack"]
    rows[1][3], rows[2][3] = rows[2][3], rows[1][3]
    doc.pop("ids", None)
    doc = listform.compact(doc)
    doc["manifest_digest"] = manifest_digest(doc)
    manifest.write_text(json.dumps(doc, sort_keys=True, indent=1))
    out = run_hfbuild(repo, "verify", "--deep")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{pack} is damaged (its rows of shard" in out.stderr
    assert not entry.exists()
    doit(repo, "run", "preprocess", log=tmp_path / "b.log")
    assert entry.exists()  # the load built again: the same shards, the same pack
    assert state(repo) == before
    out = run_hfbuild(repo, "verify", "--deep")
    assert out.returncode == 0, out.stdout + out.stderr

    # Its Arrow bytes overwritten (same size): the whole pack's hash tells.
    (arrow,) = entry.glob("data/*.arrow")
    data = bytearray(arrow.read_bytes())
    data[-200] ^= 0xFF
    arrow.chmod(0o644)
    arrow.write_bytes(bytes(data))
    out = run_hfbuild(repo, "verify", "--deep")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{pack} is damaged" in out.stderr
