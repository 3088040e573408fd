"""`hfbuild gc` and `du`: keep what the lock references, delete the rest."""

from __future__ import annotations

import os
import pathlib
import subprocess

from filelock import FileLock

from tests.helpers import HFBUILD, Repo, run_hfbuild
from tests.pipeline_project import doit, make_project


def entries(repo: Repo) -> set[str]:
    return {p.name for p in (repo.path / ".hfbuild/objects").glob("*/*")}


def locked(repo: Repo, rev: str = "HEAD") -> set[str]:
    import json

    text = repo.git("show", f"{rev}:hfbuild.lock")
    return {e["fingerprint"] for e in json.loads(text)["stages"].values()}


def build_two_versions(repo: Repo, tmp_path: pathlib.Path) -> None:
    make_project(repo)
    repo.write({".gitignore": ".doit.db*\n"})
    doit(repo, "run", "preprocess", log=tmp_path / "log")
    repo.commit("v1")
    dodo = repo.path / "dodo.py"
    dodo.write_text(dodo.read_text().replace('{"scale": 1}', '{"scale": 2}'))
    doit(repo, "run", "preprocess", log=tmp_path / "log")
    repo.commit("v2")


def test_gc_keeps_what_the_lock_references(repo: Repo, tmp_path: pathlib.Path) -> None:
    """With --keep-days 0 everything the HEAD lock references survives and the rest goes;
    --dry-run only lists it."""
    build_two_versions(repo, tmp_path)
    before = entries(repo)
    assert len(before) == 6 and locked(repo) < before
    dry = run_hfbuild(repo, "gc", "--keep-days", "0", "--dry-run")
    assert "would remove 1 item(s)" in dry.stdout
    assert entries(repo) == before
    out = run_hfbuild(repo, "gc", "--keep-days", "0")
    assert out.returncode == 0, out.stderr
    assert entries(repo) == locked(repo)
    assert run_hfbuild(repo, "status").returncode == 0


def test_gc_keep_commits_and_keep_days(repo: Repo, tmp_path: pathlib.Path) -> None:
    """--keep-commits 2 keeps the previous commit's results; recently used entries survive
    the default --keep-days."""
    build_two_versions(repo, tmp_path)
    before = entries(repo)
    run_hfbuild(repo, "gc")  # default keep-days 7: everything was used just now
    assert entries(repo) == before
    run_hfbuild(repo, "gc", "--keep-days", "0", "--keep-commits", "2")
    assert entries(repo) == before == locked(repo) | locked(repo, "HEAD~1")


def test_gc_spares_a_build_in_progress(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A temporary build directory whose build lock is held is not deleted; once the lock is
    free, the leftover goes."""
    make_project(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "log")
    store = repo.path / ".hfbuild"
    fp = "0123456789abcdef0123456789abcdef"
    building = store / "tmp" / f"{fp}.inprogress"
    (building / "data").mkdir(parents=True)
    (building / "data" / "part.arrow").write_bytes(b"x" * 100)
    lock = FileLock(str(store / "locks" / f"{fp}.lock"))
    with lock:
        run_hfbuild(repo, "gc", "--keep-days", "0")
        assert building.exists()
    out = run_hfbuild(repo, "gc", "--keep-days", "0")
    assert not building.exists()
    assert f"removed tmp/{fp}.inprogress" in out.stdout


def test_du_lists_sizes(repo: Repo, tmp_path: pathlib.Path) -> None:
    """du shows each stage's result size and the total."""
    make_project(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "log")
    lines = run_hfbuild(repo, "du").stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == [
        "raw",
        "feat",
        "kept",
        "split",
        "lens",
        "other",
        "total",
    ]
    assert all(int(ln.split()[1].replace(",", "")) > 0 for ln in lines[:5])


def test_gc_keeps_what_other_clones_sharing_the_store_reference(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """Two clones share one store (HFBUILD_STORE) at different arguments: gc run from one
    keeps the results the other's lock references, since every lock that records into a
    store is registered with it."""
    make_project(repo)
    repo.write({".gitignore": ".doit.db*\n"}, commit="ignore")
    store = tmp_path / "shared"
    env = {"HFBUILD_STORE": str(store)}
    other = repo.clone(tmp_path / "other")
    dodo = other.path / "dodo.py"
    dodo.write_text(dodo.read_text().replace('{"scale": 1}', '{"scale": 5}'))
    doit(repo, "run", "preprocess", log=tmp_path / "a.log", env=env)
    doit(other, "run", "preprocess", log=tmp_path / "b.log", env=env)
    before = {p.name for p in (store / "objects").glob("*/*")}
    assert len(before) == 6
    out = subprocess.run(
        [HFBUILD, "gc", "--keep-days", "0"],
        cwd=repo.path,
        text=True,
        capture_output=True,
        env={**os.environ, **env, "CALL_LOG": "x"},
    )
    assert out.returncode == 0, out.stderr
    assert {p.name for p in (store / "objects").glob("*/*")} == before
