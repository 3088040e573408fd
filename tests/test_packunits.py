"""A batched stage's units built together are kept as one pack (issue #24), as a load's
shards are (tests/test_packs.py): each unit still keyed and found by its own key through
the stage's last list; appends, the remote (push, pull, `remote rm --shard`) follow them,
and the served result is plain `datasets`' one."""

from __future__ import annotations

import json
import pathlib
import shutil
import textwrap
from collections import Counter

from hfbuild.store import listform
from tests.helpers import Repo, read_python, run_hfbuild, run_python
from tests.pipeline_project import calls, doit
from tests.shard_project import make_project, write_part

FNS = """
    import os


    def _log(stage, n):
        with open(os.environ["CALL_LOG"], "a") as out:
            out.write(f"{stage}\\n" * n)


    def grow(batch):
        _log("grow", 1)
        return {"y": [x * 3 + 1 for x in batch["x"]], "m": [max(batch["x"])] * len(batch["x"])}


    def keep(batch):
        _log("keep", 1)
        return [y % 7 != 0 for y in batch["y"]]
    """

DODO = """
    from hfbuild import Pipeline
    from pkg import u

    pipe = Pipeline()
    raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
    feat = pipe.map("feat", raw, u.grow, batched=True, batch_size=4)
    kept = pipe.filter("kept", feat, u.keep, batched=True, batch_size=3)


    def task_preprocess():
        yield from pipe.tasks()
    """

PLAIN = """
import glob, json, sys, datasets
sys.path.insert(0, ".")
from pkg import u
import os
os.environ["CALL_LOG"] = os.devnull
datasets.disable_caching()
ds = datasets.load_dataset("parquet", data_files=sorted(glob.glob("data/*.parquet")),
                           split="train", cache_dir=sys.argv[1])
ds = ds.map(u.grow, batched=True, batch_size=4)
ds = ds.filter(u.keep, batched=True, batch_size=3)
print(json.dumps(ds.to_dict()))
"""

LISTS = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
from hfbuild.store.entry import row_pack

s = dodo.pipe.store
out = {}
for name in ("feat", "kept"):
    doc = s.read_manifest(dodo.pipe[name].fingerprint)
    rows = [[r[2], r[1], list(row_pack(r) or [None])] for r in doc["shards"]]
    out[name] = {"rows": rows, "built": doc["shards_built"], "hash": doc["content_hash"]}
