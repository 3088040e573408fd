"""The fault run at CI size, in `make test` (`make stress` runs the long random ones): a
sharded build killed by SIGKILL at named points, each round after a data file is appended,
then built to completion. Every point must really kill (counted, by label), each shard is
built exactly once per completed build (its transform's calls counted per shard, not
compared as sets), and the end state equals a full build in a fresh store."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
from collections import Counter

from tests.helpers import Repo
from tests.pipeline_project import doit
from tests.shard_project import make_project, state, write_part

KILLER = str(pathlib.Path(__file__).resolve().parent / "killer.py")
ROWS = 10  # write_part's rows per file

# (target, nth call, before/after), or ("KILL_IN", "stage:file" of this round's file, "").
POINTS = [
    ("hfbuild.store.store:Store.publish", 1, "after"),  # the new file's load shard published
    ("KILL_IN", "feat", ""),  # inside the transform, mid-shard
    ("datasets.arrow_writer:ArrowWriter.finalize", 2, "before"),
    ("hfbuild.store.store:Store.publish", 3, "before"),
    ("KILL_IN", "keep", ""),
    ("hfbuild.store.lockfile:update", 1, "before"),
]


def _calls(log: pathlib.Path) -> Counter[str]:
    return Counter(log.read_text().split()) if log.exists() else Counter()


def _killed(repo: Repo, log: pathlib.Path, point: tuple[str, object, str], name: str) -> int:
    target, nth, when = point
    env = {**os.environ, "CALL_LOG": str(log)}
    if target == "KILL_IN":
        cmd = [sys.executable, "-m", "doit", "run", "preprocess"]
        env["KILL_IN"] = f"{nth}:{name}"
    else:
        cmd = [sys.executable, KILLER, target, str(nth), when, "run", "preprocess"]
    out = subprocess.run(cmd, cwd=repo.path, env=env, capture_output=True, check=False)
    return out.returncode


def test_kills_at_named_points_each_shard_built_once(tmp_path: pathlib.Path) -> None:
    repo = make_project(Repo.init(tmp_path / "repo"), parts=3)
    cold = tmp_path / "cold.log"
    doit(repo, "run", "preprocess", log=cold)
    parts = [f"part-{i}" for i in range(3)]
    want = Counter({f"{s}:{p}": ROWS for s in ("feat", "idx", "keep") for p in parts})
    want["total:all"] = 1
    assert _calls(cold) == want  # each shard's transform once per row: built once

    kills: Counter[str] = Counter()
    for r, point in enumerate(POINTS):
        name = f"z{r:02d}"  # sorts after every earlier file: earlier shards keep their keys
        write_part(repo, name, 1000 * (r + 1))
        repo.commit(f"round {r}: {name}")
        killed, done = tmp_path / f"killed-{r}.log", tmp_path / f"done-{r}.log"
        label = f"{point[0].split(':')[-1]}:{point[1]}:{point[2]}".rstrip(":")
        if _killed(repo, killed, point, name) == -signal.SIGKILL:
            kills[label] += 1
        doit(repo, "run", "preprocess", log=done)
        got = _calls(done)
        # Nothing of an earlier file is built again; the new file's shards are each built
        # whole, once, by whichever run published them (never by both, never in part).
        assert {k for k in got if not k.endswith(name) and k != "total:all"} == set(), got
        before = _calls(killed)
        for stage in ("feat", "idx", "keep"):
            n, k = got[f"{stage}:{name}"], before[f"{stage}:{name}"]
            # Built by the completed run, or published whole by the killed one.
            assert (n, k) in {(ROWS, j) for j in range(ROWS + 1)} | {(0, ROWS)}, (label, n, k)
        assert got["total:all"] <= 1
    assert sum(kills.values()) == len(POINTS), kills  # every point really killed the build
    assert set(kills) == {f"{t.split(':')[-1]}:{n}:{w}".rstrip(":") for t, n, w in POINTS}

    fresh = {"HFBUILD_STORE": str(tmp_path / "fresh")}
    doit(repo, "run", "preprocess", log=tmp_path / "fresh.log", env=fresh)
    assert state(repo) == state(repo, fresh)
