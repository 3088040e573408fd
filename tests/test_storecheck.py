"""The store checks what it serves (issue #25, item 3): each stored file's identity (size,
mtime and ctime in ns, inode) is recorded when its entry is published; an entry is served
while they hold and hashed in full when they do not. A same-size edit of a data or indices
file is damage (reported, never served, rebuilt); a touch is not (one hash, then served)."""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import pyarrow as pa
import pytest

from hfbuild.store import listform
from tests import pipeline_project, shard_project
from tests.helpers import Repo, read_python, run_hfbuild, run_python
from tests.pipeline_project import calls, doit, expected, results

RESULT = """
import json, sys, warnings
warnings.simplefilter("ignore")
import dodo, hfbuild
try:
    ds = dodo.pipe.result(%r)
except hfbuild.DamagedEntryError as e:
    print(json.dumps({"damaged": str(e)}))
else:
    print(json.dumps({"rows": ds.to_dict()}))
"""

NOOP = """
import sys
from doit.doit_cmd import DoitMain
from doit.cmd_base import ModuleTaskLoader
import dodo
rc = DoitMain(ModuleTaskLoader(dodo)).run(["run", "preprocess"])
print(rc, "datasets" in sys.modules)
"""


def _objects(repo: Repo) -> pathlib.Path:
    return repo.path / ".hfbuild" / "objects"


def _entry(repo: Repo, fp: str) -> pathlib.Path:
    return _objects(repo) / fp[:2] / fp


def _locked_fp(repo: Repo, stage: str) -> str:
    fp: str = json.loads((repo.path / "hfbuild.lock").read_text())["stages"][stage]["fingerprint"]
    return fp


def _swap_first_values(path: pathlib.Path, column: str) -> None:
    """Swap the first two values of `column` in a stored Arrow file in place: same size, other
    rows (or, for indices, the same rows in another order)."""
    with pa.memory_map(str(path)) as mm:
        whole = mm.read_buffer()
        table = pa.ipc.open_stream(whole).read_all()
        arr = table.column(column).chunk(0)
        values = arr.buffers()[1]
        width = arr.type.bit_width // 8
        at = values.address - whole.address + arr.offset * width
    raw = bytearray(path.read_bytes())
    a, b = raw[at : at + width], raw[at + width : at + 2 * width]
    assert a != b
    raw[at : at + 2 * width] = b + a
    size = path.stat().st_size
    path.write_bytes(bytes(raw))
    assert path.stat().st_size == size


def _result(repo: Repo, stage: str) -> dict[str, Any]:
    """`pipe.result(stage)` in a process of its own (forked: `read_python`): its rows, or
    the damage it reports."""
    out = read_python(RESULT % stage, repo.path, env={"CALL_LOG": os.devnull})
    got: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


@pytest.fixture
def built(repo: Repo, tmp_path: pathlib.Path) -> Repo:
    pipeline_project.make_project(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "first.log")
    return repo


@pytest.mark.parametrize(
    ("stage", "file", "column", "fn"),
    [("lens", "data-00000-of-00001.arrow", "n", "lens"), ("kept", "indices.arrow", None, "keep")],
    ids=["data-file", "indices-file"],
)
def test_same_size_edit_of_an_entry_is_damaged_never_served_and_rebuilt(
    built: Repo, tmp_path: pathlib.Path, stage: str, file: str, column: str | None, fn: str
) -> None:
    """A same-size edit of a stored data file (a map's entry) or indices file (a filter's
    entry): `status` says the stage's result is damaged and exits 1, `pipe.result` in a process
    of its own refuses it as damaged, and `doit run` sets it aside and rebuilds that stage
    only, after which the rows are right."""
    f = _entry(built, _locked_fp(built, stage)) / "data" / file
    _swap_first_values(f, column or "indices")
    out = run_hfbuild(built, "status")
    assert out.returncode == 1
    assert re.search(rf"^{stage} +stale: its stored result \S+ is damaged \(", out.stdout, re.M)
    got = _result(built, stage)
    assert "rows" not in got
    assert "is damaged" in got["damaged"] and f"doit run preprocess:{stage}" in got["damaged"]
    log = tmp_path / "second.log"
    out = doit(built, "run", "preprocess", log=log)
    assert calls(log) == {fn: 1}
    assert f"stage {stage!r}: the stored result" in out.stderr and "is damaged (" in out.stderr
    assert results(built)[stage] == expected()[stage]
    assert run_hfbuild(built, "status").returncode == 0