out["objects"] = sorted(s.fingerprints())
out["packs"] = sorted(k for k in s.fingerprints() if "pack" in (s.read_manifest(k) or {}))
out["kept_rows"] = dodo.pipe.result("kept").to_dict()
print(json.dumps(out))
"""


def _project(repo: Repo, files: int = 6) -> Repo:
    make_project(repo, parts=0)
    repo.write({"dodo.py": DODO, "pkg/u.py": FNS})
    for i in range(files):
        write_part(repo, f"part-{i}", 10 * i, rows=5)
    repo.commit("units project")
    return repo


def _lists(repo: Repo) -> dict[str, object]:
    got: dict[str, object] = json.loads(read_python(LISTS, repo.path).stdout.splitlines()[-1])
    return got


def _plain(repo: Repo, tmp_path: pathlib.Path, script: str = PLAIN) -> object:
    out = read_python(script, repo.path, args=[str(tmp_path / "plain-cache")])
    return json.loads(out.stdout.splitlines()[-1])


def test_units_built_together_are_one_pack_and_an_append_adds_one(
    tmp_path: pathlib.Path,
) -> None:
    """Cold, each batched stage's units are one pack (every row of its list names it), the
    store holding 3 lists and 3 packs; appending a file builds the last old unit(s) and the
    new one as one new pack, the other units found by their keys and row ranges in the old
    pack. Both times the result is plain datasets' over the same files. gc keeps the packs
    and `verify --deep` checks each unit's rows of them."""
    from hfbuild.store.paths import manifest_digest

    repo = _project(Repo.init(tmp_path / "repo"))
    doit(repo, "run", "preprocess", log=tmp_path / "a.log")
    cold = _lists(repo)
    for name in ("feat", "kept"):
        rows = cold[name]["rows"]  # type: ignore[index]
        assert len(rows) >= 5 and len({r[2][0] for r in rows}) == 1, (name, rows)
        assert rows[0][2][0] in cold["packs"]  # type: ignore[operator]
    assert len(cold["objects"]) == 6 and len(cold["packs"]) == 3, cold  # type: ignore[arg-type]
    assert cold["kept_rows"] == _plain(repo, tmp_path)

    write_part(repo, "part-6", 60, rows=5)
    repo.commit("one more file")
    doit(repo, "run", "preprocess", log=tmp_path / "b.log")
    again = _lists(repo)
    for name in ("feat", "kept"):
        old, new = cold[name]["rows"], again[name]["rows"]  # type: ignore[index]
        known = {r[1] for r in old}
        fresh = [r for r in new if r[1] not in known]
        # The units built now: the last old one(s), whose batches read into the new file,
        # and those starting in it, all in one new pack; the others are the old pack's.
        assert again[name]["built"] == len(fresh) >= 2, (name, again[name])  # type: ignore[index]
        assert new[: len(new) - len(fresh)] == old[: len(new) - len(fresh)], name
        assert len({r[2][0] for r in fresh}) == 1, (name, fresh)
        assert fresh[0][2][0] in again["packs"] and fresh[0][2][0] not in cold["packs"]  # type: ignore[operator]
    assert again["feat"]["built"] == 2  # type: ignore[index]
    assert again["kept_rows"] == _plain(repo, tmp_path)

    # gc keeps the packs HEAD's lists name (the old ones too: they hold the units reused);
    # `verify --deep` checks each unit's rows of its pack, and finds one given another's.
    repo.commit("its lock")
    out = run_hfbuild(repo, "gc", "--keep-days", "0")
    assert out.returncode == 0, out.stderr
    assert set(again["packs"]) <= set(_lists(repo)["objects"])  # type: ignore[arg-type]
    out = run_hfbuild(repo, "verify", "--deep")
    assert out.returncode == 0, out.stdout + out.stderr
    pack = again["feat"]["rows"][0][2][0]  # type: ignore[index]
    manifest = repo.path / ".hfbuild" / "objects" / pack[:2] / pack / "manifest.json"
    doc = listform.expand(json.loads(manifest.read_text()))
    doc["pack"][0][3], doc["pack"][1][3] = doc["pack"][1][3], doc["pack"][0][3]
    doc.pop("ids", None)
    doc = listform.compact(doc)
    doc["manifest_digest"] = manifest_digest(doc)
    manifest.write_text(json.dumps(doc, sort_keys=True, indent=1))
    out = run_hfbuild(repo, "verify", "--deep")
    assert out.returncode == 1 and f"{pack} is damaged" in out.stderr, out.stdout + out.stderr


NO_UNIT_PACKS = """
import sys
from hfbuild.builds import packbuild

packbuild.of_results = lambda results: []  # every unit an entry of its own, as before
from doit.doit_cmd import DoitMain
from doit.cmd_base import ModuleTaskLoader
import dodo

sys.exit(DoitMain(ModuleTaskLoader(dodo)).run(["run", "preprocess"]))
"""


def test_packed_units_give_the_lock_entries_give(tmp_path: pathlib.Path) -> None:
    """Packing units changes where their rows are stored, never a key or a content hash:
    the lock (fingerprints, content hashes, each unit's hash in `shard_hashes`) is byte for
    byte the one a build keeping each unit as an entry of its own writes."""
    locks = []
    for name, packed in (("packed", True), ("apart", False)):
        repo = _project(Repo.init(tmp_path / name), files=9)
        log = tmp_path / f"{name}.log"
        if packed:
            doit(repo, "run", "preprocess", log=log)
        else:
            out = run_python(NO_UNIT_PACKS, repo.path, env={"CALL_LOG": str(log)})
            assert out.returncode == 0, out.stderr[-3000:]
        got = _lists(repo)
        # 3 lists, the load's pack, and 9 units of each batched stage: 2 packs, or 18.
        assert len(got["objects"]) == (3 + 1 + (2 if packed else 18)), got["objects"]  # type: ignore[arg-type]
        locks.append((repo.path / "hfbuild.lock").read_text())
    assert locks[0] == locks[1]
    assert len(json.loads(locks[0])["stages"]["kept"]["shard_hashes"]) == 9


