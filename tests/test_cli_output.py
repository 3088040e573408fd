"""What the `hfbuild` command prints: into a closed pipe, and for uncommitted code."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

from tests.helpers import HFBUILD, Repo, run_hfbuild
from tests.pipeline_project import doit, make_project


@pytest.fixture
def built(repo: Repo, tmp_path: pathlib.Path) -> Repo:
    """The test project, built once, with hfbuild.lock committed."""
    make_project(repo)
    repo.write({".gitignore": ".doit.db*\n"})
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    repo.commit("build and lock")
    return repo


def into_closed_pipe(repo: Repo, *args: str, stream: str = "stdout") -> tuple[int, str]:
    """Run hfbuild with `stream` a pipe whose reader is already gone; return the exit code
    and everything written to the other stream."""
    read, write = os.pipe()
    os.close(read)
    other = subprocess.PIPE
    try:
        out = subprocess.run(
            [HFBUILD, *args],
            cwd=repo.path,
            stdout=write if stream == "stdout" else other,
            stderr=write if stream == "stderr" else other,
            text=True,
            check=False,
            env={**os.environ, "CALL_LOG": os.devnull},
        )
    finally:
        os.close(write)
    return out.returncode, out.stderr if stream == "stdout" else out.stdout


def test_output_into_a_closed_pipe_is_no_error(built: Repo) -> None:
    """`status`, `status --json`, `explain` and `du` writing into a pipe nobody reads any
    more stop silently with 141 (128 + SIGPIPE), as standard CLIs do; so does `verify`
    writing its problems into a closed stderr. A real `| head -1` shows no error either."""
    for args in (("status",), ("status", "--json"), ("explain", "feat"), ("du",)):
        assert into_closed_pipe(built, *args) == (141, ""), args
    (built.path / "pkg/text.py").write_text("def lens(batch, scale=1):\n    return {}\n")
    assert into_closed_pipe(built, "verify", stream="stderr") == (141, "")

    out = subprocess.run(
        f"'{HFBUILD}' status --json | head -1",
        shell=True,
        cwd=built.path,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "CALL_LOG": os.devnull},
    )
    assert (out.stdout, out.stderr) == ("[\n", "")


def test_status_marks_stages_using_uncommitted_code(built: Repo, tmp_path: pathlib.Path) -> None:
    """A stage whose closure has uncommitted changes is marked in plain `status` with the
    words `explain` uses, stale or built, and a closing line says what to do about it."""
    text = built.path / "pkg/text.py"
    text.write_text(text.read_text() + "\n# an uncommitted comment\n")
    mark = "(from uncommitted changes: pkg/text.py (modified))"
    lines = run_hfbuild(built, "status").stdout.splitlines()
    (lens,) = [ln for ln in lines if ln.startswith("lens")]
    assert lens.startswith(f"lens   stale {mark}: code file pkg/text.py changed: ")
    assert f"stage 'lens' is stale {mark}" in run_hfbuild(built, "explain", "lens").stdout
    assert [ln for ln in lines if ln.startswith("feat")] == ["feat   up to date"]

    doit(built, "run", "preprocess", log=tmp_path / "calls.log")
    out = run_hfbuild(built, "status")
    assert out.returncode == 1
    assert f"lens   up to date {mark}" in out.stdout.splitlines()
    assert "use files that are not committed: commit them" in out.stdout
    assert f"stage 'lens' is up to date {mark}" in run_hfbuild(built, "explain", "lens").stdout