def test_touched_identical_entry_is_hashed_once_and_served(
    built: Repo, tmp_path: pathlib.Path
) -> None:
    """A stored file touched (new mtime) or given new modes (new ctime) with its bytes
    unchanged is hashed once by the next up-to-date check, which then records its new
    identity: nothing is rebuilt, and the check after it imports no datasets again."""
    lens = _entry(built, _locked_fp(built, "lens")) / "data" / "data-00000-of-00001.arrow"
    os.utime(lens, ns=(1, 1))
    kept = _entry(built, _locked_fp(built, "kept")) / "data" / "indices.arrow"
    os.chmod(kept, kept.stat().st_mode)  # the same mode: only its ctime changes
    log = tmp_path / "second.log"
    env = {"CALL_LOG": str(log)}
    first = run_python(NOOP, built.path, env=env).stdout.strip().splitlines()[-1]
    assert first == "0 True"  # hashed: datasets was imported to read the two entries
    second = run_python(NOOP, built.path, env=env).stdout.strip().splitlines()[-1]
    assert second == "0 False"  # their new identities were recorded
    assert not log.exists()  # nothing was built
    assert results(built)["lens"] == expected()["lens"]


def test_entry_without_recorded_identities_is_hashed_once(
    built: Repo, tmp_path: pathlib.Path
) -> None:
    """An entry written by an older hfbuild (no identities recorded), or copied where inodes
    and ctimes differ, is hashed in full once and served; its identities are then recorded."""
    for manifest in _objects(built).glob("*/*/manifest.json"):
        doc = json.loads(manifest.read_text())
        del doc["ids"]
        manifest.write_text(json.dumps(doc))
    env = {"CALL_LOG": str(tmp_path / "second.log")}
    assert run_python(NOOP, built.path, env=env).stdout.strip().splitlines()[-1] == "0 True"
    assert run_python(NOOP, built.path, env=env).stdout.strip().splitlines()[-1] == "0 False"
    assert not (tmp_path / "second.log").exists()


def test_identities_kept_beside_the_manifest_are_read(built: Repo, tmp_path: pathlib.Path) -> None:
    """A store of the hfbuild that kept the identities in `ids.json` beside each manifest is
    read as it is: nothing is hashed, and the first record written moves them into the
    manifest."""
    for manifest in _objects(built).glob("*/*/manifest.json"):
        doc = json.loads(manifest.read_text())
        (manifest.parent / "ids.json").write_text(json.dumps(doc.pop("ids")))
        manifest.write_text(json.dumps(doc))
    env = {"CALL_LOG": str(tmp_path / "calls.log")}
    assert run_python(NOOP, built.path, env=env).stdout.strip().splitlines()[-1] == "0 False"
    assert not (tmp_path / "calls.log").exists()