def test_packed_units_are_pulled_and_a_bad_packed_shard_removed(tmp_path: pathlib.Path) -> None:
    """Pushed, the packed units travel with their packs and a fresh clone pulls them and
    builds nothing. `hfbuild remote rm kept --shard LABEL` of a unit whose pack on the remote
    was forged (its rows given another unit's hash, the checksum made again) removes that
    pack, saying so, and a clone then builds those units itself with plain datasets' rows;
    a good pack stays unless --force; so does a load's packed shard."""
    from hfbuild.store.paths import manifest_digest

    repo = _project(Repo.init(tmp_path / "repo"))
    remote = tmp_path / "remote"
    env = {"HFBUILD_REMOTE": f"file://{remote}", "HFBUILD_PUSH": "1"}
    doit(repo, "run", "preprocess", log=tmp_path / "a.log", env=env)
    repo.commit("its lock")  # `remote rm` checks against the committed lock
    here = _lists(repo)
    on_remote = {p.name for p in remote.rglob("*") if p.is_dir()}
    assert set(here["packs"]) <= on_remote  # type: ignore[arg-type]

    def clone(name: str) -> Repo:
        c = repo.clone(tmp_path / name)
        for p in (repo.path / "data").glob("*.parquet"):
            shutil.copy(p, c.path / "data" / p.name)
        return c

    first = clone("first")
    log = tmp_path / "first.log"
    doit(first, "run", "preprocess", log=log, env={"HFBUILD_REMOTE": f"file://{remote}"})
    assert calls(log) == {}
    assert _lists(first)["kept_rows"] == here["kept_rows"] == _plain(repo, tmp_path)

    # kept's pack on the remote, two units' hashes swapped in its manifest.
    rows = here["kept"]["rows"]  # type: ignore[index]
    pack = rows[0][2][0]
    (manifest,) = [p for p in remote.rglob("manifest.json") if p.parent.name == pack]
    doc = listform.expand(json.loads(manifest.read_text()))
    doc["pack"][0][3], doc["pack"][1][3] = doc["pack"][1][3], doc["pack"][0][3]
    doc = listform.compact(doc)
    doc["manifest_digest"] = manifest_digest(doc)
    manifest.write_text(json.dumps(doc, sort_keys=True))

    url = f"file://{remote}"
    out = run_hfbuild(repo, "remote", "rm", "kept", "--shard", rows[1][0], "--remote", url)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"stage 'kept', shard {rows[1][0]}: removed the pack" in out.stdout
    assert f"and with it the rows of {len(rows) - 1} other shard(s)" in out.stdout
    assert not manifest.exists()
    second = clone("second")
    log = tmp_path / "second.log"
    doit(second, "run", "preprocess", log=log, env={"HFBUILD_REMOTE": url})
    # kept's units built here (a call per batch, as the cold build made), nothing else.
    assert calls(log) == {"keep": calls(tmp_path / "a.log")["keep"]}
    assert _lists(second)["kept_rows"] == here["kept_rows"]

    # A good packed unit and a load's packed shard stay, unless --force.
    label = here["feat"]["rows"][2][0]  # type: ignore[index]
    out = run_hfbuild(repo, "remote", "rm", "feat", "--shard", label, "--remote", url)
    assert out.returncode == 1 and "it is the good one, and stays" in out.stderr, out.stderr
    out = run_hfbuild(
        repo, "remote", "rm", "raw", "--shard", "data/part-3.parquet", "--remote", url
    )
    assert out.returncode == 1 and "it is the good one, and stays" in out.stderr, out.stderr
    out = run_hfbuild(
        repo, "remote", "rm", "raw", "--shard", "data/part-3.parquet", "--remote", url, "--force"
    )
    assert out.returncode == 0 and "(--force)" in out.stdout, out.stdout + out.stderr


