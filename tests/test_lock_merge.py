"""hfbuild.lock after a merge of two branches that both rebuilt: conflicts are reported,
never read as an empty lock, and `hfbuild lock` rewrites it without building."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

from hfbuild.store import lockfile
from tests.helpers import Repo, git, run_hfbuild
from tests.pipeline_project import calls, doit, make_project

MARKERS = ("<<<<<<< ", "=======", ">>>>>>> ")


def merged(tmp_path: pathlib.Path) -> Repo:
    """Our branch rebuilt `lens` (pkg/text.py); a teammate's clone, with its own store,
    rebuilt `lens` (its scale argument) and `feat`, `kept`, `split` (pkg/util/deep.py). Their
    branch merged into ours: the code merges, hfbuild.lock conflicts."""
    ours = Repo.init(tmp_path / "ours")
    make_project(ours)
    ours.write({".gitignore": ".doit.db*\n.hfbuild/\n"})
    doit(ours, "run", "preprocess", log=tmp_path / "calls.log")
    ours.commit("built")
    mate = ours.clone(tmp_path / "mate")
    mate.git("checkout", "-q", "-b", "theirs")
    dodo = (mate.path / "dodo.py").read_text().replace('{"scale": 1}', '{"scale": 2}')
    mate.write(
        {"pkg/util/deep.py": "OFFSET = 5\n\ndef offset():\n    return OFFSET\n", "dodo.py": dodo},
        commit="their edits",
    )
    doit(mate, "run", "preprocess", log=tmp_path / "mate-calls.log")
    mate.commit("their lock")
    text = ours.path / "pkg/text.py"
    ours.write({"pkg/text.py": text.read_text().replace("len(t)", "len(t.strip())")})
    ours.commit("our edit")
    doit(ours, "run", "preprocess", log=tmp_path / "calls.log")
    ours.commit("our lock")
    ours.git("fetch", "-q", str(mate.path), "theirs")
    out = git(ours.path, "merge", "--no-edit", "FETCH_HEAD", check=False)
    assert "CONFLICT (content): Merge conflict in hfbuild.lock" in out, out
    lock = (ours.path / "hfbuild.lock").read_text()
    assert all(m in lock for m in MARKERS)
    assert "pkg/util/deep.py" not in ours.git("diff", "--name-only", "--diff-filter=U")
    (tmp_path / "calls.log").unlink()
    return ours


def objects(repo: Repo) -> list[str]:
    return sorted(p.name for p in (repo.path / ".hfbuild" / "objects").glob("*/*"))


def test_verify_and_status_report_a_conflicted_lock(tmp_path: pathlib.Path) -> None:
    """`verify` and `status` say the lock has merge conflict markers and name `hfbuild lock`
    (status still lists the stages); so does `verify --staged`, with the lock unmerged in the
    index or staged with its markers; none of them writes the lock."""
    repo = merged(tmp_path)
    before = (repo.path / "hfbuild.lock").read_text()
    out = run_hfbuild(repo, "verify")
    assert out.returncode == 1
    assert "hfbuild.lock has unresolved merge conflict markers" in out.stderr
    assert "run `hfbuild lock`" in out.stderr

    out = run_hfbuild(repo, "status")
    assert out.returncode == 1
    assert "hfbuild status: hfbuild.lock has unresolved merge conflict markers" in out.stderr
    assert [ln.split()[0] for ln in out.stdout.splitlines()[:5]] == [
        "raw",
        "feat",
        "kept",
        "split",
        "lens",
    ]
    assert run_hfbuild(repo, "status", "--quiet").returncode == 1

    for step in ("unmerged in the index", "staged with its markers"):
        out = run_hfbuild(repo, "verify", "--staged")
        assert out.returncode == 1, step
        assert "the staged hfbuild.lock has unresolved merge conflict markers" in out.stderr, step
        assert (repo.path / "hfbuild.lock").read_text() == before


def test_hfbuild_lock_resolves_a_conflict_without_building(tmp_path: pathlib.Path) -> None:
    """`hfbuild lock` rewrites the conflicted lock building nothing: stages the store holds
    from the store, stages only the teammate built from the side whose entry has the current
    fingerprint; `lens`, changed on both sides, has neither: reported (exit 1) and left out.
    After `doit run preprocess` the lock is complete and `verify` passes."""
    repo = merged(tmp_path)
    store = objects(repo)
    out = run_hfbuild(repo, "lock")
    assert out.returncode == 1, out.stdout + out.stderr
    assert objects(repo) == store and not calls(tmp_path / "calls.log")
    lines = out.stdout.splitlines()
    assert any(ln.startswith("raw: ") and ln.endswith("(from the store)") for ln in lines)
    for stage in ("feat", "kept", "split"):
        assert any(ln.startswith(f"{stage}: ") and "recorded entry" in ln for ln in lines)
    assert "stage 'lens' has no result for the current code and data" in out.stderr
    lock = json.loads((repo.path / "hfbuild.lock").read_text())["stages"]
    assert sorted(lock) == ["feat", "kept", "raw", "split"]
    out = run_hfbuild(repo, "verify")
    assert out.returncode == 1 and "stage 'lens' is not in the committed hfbuild.lock" in out.stderr

    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    assert sorted(json.loads((repo.path / "hfbuild.lock").read_text())["stages"]) == [
        "feat",
        "kept",
        "lens",
        "raw",
        "split",
    ]
    assert run_hfbuild(repo, "verify").returncode == 0
    again = run_hfbuild(repo, "lock")
    assert again.returncode == 0 and "unchanged: hfbuild.lock (5 stages)" in again.stdout


def test_a_build_rewrites_a_conflicted_lock_and_says_so(tmp_path: pathlib.Path) -> None:
    """`doit run preprocess` on a conflicted lock rewrites it (never reads it as empty and
    drops entries silently), warns that it did, and leaves a lock `verify` accepts, so
    `doit run preprocess && git add hfbuild.lock` still fixes what the hook refuses."""
    repo = merged(tmp_path)
    out = doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    said = out.stdout + out.stderr
    assert "hfbuild.lock had merge conflict markers: rewrote it" in said
    text = (repo.path / "hfbuild.lock").read_text()
    assert not any(m in text for m in MARKERS)
    assert run_hfbuild(repo, "verify").returncode == 0
    repo.git("add", "hfbuild.lock")
    assert run_hfbuild(repo, "verify", "--staged").returncode == 0


@pytest.mark.parametrize("style", ["merge", "diff3"])
def test_sides_of_a_conflicted_lock(tmp_path: pathlib.Path, style: str) -> None:
    """`lockfile.sides` gives back each side of the conflicts git's own three-way merge wrote
    (and the base in diff3 style), and `loads` refuses the conflicted text, naming the fix."""

    def doc(fp: str, rows: int) -> dict[str, object]:
        return {"fingerprint": fp, "inputs": {}, "manifest": {"k": fp}, "rows": rows}

    base = {"a": doc("a0", 1), "b": doc("b0", 2)}
    ours = {"a": doc("a1", 4), "b": doc("b0", 2)}
    theirs = {"a": doc("a2", 3), "b": doc("b0", 2)}
    for name, stages in (("base", base), ("ours", ours), ("theirs", theirs)):
        (tmp_path / name).write_text(lockfile.dumps(stages))
    out = subprocess.run(
        [
            "git",
            "merge-file",
            "-p",
            *(["--diff3"] if style == "diff3" else []),
            "ours",
            "base",
            "theirs",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode > 0, out.stderr  # the number of conflicts
    assert lockfile.conflicted(out.stdout)
    want = [ours, base, theirs] if style == "diff3" else [ours, theirs]
    assert lockfile.sides(out.stdout) == want
    with pytest.raises(lockfile.ConflictedLockError, match="run `hfbuild lock`"):
        lockfile.loads(out.stdout)
    assert not lockfile.conflicted(lockfile.dumps(ours))