def test_pulled_entries_have_their_identities_recorded(built: Repo, tmp_path: pathlib.Path) -> None:
    """Entries pulled from a remote get their files' identities recorded when they land (the
    remote's copies are other inodes): a clone's no-op after the pull hashes nothing, and a
    same-size edit there is damage."""
    remote = f"file://{tmp_path / 'remote'}"
    assert run_hfbuild(built, "push", "--remote", remote).returncode == 0
    pushed = list((tmp_path / "remote").rglob("manifest.json"))
    assert pushed and not any("ids" in json.loads(m.read_text()) for m in pushed)  # this copy's
    clone = built.clone(tmp_path / "clone")
    log = tmp_path / "clone.log"
    doit(clone, "run", "preprocess", log=log, env={"HFBUILD_REMOTE": remote})
    assert not log.exists()  # everything was pulled
    for manifest in _objects(clone).glob("*/*/manifest.json"):
        files = json.loads(manifest.read_text())["files"]
        own = json.loads(manifest.read_text())["ids"]["own"]
        for rel in files:
            st = (manifest.parent / "data" / rel).stat()
            got = own[rel][:4]
            assert got == [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    env = {"CALL_LOG": str(log), "HFBUILD_NO_REMOTE": "1"}
    assert run_python(NOOP, clone.path, env=env).stdout.strip().splitlines()[-1] == "0 False"
    _swap_first_values(
        _entry(clone, _locked_fp(clone, "lens")) / "data" / "data-00000-of-00001.arrow", "n"
    )
    out = run_hfbuild(clone, "status")
    assert out.returncode == 1 and "is damaged (" in out.stdout


# -- sharded stages ---------------------------------------------------------------------------


def _shard(repo: Repo, stage: str, label: str) -> str:
    fp = shard_project.state(repo)[stage]["fp"]
    doc = listform.expand(json.loads((_entry(repo, fp) / "manifest.json").read_text()))
    key: str = next(r[1] for r in doc["shards"] if r[2] == label)
    return key


def _per_shard(log: pathlib.Path, stage: str) -> set[str]:
    return {k.split(":", 1)[1] for k in calls(log) if k.startswith(stage + ":")}


@pytest.mark.parametrize(
    ("stage", "file", "column"),
    [("feat", "data-00000-of-00001.arrow", "y"), ("kept", "indices.arrow", "indices")],
    ids=["data-file", "indices-file"],
)
def test_same_size_edit_of_a_shard_is_damaged_never_served_and_rebuilt(
    tmp_path: pathlib.Path, stage: str, file: str, column: str
) -> None:
    """A same-size edit of one shard's data file (a map's shard) or indices file (a filter's
    shard): `status` says the stage's result is damaged, `pipe.result` refuses it in a fresh
    process, and `doit run` rebuilds that one shard; every result is then what it was."""
    repo = shard_project.make_project(Repo.init(tmp_path / "repo"))
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    before = shard_project.state(repo)
    noop = run_python(NOOP, repo.path, env={"CALL_LOG": str(log)}).stdout.strip()
    assert noop.splitlines()[-1] == "0 False"  # what a build recorded holds: nothing hashed
    key = _shard(repo, stage, "data/part-1.parquet")
    _swap_first_values(_entry(repo, key) / "data" / file, column)
    out = run_hfbuild(repo, "status")
    assert out.returncode == 1
    assert f"its stored result {before[stage]['fp']} is damaged (its shard {key}" in out.stdout
    got = _result(repo, stage)
    assert "rows" not in got and "is damaged" in got["damaged"]
    log.unlink()
    doit(repo, "run", "preprocess", log=log)
    fn = "keep" if stage == "kept" else stage
    assert _per_shard(log, fn) == {"part-1"}
    assert sum(1 for k in calls(log) if not k.startswith(fn + ":")) == 0
    assert shard_project.state(repo) == before


def test_touched_shard_is_taken_by_a_rebuild_after_one_hash(tmp_path: pathlib.Path) -> None:
    """A rebuild after new data keeps a listed shard whose file was touched with its bytes
    unchanged (hashed once, not rebuilt), and rebuilds one whose file was edited in place at
    the same size, though both still have the sizes the list records."""
    repo = shard_project.make_project(Repo.init(tmp_path / "repo"))
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    touched = _entry(repo, _shard(repo, "feat", "data/part-0.parquet"))
    os.utime(touched / "data" / "data-00000-of-00001.arrow", ns=(1, 1))
    edited = _entry(repo, _shard(repo, "feat", "data/part-2.parquet"))
    _swap_first_values(edited / "data" / "data-00000-of-00001.arrow", "y")
    shard_project.write_part(repo, "part-4", 400)
    repo.commit("grow")
    log.unlink()
    doit(repo, "run", "preprocess", log=log)
    assert _per_shard(log, "feat") == {"part-2", "part-4"}
    fresh = {"HFBUILD_STORE": str(tmp_path / "fresh-store")}
    doit(repo, "run", "preprocess", log=tmp_path / "fresh.log", env=fresh)
    assert shard_project.state(repo) == shard_project.state(repo, fresh)


def test_deep_verify_flags_a_damaged_shard_and_all_over_it_in_one_pass(
    tmp_path: pathlib.Path,
) -> None:
    """Damage the cheap checks cannot see (bit rot: bytes changed, identities as recorded)
    in a shard that is another stage's base: one `verify --deep` reports the shard, the
    list of shards naming it, the filter's shard selecting its rows and that filter's
    list; a second finds nothing left, and a build restores every result."""
    repo = shard_project.make_project(Repo.init(tmp_path / "repo"))
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    before = shard_project.state(repo)
    key = _shard(repo, "idx", "data/part-1.parquet")
    kept_shard = _shard(repo, "kept", "data/part-1.parquet")
    arrow = _entry(repo, key) / "data" / "data-00000-of-00001.arrow"
    _swap_first_values(arrow, "x")
    st = arrow.stat()
    manifest = _entry(repo, key) / "manifest.json"  # rot: its record holds the new identity
    doc = json.loads(manifest.read_text())
    own = doc["ids"]["own"]
    own["data-00000-of-00001.arrow"][1:4] = [st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    manifest.write_text(json.dumps(doc))
    for fp in (before["idx"]["fp"], before["kept"]["fp"]):  # the lists check it by its own
        listed = _entry(repo, fp) / "manifest.json"
        doc = json.loads(listed.read_text())
        del doc["ids"]
        listed.write_text(json.dumps(doc))
    assert run_hfbuild(repo, "status").returncode == 0  # invisible to the cheap checks
    out = run_hfbuild(repo, "verify", "--deep")
    assert out.returncode == 1
    for fp in (key, before["idx"]["fp"], kept_shard, before["kept"]["fp"]):
        assert f"the stored result {fp} is damaged" in out.stderr, fp
    again = run_hfbuild(repo, "verify", "--deep")
    assert again.returncode == 0, again.stderr
    doit(repo, "run", "preprocess", log=log)
    assert shard_project.state(repo) == before


# -- a large manifest's checksum, checked once per version of its file -----------------------

_FP = "0123456789abcdef0123456789abcdef"


def _write_manifest(store: Any, text_of: str = "x", *, right: bool = True) -> pathlib.Path:
    """A manifest over `CHECKED_MIN` bytes in the store's entry `_FP` (its checksum right,
    or not), as a list of thousands of shards makes one."""
    from hfbuild.store.entry import CHECKED_MIN
    from hfbuild.store.paths import manifest_digest

    doc: dict[str, Any] = {"fingerprint": _FP, "files": {}, "note": text_of * CHECKED_MIN}
    doc["manifest_digest"] = manifest_digest(doc) if right else "0" * 32
    path = pathlib.Path(store.layout.entry(_FP)) / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("manifest.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    return path


def _aged(path: pathlib.Path) -> None:
    """Wait until `path` changed more than the racy window (2 s) ago."""
    import time

    from hfbuild.store.entry import RACY_NS

    st = os.stat(path)
    time.sleep(max(0.0, (max(st.st_mtime_ns, st.st_ctime_ns) + RACY_NS) / 1e9 - time.time()))
    time.sleep(0.05)


def test_a_large_manifest_edited_after_its_check_is_refused(tmp_path: pathlib.Path) -> None:
    """A large manifest whose checksum was found right is not re-encoded while its file is
    unchanged, and an edit of the same size after that check is still refused."""
    from hfbuild.store.store import Store

    store = Store(str(tmp_path / "store"))
    path = _write_manifest(store)
    _aged(path)
    assert store.manifests.read_why(_FP)[0] is not None
    assert _FP in json.loads(pathlib.Path(store.layout.checked_path()).read_text())
    text = path.read_text()
    path.write_text(text.replace('"xxx', '"xyx', 1))  # same size, in place
    fresh = Store(str(tmp_path / "store"))
    doc, why = fresh.manifests.read_why(_FP)
    assert doc is None and why == "its manifest was edited after it was written"
    assert store.manifests.read_why(_FP)[0] is None


def test_a_large_manifest_checked_once_is_taken_by_its_stat_data(tmp_path: pathlib.Path) -> None:
    """What a check remembers is taken while the file has the stat data it recorded: a
    manifest whose checksum is wrong, recorded (by hand) as checked with its stat data
    now, is read without its checksum being computed again; once its file changes, it is
    refused."""
    from hfbuild.store.store import Store

    store = Store(str(tmp_path / "store"))
    path = _write_manifest(store, right=False)
    assert store.manifests.read_why(_FP)[0] is None
    st = os.stat(path)
    checked = {_FP: [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]}
    pathlib.Path(store.layout.checked_path(create=True)).write_text(json.dumps(checked))
    assert Store(str(tmp_path / "store")).manifests.read_why(_FP)[0] is not None
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same times but the ctime
    assert Store(str(tmp_path / "store")).manifests.read_why(_FP)[0] is None


def test_a_manifest_changed_within_the_racy_window_is_not_remembered(
    tmp_path: pathlib.Path,
) -> None:
    """A manifest written less than 2 s ago could change again within the same timestamp
    tick: its check is not remembered."""
    from hfbuild.store.store import Store

    store = Store(str(tmp_path / "store"))
    _write_manifest(store)
    assert store.manifests.read_why(_FP)[0] is not None
    assert not os.path.exists(store.layout.checked_path())


def test_the_keys_a_store_lacks_are_found_by_listing_its_directories(
    tmp_path: pathlib.Path,
) -> None:
    """`Store.absent`: of many keys, those with no entry directory, by one listing of each
    `objects/<two hex digits>/` they fall in (a cold build's thousands of shards): a key
    with an entry is never among them, a key whose directory of entries does not exist is."""
    from hfbuild.store.store import Store

    store = Store(str(tmp_path / "store"))
    have, lack, elsewhere = "ab" + "1" * 30, "ab" + "2" * 30, "cd" + "3" * 30
    (tmp_path / "store" / "objects" / "ab" / have).mkdir(parents=True)
    assert store.absent([have, lack, elsewhere]) == {lack, elsewhere}
    assert store.absent([]) == set()
