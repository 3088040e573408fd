"""Uncommitted data is dirty data: data files (a load's `data_files`, a stage's `file_deps`)
that are not committed warn as uncommitted code does, make `status` exit 1 and `--strict` fail,
and `verify --staged` says to stage them, all at once; git-ignored data is kept out of git on
purpose and does none of this. Also: a user error while doit imports dodo.py is one line."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import Repo, run_hfbuild
from tests.test_hook_shipped import build, commit, project, user_env

PROJECT = {
    "t.py": "def double(batch):\n    return {'y': [x * 2 for x in batch['x']]}\n",
    "conf.txt": "one\n",
    "dodo.py": """
        from hfbuild import Pipeline
        import t

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        dbl = pipe.map("dbl", raw, t.double, batched=True, file_deps=["conf.txt"])


        def task_preprocess():
            yield from pipe.tasks()
        """,
    ".gitignore": ".hfbuild/\n.doit.db*\n__pycache__/\n",
}


def write_parquet(path: pathlib.Path, xs: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": xs}), path)


def doit(
    repo: Repo, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "doit", *args],
        cwd=repo.path,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def proj(repo: Repo) -> Repo:
    """Code and one data file, committed and built, the lock committed."""
    repo.write(PROJECT)
    write_parquet(repo.path / "data" / "a.parquet", [1, 2, 3])
    repo.commit("project")
    out = doit(repo, "run", "preprocess")
    assert out.returncode == 0, out.stdout + out.stderr
    repo.commit("lock")
    return repo


def test_uncommitted_data_warns_and_committing_it_keeps_the_result(proj: Repo) -> None:
    """A modified and an untracked data file (and a modified file_deps file) each warn under
    `doit run`, named in one warning per stage with their git status, as uncommitted code
    does; committing exactly them silences the warning and keeps the results (nothing is
    rebuilt)."""
    write_parquet(proj.path / "data" / "a.parquet", [1, 2, 3, 4])
    write_parquet(proj.path / "data" / "b.parquet", [5])
    (proj.path / "conf.txt").write_text("two\n")
    out = doit(proj, "run", "preprocess")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (
        "warning: stage 'raw' reads data files that are not committed: "
        "data/a.parquet (modified), data/b.parquet (untracked)" in out.stderr
    )
    assert "warning: stage 'dbl' reads data files that are not committed: conf.txt (modified)" in (
        out.stderr
    )
    assert "in .gitignore" in out.stderr  # what to do with data kept out of git on purpose

    proj.commit("data")
    again = doit(proj, "run", "preprocess")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "warning" not in again.stderr
    assert again.stdout.count("up to date") == 2, again.stdout


def test_status_exits_1_until_the_data_is_committed(proj: Repo) -> None:
    """`hfbuild status` marks a stage built from uncommitted data and exits 1, as for
    uncommitted code; once the data is committed it exits 0. A staged, uncommitted data file
    is still uncommitted."""
    write_parquet(proj.path / "data" / "b.parquet", [5])
    assert doit(proj, "run", "preprocess").returncode == 0
    out = run_hfbuild(proj, "status")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "raw  up to date (from uncommitted changes: data/b.parquet (untracked))" in out.stdout

    proj.git("add", "data/b.parquet")
    staged = run_hfbuild(proj, "status")
    assert staged.returncode == 1
    assert "data/b.parquet (staged)" in staged.stdout

    proj.commit("data")
    done = run_hfbuild(proj, "status")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "uncommitted" not in done.stdout


def test_strict_mode_refuses_uncommitted_data_even_when_built(proj: Repo) -> None:
    """HFBUILD_STRICT=1 makes uncommitted data an error under `doit run`, also for a stage
    the store already holds (built while not strict), and under `verify --strict`; both
    name the file."""
    write_parquet(proj.path / "data" / "a.parquet", [7, 8])
    assert doit(proj, "run", "preprocess").returncode == 0  # built, with a warning
    out = doit(proj, "run", "preprocess", env={"HFBUILD_STRICT": "1"})
    assert out.returncode != 0, out.stdout + out.stderr
    said = out.stdout + out.stderr
    assert "data/a.parquet (modified)" in said
    assert "allows only committed code and data" in said

    verify = run_hfbuild(proj, "verify", "--strict")
    assert verify.returncode == 1
    assert "stage 'raw' has uncommitted data: data/a.parquet (modified)" in verify.stderr

    proj.commit("data")
    assert doit(proj, "run", "preprocess", env={"HFBUILD_STRICT": "1"}).returncode == 0


def test_git_ignored_data_is_not_uncommitted(repo: Repo) -> None:
    """Data that .gitignore keeps out of git cannot be committed: it does not warn, `status`
    exits 0, strict mode accepts it, and the pre-commit check passes with the lock naming it
    (its content id is pinned there). A tracked data file in the same pipeline still counts."""
    repo.write({**PROJECT, ".gitignore": PROJECT[".gitignore"] + "data/\n"})
    write_parquet(repo.path / "data" / "a.parquet", [1, 2])
    write_parquet(repo.path / "data" / "b.parquet", [3])
    repo.commit("project, data ignored")
    out = doit(repo, "run", "preprocess", env={"HFBUILD_STRICT": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "warning" not in out.stderr
    assert run_hfbuild(repo, "status").returncode == 0
    repo.git("add", "hfbuild.lock")
    verify = run_hfbuild(repo, "verify", "--staged")
    assert verify.returncode == 0, verify.stderr

    repo.git("add", "-f", "data/b.parquet")  # tracked despite .gitignore: git's status rules
    repo.commit("b tracked")
    write_parquet(repo.path / "data" / "b.parquet", [4])
    assert doit(repo, "run", "preprocess").returncode == 0
    status = run_hfbuild(repo, "status")
    assert status.returncode == 1
    assert "data/b.parquet (modified)" in status.stdout and "a.parquet" not in status.stdout


def test_data_status_survives_the_code_cache_across_index_changes(proj: Repo) -> None:
    """The committed state of data files is remembered per tree state (index file and HEAD):
    once remembered, a change of the index alone (the file untracked again with
    `git rm --cached`, then added back) is seen each time."""
    time.sleep(2.1)  # the index must be older than git's racy window to be remembered
    assert run_hfbuild(proj, "status").returncode == 0
    assert run_hfbuild(proj, "status").returncode == 0  # answered from the code cache
    proj.git("rm", "-q", "--cached", "data/a.parquet")
    out = run_hfbuild(proj, "status")
    assert out.returncode == 1
    assert "data/a.parquet (untracked)" in out.stdout
    time.sleep(2.1)
    assert run_hfbuild(proj, "status").returncode == 1
    proj.git("add", "data/a.parquet")
    time.sleep(2.1)
    assert run_hfbuild(proj, "status").returncode == 0
    assert run_hfbuild(proj, "status").returncode == 0


FIX = re.compile(r"Fix: (.*)")


def advice(said: str, python: pathlib.Path) -> list[str]:
    """The commands the first `Fix:` of a refusal names, in order, up to its first
    parenthesis (the alternatives), as shell commands with the project's interpreter."""
    first = FIX.search(said)
    assert first is not None, said
    main = first.group(1).split(" (")[0]
    commands = re.findall(r"`([^`]+)`", main)
    assert commands, said
    return [c.replace("doit ", f"{python} -m doit ") for c in commands]


