"""Corruption, bad input and hostile data: never wrong data, never a traceback, nothing lost."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import Repo, run_hfbuild, run_python
from tests.pipeline_project import FILES, calls, doit, expected, make_project, results


def entry(repo: Repo, stage: str) -> pathlib.Path:
    fp = json.loads((repo.path / "hfbuild.lock").read_text())["stages"][stage]["fingerprint"]
    return repo.path / ".hfbuild" / "objects" / fp[:2] / fp


def no_hfbuild_traceback(out: subprocess.CompletedProcess[str]) -> bool:
    text = out.stdout + out.stderr
    return "hfbuild/pipeline/pipeline.py" not in text and "hfbuild/builds/builder.py" not in text


@pytest.fixture
def built(repo: Repo, tmp_path: pathlib.Path) -> Repo:
    make_project(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "first.log")
    return repo


def _truncate(e: pathlib.Path, other: pathlib.Path) -> None:
    f = e / "data" / "data-00000-of-00001.arrow"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _delete(e: pathlib.Path, other: pathlib.Path) -> None:
    (e / "data" / "data-00000-of-00001.arrow").unlink()


def _edit_manifest(e: pathlib.Path, other: pathlib.Path) -> None:
    doc = json.loads((e / "manifest.json").read_text())
    doc["rows"] = 12345
    (e / "manifest.json").write_text(json.dumps(doc))


def _foreign_manifest(e: pathlib.Path, other: pathlib.Path) -> None:
    shutil.rmtree(e)
    shutil.copytree(other, e)


def _unsafe_path(e: pathlib.Path, other: pathlib.Path) -> None:
    doc = json.loads((e / "manifest.json").read_text())
    doc["files"]["../../../outside"] = 1
    (e / "manifest.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_truncate, "truncated or overwritten"),
        (_delete, "data-00000-of-00001.arrow is missing"),
        (_edit_manifest, "its manifest was edited after it was written"),
        (_foreign_manifest, "its manifest belongs to another fingerprint"),
        (_unsafe_path, "edited after it was written"),
    ],
    ids=["truncated-arrow", "deleted-file", "edited-manifest", "foreign-manifest", "unsafe-path"],
)
def test_corrupt_entry_is_reported_moved_aside_and_rebuilt(
    built: Repo, tmp_path: pathlib.Path, damage: Any, why: str
) -> None:
    """A damaged store entry is noticed by the cheap checks when it is used: a warning says
    what is wrong, the entry is moved aside, the stage (only) is rebuilt, the results are
    right, and gc clears the quarantine."""
    e = entry(built, "lens")
    damage(e, entry(built, "raw"))
    log = tmp_path / "second.log"
    out = doit(built, "run", "preprocess", log=log)
    assert calls(log) == {"lens": 1}
    assert f"warning: stage 'lens': the stored result {e.name} is damaged (" in out.stderr
    assert why in out.stderr
    assert results(built)["lens"] == expected()["lens"]
    assert any((built.path / ".hfbuild/tmp").iterdir())
    run_hfbuild(built, "gc", "--keep-days", "0")
    assert not any((built.path / ".hfbuild/tmp").iterdir())


def test_deep_verify_checks_entries_that_are_not_current(
    built: Repo, tmp_path: pathlib.Path
) -> None:
    """Damage to an older result (not what the code gives now) is found by `verify --deep`
    too, so reverting to that code later rebuilds instead of serving it."""
    f = entry(built, "lens") / "data" / "data-00000-of-00001.arrow"
    data = bytearray(f.read_bytes())
    data[-150] ^= 0xFF
    f.write_bytes(bytes(data))
    dodo = built.path / "dodo.py"
    original = dodo.read_text()
    dodo.write_text(original.replace('{"scale": 1}', '{"scale": 2}'))  # lens entry not current
    log = tmp_path / "second.log"
    doit(built, "run", "preprocess", log=log)
    out = run_hfbuild(built, "verify", "--deep")
    assert out.returncode == 1 and "stage 'lens': the stored result" in out.stderr
    dodo.write_text(original)  # back to the code of the damaged result
    log.unlink()
    doit(built, "run", "preprocess", log=log)
    assert calls(log) == {"lens": 1}
    assert results(built)["lens"] == expected()["lens"]


def test_deep_verify_finds_same_size_corruption(built: Repo, tmp_path: pathlib.Path) -> None:
    """Bytes altered without changing a file's size pass the cheap checks; `verify --deep`
    reads the data, reports the entry, moves it aside, and the next run rebuilds it."""
    f = entry(built, "kept") / "data" / "indices.arrow"  # a filter's entry: its indices
    data = bytearray(f.read_bytes())
    data[-150] ^= 0xFF
    f.write_bytes(bytes(data))
    out = run_hfbuild(built, "verify", "--deep")
    assert out.returncode == 1
    assert "stage 'kept': the stored result" in out.stderr and "is damaged (" in out.stderr
    log = tmp_path / "second.log"
    doit(built, "run", "preprocess", log=log)
    assert calls(log) == {"keep": 1}
    assert results(built)["kept"] == expected()["kept"]
    assert run_hfbuild(built, "verify", "--deep").returncode == 0


def test_failing_transform_keeps_everything_else(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A map function that raises fails its stage with the error and the user's own line,
    without a traceback into hfbuild; the other stages are built and stay cached, and the
    store holds no partial entry."""
    make_project(repo)
    repo.write(
        {"pkg/text.py": "def lens(batch, scale=1):\n    raise ValueError('bad row')\n"},
        commit="broken",
    )
    log = tmp_path / "log"
    out = doit(repo, "run", "--continue", "preprocess", log=log, check=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "stage 'lens' failed: ValueError: bad row" in text
    assert 'pkg/text.py", line 2, in lens' in text
    assert "Earlier stages stay cached and the store is unchanged" in text
    assert no_hfbuild_traceback(out)
    assert calls(log) == {"feat": 1, "keep": 1, "split": 1}
    assert not any((repo.path / ".hfbuild/tmp").iterdir())
    log.unlink()
    doit(repo, "run", "--continue", "preprocess", log=log, check=False)
    assert calls(log) == {}  # nothing rebuilt; lens still fails before calling anything
    assert len(list((repo.path / ".hfbuild/objects").glob("*/*"))) == 4


def test_missing_data_file_is_named(built: Repo, tmp_path: pathlib.Path) -> None:
    """A data file that disappeared fails the load stage with the pattern named."""
    (built.path / "data" / "part-0.parquet").unlink()
    out = doit(built, "run", "preprocess", log=tmp_path / "log", check=False)
    assert out.returncode != 0
    assert "'data/*.parquet' matches no file" in out.stdout + out.stderr
    assert no_hfbuild_traceback(out)


def test_corrupted_git_index_is_a_clear_error(built: Repo, tmp_path: pathlib.Path) -> None:
    """A corrupt .git/index gives a message that says how to repair it."""
    (built.path / ".git" / "index").write_bytes(b"DIRC\x00\x00\x00\x02garbage" * 3)
    out = doit(built, "run", "preprocess", log=tmp_path / "log", check=False)
    assert out.returncode != 0
    assert "cannot be read" in out.stdout + out.stderr
    assert "rm .git/index && git reset" in out.stdout + out.stderr
    status = run_hfbuild(built, "status")
    assert status.returncode == 1 and "hfbuild: error: the git index of" in status.stderr


def test_store_that_cannot_be_written(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A store path that cannot be created fails with a message naming it and the fix (a
    file in the way: permissions do not stop root, which CI runs as)."""
    make_project(repo)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    out = doit(
        repo,
        "run",
        "preprocess",
        log=tmp_path / "log",
        check=False,
        env={"HFBUILD_STORE": str(blocker / "store")},
    )
    assert out.returncode != 0
    assert f"cannot create the store at {blocker / 'store'}" in out.stdout + out.stderr
    assert "point HFBUILD_STORE at a writable directory" in out.stdout + out.stderr


@pytest.fixture
def small_disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 768 KiB tmpfs: a real disk that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=768k", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_while_writing(
    repo: Repo, tmp_path: pathlib.Path, small_disk: pathlib.Path
) -> None:
    """When the store's disk fills up mid-build the stage fails saying so, nothing partial
    is published, and what was built before is intact."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    make_project(repo)
    n = 20_000
    pq.write_table(
        pa.table({"x": list(range(n)), "text": [f"row {i:08d} " * 4 for i in range(n)]}),
        repo.path / "data" / "part-0.parquet",
    )
    repo.commit("bigger")
    store = small_disk / "store"
    out = doit(
        repo,
        "run",
        "--continue",
        "preprocess",
        log=tmp_path / "log",
        check=False,
        env={"HFBUILD_STORE": str(store)},
    )
    assert out.returncode != 0
    assert "is full (No space left on device)" in out.stdout + out.stderr
    assert "Nothing was published and earlier results are intact" in out.stdout + out.stderr
    assert not any((store / "tmp").iterdir())
    check = """
import sys, dodo
from hfbuild.store.store import Store
s = dodo.pipe.store
print(all(s.check(fp) is None for fp in s.fingerprints()), len(s.fingerprints()))
"""
    got = run_python(check, repo.path, env={"HFBUILD_STORE": str(store), "CALL_LOG": "x"})
    assert got.stdout.split()[0] == "True"


def test_repository_without_commits_builds(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A repository with no commit builds, warning that the code is untracked."""
    repo.write(FILES)
    (repo.path / "data").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"x": [1, 2], "text": ["a", "bb"]}), repo.path / "data" / "part-0.parquet"
    )
    out = doit(repo, "run", "preprocess", log=tmp_path / "log")
    assert "(untracked)" in out.stderr
    assert results(repo)["feat"] == [2, 4]


def test_not_a_git_repository_uses_content(tmp_path: pathlib.Path) -> None:
    """Outside git the pipeline still works: files are identified by content, with a
    warning; a copy of the project elsewhere gets the same fingerprints."""
    a = Repo(tmp_path / "plain")
    a.path.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    a.write(FILES)
    (a.path / "data").mkdir()
    pq.write_table(pa.table({"x": [1, 2], "text": ["a", "bb"]}), a.path / "data/part-0.parquet")
    out = doit(a, "run", "preprocess", log=tmp_path / "log")
    assert "is not in a git repository, so its files are identified by content" in out.stderr
    shutil.copytree(a.path, tmp_path / "copy", ignore=shutil.ignore_patterns(".hfbuild"))
    code = "import dodo; print(sorted(s.fingerprint for s in dodo.pipe))"
    fa = run_python(code, a.path, env={"CALL_LOG": "x"}).stdout
    fb = run_python(code, tmp_path / "copy", env={"CALL_LOG": "x"}).stdout
    assert fa == fb


def test_data_outside_the_repository_by_content(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A data file outside the project is identified by its name and bytes, not its absolute
    path: moving it elsewhere keeps the fingerprint; new bytes change it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    make_project(repo)
    outside = tmp_path / "elsewhere" / "one" / "ext.parquet"
    outside.parent.mkdir(parents=True)
    pq.write_table(pa.table({"x": [5, 6], "text": ["x", "y"]}), outside)
    dodo = repo.path / "dodo.py"
    dodo.write_text(
        dodo.read_text().replace(
            'data_files="data/*.parquet"', "data_files=__import__('os').environ['EXT']"
        )
    )
    code = "import dodo; print(dodo.pipe['raw'].fingerprint)"
    env = {"CALL_LOG": "x", "EXT": str(outside)}
    first = run_python(code, repo.path, env=env).stdout
    moved = tmp_path / "other" / "place" / "ext.parquet"
    moved.parent.mkdir(parents=True)
    shutil.move(outside, moved)
    assert run_python(code, repo.path, env={**env, "EXT": str(moved)}).stdout == first
    pq.write_table(pa.table({"x": [7, 8, 9, 10], "text": ["z"] * 4}), moved)
    assert run_python(code, repo.path, env={**env, "EXT": str(moved)}).stdout != first
    doit(repo, "run", "preprocess", log=tmp_path / "log", env={"EXT": str(moved)})
    assert results(repo, {"EXT": str(moved)})["feat"] == [14, 16, 18, 20]


def test_function_without_source(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A transform made by exec() (no source file of its own) is identified by the module
    that made it, builds, and its fingerprint is stable across processes."""
    make_project(repo)
    gen = (
        "SRC = '''def lens(batch, scale=1):\n"
        "    return {'n': [7] * len(batch['text'])}\n'''\n"
        "exec(SRC)\n"
    )
    (repo.path / "pkg" / "gen.py").write_text(gen)
    dodo = repo.path / "dodo.py"
    dodo.write_text(
        dodo.read_text()
        .replace("text.lens", "gen.lens")
        .replace("from pkg import text, transforms", "from pkg import gen, transforms")
    )
    repo.commit("generated")
    code = "import dodo; print(dodo.pipe['lens'].fingerprint)"
    runs = {
        run_python(code, repo.path, env={"CALL_LOG": "x", "PYTHONHASHSEED": s}).stdout for s in "12"
    }
    assert len(runs) == 1
    doit(repo, "run", "preprocess", log=tmp_path / "log")
    assert results(repo)["lens"] == [7] * 40


def test_nothing_is_unpickled_from_the_store(built: Repo, tmp_path: pathlib.Path) -> None:
    """Loading every result (and checking them in full) triggers no unpickling: an audit
    hook sees no pickle.find_class event."""
    code = """
import sys
events = []
sys.addaudithook(lambda ev, args: events.append(args) if ev == "pickle.find_class" else None)
import dodo
for s in dodo.pipe:
    ds = s.result()
    len(ds)
from hfbuild.cli.verify import check_deep
assert check_deep(dodo.pipe) == []
print("unpickled:", events)
"""
    out = run_python(code, built.path, env={"CALL_LOG": "x"})
    assert out.stdout.strip().splitlines()[-1] == "unpickled: []"
