"""SIGKILL a cold `doit run preprocess` at many precise moments, then rerun.

Each point kills the build right before or after the Nth call of a function in one phase:
loading, mapping (inside the user's transform), writing, or publishing. After the kill no
entry the store would serve may be incomplete; a rerun must complete with the uncached
results; and `hfbuild gc` must leave no leftover build directory."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
from typing import Any

import pytest

from tests.helpers import Repo, read_python, run_hfbuild
from tests.pipeline_project import doit, expected, make_project, results

KILLER = str(pathlib.Path(__file__).resolve().parent / "killer.py")

# (phase, target, nth call, before/after). Every point is reached in a cold build of the
# test project (the test asserts the process really died by SIGKILL).
POINTS = [
    ("load", "datasets:load_dataset", 1, "before"),
    ("load", "datasets:load_dataset", 1, "after"),
    ("load", "datasets:load_from_disk", 1, "before"),
    ("load", "datasets:load_from_disk", 2, "after"),
    ("load", "datasets:load_from_disk", 4, "before"),
    ("load", "datasets:load_from_disk", 4, "after"),
    ("map", "KILL_IN", "feat", ""),
    ("map", "KILL_IN", "keep", ""),
    ("map", "KILL_IN", "split", ""),
    ("map", "KILL_IN", "lens", ""),
    ("map", "datasets.arrow_dataset:Dataset.map", 1, "after"),
    ("map", "datasets.arrow_dataset:Dataset.filter", 1, "after"),
    ("write", "datasets.arrow_writer:ArrowWriter.write_batch", 1, "before"),
    ("write", "datasets.arrow_writer:ArrowWriter.write_batch", 1, "after"),
    ("write", "datasets.arrow_writer:ArrowWriter.finalize", 1, "after"),
    ("write", "datasets.arrow_writer:ArrowWriter.finalize", 2, "before"),
    ("write", "datasets.arrow_writer:ArrowWriter.finalize", 3, "after"),
    ("write", "hfbuild.store.indexed:write", 1, "before"),  # a filter's indices over its input
    ("write", "hfbuild.store.indexed:write", 2, "after"),
    ("write", "hfbuild.builds.builder:_save_dataset", 1, "after"),
    ("write", "hfbuild.builds.builder:_reload", 3, "after"),  # what was written, read back
    ("write", "hfbuild.builds.builder:dataset_hash", 1, "before"),
    ("write", "hfbuild.builds.builder:dataset_hash", 3, "after"),
    ("publish", "hfbuild.store.sharing:write_text_atomic", 1, "before"),
    ("publish", "hfbuild.store.sharing:write_text_atomic", 2, "after"),
    ("publish", "hfbuild.store.store:Store.publish", 1, "after"),
    ("publish", "hfbuild.store.store:Store.publish", 3, "before"),
    ("publish", "os:rename", 1, "after"),
    ("publish", "os:rename", 2, "before"),
    ("publish", "os:rename", 4, "after"),
    ("publish", "os:replace", 1, "before"),
    ("publish", "os:replace", 3, "after"),
    ("publish", "os:replace", 6, "before"),
    ("publish", "hfbuild.store.store:Store.set_ref", 2, "before"),
    ("publish", "hfbuild.store.lockfile:update", 1, "before"),
    ("publish", "hfbuild.store.lockfile:update", 3, "after"),
    ("publish", "hfbuild.store.store:Store.publish", 5, "after"),
]

CHECK_STORE = """
import dodo
from hfbuild.store.content import dataset_hash
s = dodo.pipe.store
served = 0
for fp in s.fingerprints():
    if s.has(fp):
        doc = s.read_manifest(fp)
        got = dataset_hash(s.load(fp))
        assert got == doc["content_hash"], (fp, "served but incomplete")
        served += 1
print(served)
"""


def kill_build(repo: Repo, log: pathlib.Path, target: str, nth: object, when: str) -> int:
    env = {**os.environ, "CALL_LOG": str(log)}
    if target == "KILL_IN":
        cmd = [sys.executable, "-m", "doit", "run", "preprocess"]
        env["KILL_IN"] = str(nth)
    else:
        cmd = [sys.executable, KILLER, target, str(nth), when, "run", "preprocess"]
    return subprocess.run(
        cmd, cwd=repo.path, env=env, capture_output=True, check=False, timeout=300
    ).returncode


# The points `make test` kills at: one or two in each phase (a load, the user's transform,
# datasets' writer and our indices, a manifest's write and an entry's rename). The others are
# the long fault run `make stress` adds (37 fresh builds, each killed, checked, rebuilt and
# collected, were a tenth of `make test`'s time, over its 15-minute budget).
MAKE_TEST_POINTS = {
    "load-load_dataset-1-after",
    "map-KILL_IN-feat",
    "write-ArrowWriter.finalize-1-after",
    "write-write-1-before",
    "publish-write_text_atomic-1-before",
    "publish-replace-3-after",
}


def _point_id(phase: str, target: str, nth: object, when: str) -> str:
    return f"{phase}-{target.split(':')[-1]}-{nth}-{when}".rstrip("-")


def _points() -> list[Any]:
    ids = [_point_id(*p) for p in POINTS]
    assert set(ids) >= MAKE_TEST_POINTS, MAKE_TEST_POINTS - set(ids)
    return [
        pytest.param(*p, id=i, marks=() if i in MAKE_TEST_POINTS else pytest.mark.stress)
        for p, i in zip(POINTS, ids, strict=True)
    ]


@pytest.mark.parametrize(("phase", "target", "nth", "when"), _points())
def test_killed_build_recovers(
    repo: Repo, tmp_path: pathlib.Path, phase: str, target: str, nth: object, when: str
) -> None:
    """After a SIGKILL at this point, nothing incomplete is served, the rerun completes with
    the uncached results, and gc leaves no leftover."""
    make_project(repo)
    log = tmp_path / "calls.log"
    assert kill_build(repo, log, target, nth, when) == -signal.SIGKILL
    read_python(CHECK_STORE, repo.path, env={"CALL_LOG": str(log)})  # fails on an error
    doit(repo, "run", "preprocess", log=log)
    got, exp = results(repo), expected()
    assert got["feat"] == exp["feat"] and got["kept"] == exp["kept"]
    assert got["lens"] == exp["lens"]
    assert sorted(got["split"]["train"] + got["split"]["test"]) == sorted(exp["kept"])
    gc = run_hfbuild(repo, "gc", "--keep-days", "0")
    assert gc.returncode == 0, gc.stderr
    assert list((repo.path / ".hfbuild" / "tmp").iterdir()) == []