SEL_FNS = """
    import os


    def grow(batch):
        return {"y": [x * 3 + 1 for x in batch["x"]]}


    def sel(batch, idx):
        with open(os.environ["CALL_LOG"], "a") as out:
            out.write("sel\\n")
        return [i < 6 or 12 <= i < 15 or i >= 26 for i in idx]
    """

SEL_DODO = DODO.replace(
    "u.keep, batched=True, batch_size=3", "u.sel, batched=True, batch_size=3, with_indices=True"
)
SEL_PLAIN = PLAIN.replace(
    "u.keep, batched=True, batch_size=3", "u.sel, batched=True, batch_size=3, with_indices=True"
)
assert SEL_DODO != DODO and SEL_PLAIN != PLAIN


EACH_ALONE = """
import sys
from hfbuild.builds import batchunits

batchunits._runs = lambda spec, todo: [[u] for u in todo]  # each unit its own filter call
from doit.doit_cmd import DoitMain
from doit.cmd_base import ModuleTaskLoader
import dodo

sys.exit(DoitMain(ModuleTaskLoader(dodo)).run(["run", "preprocess"]))
"""


def test_a_filters_units_built_by_one_call_are_those_each_call_gives(
    tmp_path: pathlib.Path,
) -> None:
    """A batched filter's missing units over one pack are one `filter` call, each unit's
    rows cut from it: with `with_indices` (the call's indices start at its first unit's),
    units that keep no row (the last one too), and an append of two files (the new units,
    over the map's new pack, one call starting mid-split),
    the lock is byte for byte the one a build calling the filter once a unit writes, each
    unit holds the rows of its own it keeps, and the result is plain datasets'."""
    locks: dict[str, list[str]] = {"together": [], "alone": []}
    for name in locks:
        repo = Repo.init(tmp_path / name)
        make_project(repo, parts=0)
        repo.write({"dodo.py": SEL_DODO, "pkg/u.py": SEL_FNS})
        for i in range(6):
            write_part(repo, f"part-{i}", 4 * i, rows=4)
        repo.commit("filter units")
        for step in ("cold", "append"):
            if step == "append":
                write_part(repo, "part-6", 24, rows=4)
                write_part(repo, "part-7", 28, rows=4)
                repo.commit("two more files")
            log = tmp_path / f"{name}-{step}.log"
            if name == "together":
                doit(repo, "run", "preprocess", log=log)
            else:
                out = run_python(EACH_ALONE, repo.path, env={"CALL_LOG": str(log)})
                assert out.returncode == 0, out.stderr[-3000:]
            got = _lists(repo)
            # kept's units read rows [0, 6), [6, 9), [9, 12), [12, 18), [18, 21), [21, 24)
            # and, appended, [24, 30) and [30, 32), both from feat's new pack (its batches
            # up to 24 were whole: its units before stay); it keeps rows 0-5, 12-14, 26 on.
            cold = [6, 0, 0, 3, 0, 0]
            want = cold if step == "cold" else [*cold, 4, 2]
            kept = json.loads((repo.path / "hfbuild.lock").read_text())["stages"]["kept"]
            assert len(kept["shard_hashes"]) == len(want), kept
            doc = read_python(
                "import dodo, json\n"
                "d = dodo.pipe.store.read_manifest(dodo.pipe['kept'].fingerprint)\n"
                "print(json.dumps([r[4]['rows'] for r in d['shards']]))",
                repo.path,
            )
            assert json.loads(doc.stdout.splitlines()[-1]) == want, (name, step)
            assert got["kept_rows"] == _plain(repo, tmp_path / f"{name}-{step}", SEL_PLAIN)
            locks[name].append((repo.path / "hfbuild.lock").read_text())
    assert locks["together"] == locks["alone"]


FEATURES = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
from hfbuild.store.entry import row_base, row_indexed, row_pack

s = dodo.pipe.store


def features(how, fp, split, rows):
    try:
        return repr(how(fp, split, rows))
    except Exception as e:
        return type(e).__name__


