"""Long fault runs for `make stress` (skipped otherwise): kills at random moments, random
damage to stored entries, and code edits, all on one store, checking the results each time.

STRESS_RUNS sets the number of rounds (default 60), STRESS_SHARD_RUNS those over a sharded
pipeline (default 20); the summary lines are what docs/reliability.md records."""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import Repo, run_hfbuild
from tests.pipeline_project import doit, make_project, results

pytestmark = pytest.mark.stress


def _damage(rng: random.Random, store: pathlib.Path) -> str | None:
    entries = [p for p in (store / "objects").glob("*/*") if p.is_dir()]
    if not entries:
        return None
    e = rng.choice(entries)
    arrows = sorted(e.rglob("*.arrow"))
    kind = rng.choice(["truncate", "flip", "delete", "manifest"])
    if kind == "manifest" or not arrows:
        m = e / "manifest.json"
        doc = json.loads(m.read_text())
        doc["rows"] = -1
        m.write_text(json.dumps(doc))
        return "manifest"
    f = rng.choice(arrows)
    data = bytearray(f.read_bytes())
    if kind == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    elif kind == "delete":
        f.unlink()
    else:
        data[rng.randrange(len(data) // 2, len(data))] ^= 0xFF
        f.write_bytes(bytes(data))
    return kind


def _build_killed_after(repo: Repo, env: dict[str, str], seconds: float) -> int:
    """Start `doit run preprocess` and SIGKILL it after `seconds`: 1 if it was still
    running then, else 0 (it had finished)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "doit", "run", "preprocess"],
        cwd=repo.path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(seconds)
    running = p.poll() is None
    if running:
        p.send_signal(signal.SIGKILL)
    p.wait()
    return int(running)


def test_random_kills_damage_and_edits(repo: Repo, tmp_path: pathlib.Path) -> None:
    """Rounds of: maybe edit a helper, maybe damage a stored entry (then `verify --deep`),
    start a build and SIGKILL it at a random moment, then build to completion and compare
    every result with the uncached computation. No round may give a wrong result."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(int(os.environ.get("STRESS_SEED", "0")))
    rounds = int(os.environ.get("STRESS_RUNS", "60"))
    make_project(repo)
    n = 30_000
    pq.write_table(
        pa.table({"x": list(range(n)), "text": [f"r{i}" * 3 for i in range(n)]}),
        repo.path / "data" / "part-0.parquet",
    )
    repo.commit("bigger")
    log = tmp_path / "calls.log"
    env = {**os.environ, "CALL_LOG": str(log)}
    t0 = time.perf_counter()
    doit(repo, "run", "preprocess", log=log)
    cold = time.perf_counter() - t0
    stats = {"rounds": 0, "kills": 0, "damaged": 0, "wrong": 0, "failed_runs": 0}
    problems: list[str] = []
    offset = 0
    for _ in range(rounds):
        stats["rounds"] += 1
        if rng.random() < 0.5:
            offset = rng.randrange(4)
            (repo.path / "pkg/util/deep.py").write_text(
                f"OFFSET = {offset}\n\ndef offset():\n    return OFFSET\n"
            )
        damage = _damage(rng, repo.path / ".hfbuild") if rng.random() < 0.3 else None
        if damage:
            stats["damaged"] += 1
            run_hfbuild(repo, "verify", "--deep", "-q")
        stats["kills"] += _build_killed_after(repo, env, rng.uniform(0.0, cold))
        out = doit(repo, "run", "preprocess", log=log, check=False)
        if out.returncode != 0:
            stats["failed_runs"] += 1
            problems.append(
                f"round {stats['rounds']} (damage={damage}) failed:\n"
                f"{out.stdout[-1500:]}\n{out.stderr[-2500:]}"
            )
            continue
        got = results(repo)
        ys = [(x + offset) * 2 for x in range(n)]
        lens = [len(f"r{i}" * 3) for i in range(n)]
        if (
            got["feat"] != ys
            or got["kept"] != [y for y in ys if y % 3 != 0]
            or (got["lens"] != lens)
        ):
            stats["wrong"] += 1
            kept = [y for y in ys if y % 3 != 0]
            bad = [
                k for k, want in (("feat", ys), ("kept", kept), ("lens", lens)) if got[k] != want
            ]
            problems.append(f"round {stats['rounds']} (damage={damage}) wrong: {bad}")
    print(f"\nSTRESS SUMMARY {json.dumps(stats)} cold_build_s={cold:.2f}")
    for p in problems[:10]:
        print(p)
    assert stats["wrong"] == 0 and stats["failed_runs"] == 0, stats
    assert stats["kills"] > 0, stats  # some rounds really killed a build


def test_random_kills_damage_and_data_edits_in_a_sharded_build(tmp_path: pathlib.Path) -> None:
    """Rounds over a sharded pipeline (load -> map -> with_indices map -> filter -> apply):
    maybe append, change or delete a data file, maybe damage a stored entry (then `verify
    --deep`), start a build and SIGKILL it at a random moment, then build to completion. Every
    round's results (fingerprints, content hashes, rows) equal a full build of the same tree
    in a fresh store."""
    from tests.shard_project import make_project as make_shard_project
    from tests.shard_project import state, write_part

    rng = random.Random(int(os.environ.get("STRESS_SEED", "0")))
    rounds = int(os.environ.get("STRESS_SHARD_RUNS", "20"))
    repo = make_shard_project(Repo.init(tmp_path / "repo"), parts=6)
    log = tmp_path / "calls.log"
    env = {**os.environ, "CALL_LOG": str(log)}
    t0 = time.perf_counter()
    doit(repo, "run", "preprocess", log=log)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    doit(repo, "run", "preprocess", log=log)
    start = time.perf_counter() - t0  # a no-op: the process's start-up, before any build
    stats = {"rounds": 0, "kills": 0, "damaged": 0, "edits": 0, "wrong": 0, "failed_runs": 0}
    stats["cold_rounds"] = 0
    problems: list[str] = []
    names = [f"part-{i}" for i in range(6)]
    for r in range(rounds):
        stats["rounds"] += 1
        edit = rng.choice(["append", "change", "delete", None])
        if edit == "append" or (edit == "delete" and len(names) <= 2):
            names.append(f"part-{len(names) + r}")
            write_part(repo, names[-1], 1000 * (r + 1))
        elif edit == "change":
            write_part(repo, rng.choice(names), rng.randrange(10_000), rows=rng.randrange(3, 15))
        elif edit == "delete":
            gone = names.pop(rng.randrange(len(names)))
            (repo.path / "data" / f"{gone}.parquet").unlink()
        if edit is not None:
            stats["edits"] += 1
            repo.commit(f"round {r}: {edit}")
        damage = _damage(rng, repo.path / ".hfbuild") if rng.random() < 0.3 else None
        if damage:
            stats["damaged"] += 1
            run_hfbuild(repo, "verify", "--deep", "-q")
        if rng.random() < 0.3:  # a cold build: the store moved aside (kept for the end)
            stats["cold_rounds"] += 1
            (repo.path / ".hfbuild").rename(tmp_path / f"aside-{r}")
        # After start-up, while it may build.
        stats["kills"] += _build_killed_after(repo, env, rng.uniform(0.8 * start, cold))
        out = doit(repo, "run", "preprocess", log=log, check=False)
        if out.returncode != 0:
            stats["failed_runs"] += 1
            problems.append(f"round {r} ({edit}, {damage}) failed:\n{out.stderr[-2500:]}")
            continue
        fresh_env = {"HFBUILD_STORE": str(tmp_path / f"fresh-{r}")}
        doit(repo, "run", "preprocess", log=log, env=fresh_env)
        if state(repo) != state(repo, fresh_env):
            stats["wrong"] += 1
            problems.append(f"round {r} ({edit}, {damage}): differs from a fresh build")
    print(f"\nSHARDED STRESS SUMMARY {json.dumps(stats)} cold_build_s={cold:.2f}")
    for p in problems[:10]:
        print(p)
    assert stats["wrong"] == 0 and stats["failed_runs"] == 0, stats
    assert stats["kills"] > 0, stats  # some rounds really killed a build