def test_following_the_hooks_advice_for_data_terminates(tmp_path: pathlib.Path) -> None:
    """With the shipped hook (pre-commit framework, the project's .venv): a modified and a new
    data file, built but not staged, make the commit fail naming both files at once with the
    `git add` that fixes it; doing what each refusal says, step by step, gets the commit
    through within two refusals, and the commit holds both data files."""
    repo, python = project(tmp_path, with_hfbuild=True)
    build(repo, python)
    repo.git("add", "-A")
    first = commit(repo, "project, built")
    assert first.returncode == 0, first.stdout + first.stderr

    data = repo.path / "data"
    pq.write_table(pa.table({"text": ["a changed row", "and another"]}), data / "part-0.parquet")
    pq.write_table(pa.table({"text": ["a new file"]}), data / "part-1.parquet")
    build(repo, python)
    repo.git("add", "hfbuild.lock")  # what the hook used to advise: not enough

    refusals = []
    for _ in range(4):
        out = commit(repo, "new data")
        said = out.stdout + out.stderr
        if out.returncode == 0:
            break
        refusals.append(said)
        for command in advice(said, python):
            done = subprocess.run(
                command, shell=True, cwd=repo.path, env=user_env(), capture_output=True, text=True
            )
            assert done.returncode == 0, command + "\n" + done.stdout + done.stderr
    else:
        raise AssertionError("the advice loops:\n" + "\n----\n".join(refusals))
    assert 1 <= len(refusals) <= 2, refusals
    # pre-commit stashes unstaged changes while hooks run: part-0 is known from the lock.
    assert (
        "data/part-0.parquet (differs from the lock), data/part-1.parquet (untracked)"
        in refusals[0]
    )
    assert "`git add data/part-0.parquet data/part-1.parquet`" in refusals[0]
    tree = repo.git("ls-tree", "-r", "--name-only", "HEAD", "data")
    assert tree.split() == ["data/part-0.parquet", "data/part-1.parquet"]
    assert repo.git("status", "--porcelain", "data", "hfbuild.lock") == ""