out = {"kinds": [], "differ": []}
for name in ("raw", "feat", "kept", "odd"):
    fp = dodo.pipe[name].fingerprint
    listed = s.read_manifest(fp)["shards"]
    for split in sorted({str(r[0]) for r in listed}):
        rows = [r for r in listed if str(r[0]) == split]
        out["kinds"] += [
            "base" if row_base(r) else "indexed" if row_indexed(r) else
            "packed" if row_pack(r) else "own" for r in rows
        ]
        cases = [[r] for r in rows] + [rows[:2], rows[-2:], rows]
        for case in cases:
            ours = features(s.listed_features, fp, split, case)
            loaded = features(lambda *a: s.load_listed(*a).features, fp, split, case)
            if ours != loaded:
                out["differ"].append([name, [r[1] for r in case], ours, loaded])
print(json.dumps(out))
"""


def test_a_lists_features_are_those_of_its_rows_loaded(tmp_path: pathlib.Path) -> None:
    """`Store.listed_features` (what a unit's build asks of its input split's first shard,
    reading only the Arrow files' schemas) gives the features loading the same rows gives,
    for every row of every stage's list and runs of them, cold and after an append: rows of
    a pack, shards stored by themselves, a row-wise filter's indices shards over a base."""
    repo = _project(Repo.init(tmp_path / "repo"))
    odd = 'odd = pipe.filter("odd", raw, u.odd)\n'  # a row-wise filter: indices shards
    repo.write(
        {
            "dodo.py": textwrap.dedent(DODO).replace("\n\ndef task", odd + "\n\ndef task"),
            "pkg/u.py": textwrap.dedent(FNS) + "\n\ndef odd(row):\n    return row['x'] % 2 == 1\n",
        }
    )
    repo.commit("a row-wise filter")
    doit(repo, "run", "preprocess", log=tmp_path / "a.log")
    write_part(repo, "part-6", 60, rows=5)
    repo.commit("one more file")
    doit(repo, "run", "preprocess", log=tmp_path / "b.log")
    got = json.loads(read_python(FEATURES, repo.path).stdout.splitlines()[-1])
    assert got["differ"] == [], got["differ"]
    assert set(got["kinds"]) == {"packed", "own", "base"}, got["kinds"]


LISTING = """
    import os


    def names(batch):
        with open(os.environ["CALL_LOG"], "a") as out:
            out.write("names\\n")
        found = ",".join(sorted(os.listdir("shelf")))
        return {"names": [found] * len(batch["x"])}
    """


def test_a_batched_stage_reading_at_run_time_builds_once_in_a_store_without_its_record(
    tmp_path: pathlib.Path,
) -> None:
    """A batched map over a sharded load that lists shelf/ at run time, built in a clone
    whose store has no record of what its builds read (a fresh clone, a Ray node's store):
    its key takes the listing from the committed lock, and its units are built once under
    it, not built, found to read shelf/, and built again (a Ray rebuild landing on the
    other node called the function twice)."""
    repo = Repo.init(tmp_path / "repo")
    make_project(repo, parts=0)
    dodo = DODO.replace("u.grow, batched=True, batch_size=4", "u.names, batched=True, batch_size=4")
    dodo = dodo.replace('kept = pipe.filter("kept", feat, u.keep, batched=True, batch_size=3)', "")
    repo.write({"dodo.py": dodo, "pkg/u.py": LISTING, "shelf/a.csv": "x\n1\n"})
    for i in range(2):
        write_part(repo, f"part-{i}", 10 * i, rows=5)
    repo.commit("listing project")
    doit(repo, "run", "preprocess", log=tmp_path / "a.log")
    # Once a batch (3 of 10 rows, in 2 units written as a pack): the reads learnt at its
    # end, its units are written under the keys they make, not built again.
    assert calls(tmp_path / "a.log")["names"] == 3
    repo.commit("lock: its record names the listing")

    clone = repo.clone(tmp_path / "clone")
    doit(clone, "run", "preprocess", log=tmp_path / "b.log")
    assert calls(tmp_path / "b.log")["names"] == 3
    assert (clone.path / "hfbuild.lock").read_text() == (repo.path / "hfbuild.lock").read_text()
    # The units the first build wrote under the keys it learnt hold the bytes the clone's
    # build, which knew the keys from the start, wrote under them.
    first, cloned = _unit_bytes(repo), _unit_bytes(clone)
    assert first == cloned and first


UNIT_BYTES = """
import hashlib, json, os, dodo
from hfbuild.store.entry import row_owner

s = dodo.pipe.store
out = {}
for row in s.read_manifest(dodo.pipe["feat"].fingerprint)["shards"]:
    owner = row_owner(row)
    base = s.data_path(owner)
    for rel in sorted(row[3]):
        with open(os.path.join(base, rel), "rb") as f:
            out[f"{owner}/{rel}"] = hashlib.sha256(f.read()).hexdigest()
print(json.dumps(out))
"""


def _unit_bytes(repo: Repo) -> dict[str, str]:
    got: dict[str, str] = json.loads(read_python(UNIT_BYTES, repo.path).stdout.splitlines()[-1])
    return got


PEEK = """
    import json, os


    def peek(batch):
        with open(os.environ["CALL_LOG"], "a") as out:
            out.write("peek\\n")
        name = "shelf/a.json" if batch["x"][0] < 10 else "shelf/b.json"
        v = 0
        if os.path.exists(name):  # a stat: no read while the file is missing
            with open(name) as f:
                v = json.load(f)["v"]
        return {"v": [v] * len(batch["x"])}
    """


def _peek_project(repo: Repo, tmp_path: pathlib.Path, shelf: dict[str, str]) -> Counter[str]:
    """A batched map stat'ing shelf/a.json (part-0's batch) or shelf/b.json (the others'),
    built over 2 files with no shelf, then with a third file and `shelf`: its calls."""
    make_project(repo, parts=0)
    dodo = DODO.replace("u.grow, batched=True, batch_size=4", "u.peek, batched=True, batch_size=5")
    dodo = dodo.replace('kept = pipe.filter("kept", feat, u.keep, batched=True, batch_size=3)', "")
    repo.write({"dodo.py": dodo, "pkg/u.py": PEEK})
    for i in range(2):
        write_part(repo, f"part-{i}", 10 * i, rows=5)
    repo.commit("peek project")
    doit(repo, "run", "preprocess", log=tmp_path / "a.log")
    write_part(repo, "part-2", 20, rows=5)  # its unit is built; the two before are stored
    repo.write(shelf)
    repo.commit("one more file, and the shelf")
    doit(repo, "run", "preprocess", log=tmp_path / "b.log")
    return calls(tmp_path / "b.log")


def test_units_built_again_that_read_more_are_keyed_with_it(tmp_path: pathlib.Path) -> None:
    """The store's units, built again under the key grown by what the unit built first read
    (shelf/b.json), read a file that key lacks (shelf/a.json): they are keyed with it too,
    so that the next append builds its own unit only (it built all 4 again: the units were
    listed under keys without shelf/a.json, which the stage's record holds)."""
    repo = Repo.init(tmp_path / "repo")
    shelf = {"shelf/a.json": '{"v": 7}', "shelf/b.json": '{"v": 2}'}
    assert _peek_project(repo, tmp_path, shelf)["peek"] == 3
    write_part(repo, "part-3", 30, rows=5)
    repo.commit("another file")
    doit(repo, "run", "preprocess", log=tmp_path / "c.log")
    assert calls(tmp_path / "c.log")["peek"] == 1
    got = run_python("import dodo; print(list(dodo.pipe.result('feat')['v']))", repo.path)
    assert got.stdout.splitlines()[-1] == str([7] * 5 + [2] * 15)


def test_units_of_other_features_after_a_learnt_read_build_the_stage_whole(
    tmp_path: pathlib.Path,
) -> None:
    """A batched map whose unit built now reads a file its key lacks (shelf/b.json), while
    the store's units, built again under the grown key, come out with other features
    (shelf/a.json, a float): the stage is built whole, as for units of other features
    found at once (it failed discarding the re-keyed unit a second time)."""
    repo = Repo.init(tmp_path / "repo")
    _peek_project(repo, tmp_path, {"shelf/a.json": '{"v": 1.5}', "shelf/b.json": '{"v": 2}'})
    got = run_python(
        "import dodo; print(list(dodo.pipe.result('feat')['v']))", repo.path
    ).stdout.splitlines()[-1]
    assert got == str([1.5] * 5 + [2.0] * 10)
