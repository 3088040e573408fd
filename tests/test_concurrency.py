"""Several builders on one store: every stage built once, nobody fails, nobody waits forever."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

from tests.helpers import Repo, run_hfbuild
from tests.pipeline_project import calls, doit, expected, make_project, results

EACH_ONCE = {"feat": 1, "keep": 1, "split": 1, "lens": 1}


def start(repo: Repo, log: pathlib.Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "doit", *args],
        cwd=repo.path,
        env={**os.environ, "CALL_LOG": str(log), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_four_builders_of_one_pipeline(repo: Repo, tmp_path: pathlib.Path) -> None:
    """Four `doit run preprocess` at once on a cold store: all succeed, each stage is built
    once between them, the results are the uncached ones, and a later run builds nothing."""
    make_project(repo)
    log = tmp_path / "calls.log"
    procs = [start(repo, log, "run", "preprocess") for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert calls(log) == EACH_ONCE
    assert results(repo)["kept"] == expected()["kept"]
    doit(repo, "run", "preprocess", log=log)
    assert calls(log) == EACH_ONCE


def test_two_pipelines_sharing_stages(repo: Repo, tmp_path: pathlib.Path) -> None:
    """Two different pipelines whose first stages are identical, built at once on one store:
    the shared stages are built once, each pipeline's own stage once, both succeed, and each
    keeps its own lock file."""
    make_project(repo)
    repo.write(
        {
            "pkg/other.py": """
            from pkg.log import log

            def triple(batch):
                log("triple")
                return {"t": [3 * y for y in batch["y"]]}
            """,
            "dodo2.py": """
            from hfbuild import Pipeline
            from pkg import other, transforms

            pipe = Pipeline(lock="other.lock")
            raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
            feat = pipe.map("feat", raw, transforms.feat, {"k": 2}, batched=True)
            tri = pipe.map("tri", feat, other.triple, batched=True)


            def task_preprocess():
                yield from pipe.tasks()
            """,
        },
        commit="second pipeline",
    )
    log = tmp_path / "calls.log"
    a = start(repo, log, "run", "preprocess")
    b = start(repo, log, "run", "-f", "dodo2.py", "--db-file", ".doit2.db", "preprocess")
    outs = [p.communicate(timeout=300) for p in (a, b)]
    assert (a.returncode, b.returncode) == (0, 0), outs
    assert calls(log) == {**EACH_ONCE, "triple": 1}
    assert (repo.path / "hfbuild.lock").exists() and (repo.path / "other.lock").exists()
    # Each pipeline's commands read its own lock, from the work tree and from git.
    repo.commit("locks")
    for dodo in ("dodo.py", "dodo2.py"):
        for check in (["verify"], ["verify", "--staged"], ["gc", "--keep-days", "0"]):
            out = run_hfbuild(repo, "--dodo", dodo, *check)
            assert out.returncode == 0, (dodo, check, out.stderr)
    assert run_hfbuild(repo, "--dodo", "dodo2.py", "status").returncode == 0
    code = textwrap.dedent("""
        import json, dodo2
        print(json.dumps(list(dodo2.pipe.result("tri")["t"])))
    """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo.path,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "CALL_LOG": str(log)},
    )
    assert json.loads(out.stdout) == [3 * y for y in expected()["feat"]]


def test_lock_of_a_killed_builder_does_not_block(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A builder killed while holding a stage's lock (inside its transform) does not block
    the next one: the OS releases the lock with the process."""
    make_project(repo)
    log = tmp_path / "calls.log"
    killed = start(repo, log, "run", "preprocess", KILL_IN="keep")
    killed.communicate(timeout=300)
    assert killed.returncode == -9
    after = start(repo, log, "run", "preprocess")
    after.communicate(timeout=120)
    assert after.returncode == 0
    assert results(repo)["kept"] == expected()["kept"]