def test_following_the_plain_hooks_advice_for_data_terminates(proj: Repo) -> None:
    """With `hfbuild install-hook`'s hook (which sees the work tree): a modified and a new
    data file, built, the lock staged: the refusal names both with their status in one
    `git add`; following it gets the commit through at the next attempt."""
    assert run_hfbuild(proj, "install-hook").returncode == 0
    write_parquet(proj.path / "data" / "a.parquet", [1, 2, 3, 4])
    write_parquet(proj.path / "data" / "b.parquet", [5])
    assert doit(proj, "run", "preprocess").returncode == 0
    proj.git("add", "hfbuild.lock")
    refusals = []
    for _ in range(4):
        out = subprocess.run(
            ["git", "commit", "-q", "-m", "data"], cwd=proj.path, capture_output=True, text=True
        )
        if out.returncode == 0:
            break
        refusals.append(out.stdout + out.stderr)
        for command in advice(refusals[-1], pathlib.Path(sys.executable)):
            done = subprocess.run(command, shell=True, cwd=proj.path, capture_output=True)
            assert done.returncode == 0, command
    else:
        raise AssertionError("the advice loops:\n" + "\n----\n".join(refusals))
    assert len(refusals) == 1, refusals
    assert "data/a.parquet (modified), data/b.parquet (untracked)" in refusals[0]
    assert proj.git("ls-tree", "-r", "--name-only", "HEAD", "data").split() == [
        "data/a.parquet",
        "data/b.parquet",
    ]


def test_a_user_error_while_doit_loads_dodo_is_one_line(repo: Repo) -> None:
    """An input naming no stage, under `doit run` and `doit list`: doit prints the
    HfbuildError's message on one line (`ERROR: ...`) and exits non-zero, no traceback; a
    bug in dodo.py (not a user error of hfbuild's) still shows its traceback."""
    repo.write(PROJECT)
    dodo = repo.path / "dodo.py"
    dodo.write_text(dodo.read_text().replace('pipe.map("dbl", raw,', 'pipe.map("dbl", "rwa",'))
    write_parquet(repo.path / "data" / "a.parquet", [1])
    for args in (["run", "preprocess"], ["list"]):
        out = doit(repo, *args)
        assert out.returncode != 0
        lines = (out.stdout + out.stderr).strip().splitlines()
        assert lines == ["ERROR: stage 'dbl': input 'rwa' is not a stage defined above it"], lines

    dodo.write_text(dodo.read_text().replace("import t\n", "import t\nundefined_name\n"))
    bug = doit(repo, "run", "preprocess")
    assert bug.returncode != 0 and "Traceback" in bug.stderr and "NameError" in bug.stderr
