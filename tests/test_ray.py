"""Building on a real Ray cluster on loopback (a head and a second node, 1 CPU each), sharing
results through a real S3 server (moto) as the remote cache: the cluster and server of
tests/raycluster.py, shared by the tests that follow each other (its `cluster` and `remote`
fixtures, which conftest.py provides to every module: take them to add a test)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import pytest

from tests.helpers import Repo, run_hfbuild
from tests.pipeline_project import calls, doit, expected, make_project, results
from tests.raycluster import NODE_TMPDIRS, free_port
from tests.test_remote import outage, s3_requests

STAGES = ("raw", "feat", "kept", "split", "lens")
RAY_ENV = {"HFBUILD_EXECUTOR": "ray"}


ROW_LOCAL = {
    # The project's transforms one row at a time: a batched stage is built whole (its
    # batches are cut at datasets' global offsets), a row-local one file by file.
    "pkg/transforms.py": """
        from pkg.log import log
        from pkg.util.mid import shift

        def feat(row, k=1):
            log("feat")
            return {"y": shift(row["x"]) * k}

        def keep(row, m=3):
            log("keep")
            return row["y"] % m != 0

        def split(ds, seed=0):
            log("split")
            return ds.train_test_split(test_size=0.25, seed=seed)
        """,
    "pkg/text.py": """
        from pkg.log import log

        def lens(row, scale=1):
            log("lens")
            return {"n": len(row["text"]) * scale}
        """,
}


def _row_local(repo: Repo) -> None:
    """The project with row-local (sharded) transforms."""
    dodo = (repo.path / "dodo.py").read_text().replace(", batched=True)", ")")
    repo.write({**ROW_LOCAL, "dodo.py": dodo}, commit="row-local transforms")


def _add_part(repo: Repo, i: int) -> None:
    """Commit data/part-<i>.parquet: 20 rows continuing part-0's 40."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    xs = list(range(40 + 20 * (i - 1), 40 + 20 * i))
    table = pa.table({"x": xs, "text": [f"row {'y' * (x % 7)}" for x in xs]})
    pq.write_table(table, repo.path / "data" / f"part-{i}.parquet")
    repo.commit(f"part {i}")


def _lock(repo: Repo) -> dict[str, Any]:
    stages: dict[str, Any] = json.loads((repo.path / "hfbuild.lock").read_text())["stages"]
    return {s: (e["fingerprint"], e["content_hash"]) for s, e in stages.items()}


def _remote_entries(url: str) -> dict[str, list[str]]:
    """Each remote fingerprint with the names under its entry directory."""
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=os.environ["FSSPEC_S3_ENDPOINT_URL"], key="testing", secret="testing"
    )
    base = url.removeprefix("s3://")
    out: dict[str, list[str]] = {}
    for path in fs.find(f"{base}/objects", withdirs=False):
        fp = path.split("/objects/")[1].split("/")[1]
        top = path.split(f"/{fp}/")[1].split("/")[0]
        out.setdefault(fp, [])
        if top not in out[fp]:
            out[fp].append(top)
    return {fp: sorted(v) for fp, v in out.items()}


DEEP_CHECK = """
import sys
from hfbuild.store.remote import Remote
from hfbuild.store.store import Store
remote, store = Remote(sys.argv[1]), Store(sys.argv[2])
published = sys.argv[3:sys.argv.index("--")]
for fp in published:
    # An entry pulled already as another's reference (a filter's base) was checked then. A
    # list of shards pulled after its shards brings no bytes: `pull` returns 0 for it.
    if not store.has(fp):
        remote.pull(store, fp, fp)  # a failing check raises
    assert store.has(fp), fp
for fp in sys.argv[sys.argv.index("--") + 1:]:  # an upload without its manifest: never served
    assert remote.pull(store, fp, fp) == 0 and not store.has(fp), fp
print(len(published))
"""


def _deep_check(url: str, tmp: pathlib.Path) -> int:
    """Pull every published remote entry into a fresh store in a fresh process: each
    download is checked (sizes, then the full content hash) as `verify --deep` checks a
    store; a failing one raises. An upload without its manifest (cut short) must not be
    served. Returns how many were checked."""
    entries = _remote_entries(url)
    done = [fp for fp, names in entries.items() if "manifest.json" in names]
    cut = [fp for fp in entries if fp not in done]
    out = subprocess.run(
        [sys.executable, "-c", DEEP_CHECK, url, str(tmp), *done, "--", *cut],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def _clones_agree(repo: Repo, first: Repo, tmp_path: pathlib.Path) -> Repo:
    """After `first` built through Ray and pushed: a second clone with the local executor
    builds nothing (its 5 stages pulled), and a clone building locally without the remote
    records the same lock as both; that local clone."""
    second = repo.clone(tmp_path / "second")
    log2 = tmp_path / "second.log"
    out2 = doit(second, "run", "preprocess", log=log2)
    assert calls(log2) == {}
    assert out2.stdout.count("pulled") == 5

    local = repo.clone(tmp_path / "local")
    doit(local, "run", "preprocess", log=tmp_path / "local.log", env={"HFBUILD_NO_REMOTE": "1"})
    assert _lock(first) == _lock(second) == _lock(local)
    return local


def test_ray_build_is_reused_by_a_local_clone(
    repo: Repo, tmp_path: pathlib.Path, remote: str
) -> None:
    """A clean clone builds every stage through Ray (progress shown per stage); a second
    clone with the local executor builds nothing (all pulled from the remote); keys and
    content hashes equal those of a local build in a fresh store without the remote."""
    make_project(repo)
    first = repo.clone(tmp_path / "first")
    log = tmp_path / "first.log"
    out = doit(first, "run", "preprocess", log=log, env=RAY_ENV)
    assert calls(log) == {"feat": 1, "keep": 1, "split": 1, "lens": 1}
    assert out.stdout.count(": built ") == 5
    for stage in STAGES:
        assert f"{stage}: 1/1 units built on ray" in out.stderr
    entries = _remote_entries(remote)
    assert len(entries) == 5 and all(len(v) == 2 for v in entries.values())  # data-*, manifest

    _clones_agree(repo, first, tmp_path)
    got = results(first)
    assert got["kept"] == expected()["kept"] and got["lens"] == expected()["lens"]


RACE = {
    # feat records each row it maps with the Ray job (the driver) that built it; with BARRIER
    # set, the first call of each job writes <job>.job (its pid and TMPDIR) and waits for
    # BARRIER/go: two jobs there at once are two drivers' tasks running at once, one per
    # node (1 CPU each); the other tasks of a job pass (a job's waiting task holds one CPU).
    "pkg/transforms.py": ROW_LOCAL["pkg/transforms.py"].replace(
        """
        def feat(row, k=1):
            log("feat")
""",
        """
        def _job():
            import ray

            return ray.get_runtime_context().get_job_id() if ray.is_initialized() else "here"


        def _barrier(job):
            import os, tempfile, time

            here = os.environ.get("BARRIER", "")
            if not here:
                return
            mine = os.path.join(here, f"{os.getpid()}.tmp")
            with open(mine, "w") as f:
                f.write(f"{os.getpid()} {tempfile.gettempdir()}")
            try:
                os.link(mine, os.path.join(here, f"{job}.job"))  # one waits per job
            except FileExistsError:
                return
            while not os.path.exists(os.path.join(here, "go")):
                time.sleep(0.05)


        def feat(row, k=1):
            import os

            log("feat")
            job = _job()
            _barrier(job)
            with open(os.environ["RACE_LOG"], "a") as f:
                f.write(f"{row['x']} {job}\\n")
""",
    ),
    "pyproject.toml": (
        '[tool.hfbuild]\nuntracked-env = ["CALL_LOG", "KILL_IN", "BARRIER", "RACE_LOG"]\n'
    ),
}


def test_two_drivers_racing_publish_each_entry_once(
    repo: Repo, tmp_path: pathlib.Path, remote: str
) -> None:
    """Two drivers build the same sharded pipeline through Ray, their feat tasks held at a
    barrier until one of each driver runs (on two nodes, neither a driver). Both succeed
    with identical locks; every remote entry (each pack of shards, each shard of its own,
    each stage's list of shards, the whole-dataset stage) has one manifest and at most one
    data directory (the first writer wins, a loser's copy is deleted), and passes the full
    content check; every shard the locks record is there, in a pack or as an entry of its
    own. What is claimed of builds, from the rows the transform records with the driver
    that built them: every shard is built, by each driver at most once; a shard both
    drivers found missing is built by both (a driver asks the remote before it submits, not
    as each shard starts) and published once."""
    make_project(repo)
    _row_local(repo)
    for i in (1, 2):
        _add_part(repo, i)
    log_py = (repo.path / "pkg" / "log.py").read_text()  # keys of its own: stores outlive tests
    repo.write({**RACE, "pkg/log.py": log_py + f"# {uuid.uuid4().hex}\n"}, commit="race")
    clones = [repo.clone(tmp_path / f"c{i}") for i in range(2)]
    barrier, rows = tmp_path / "barrier", tmp_path / "rows.log"
    barrier.mkdir()
    env = {**os.environ, "CALL_LOG": str(tmp_path / "calls.log"), **RAY_ENV}
    env |= {"BARRIER": str(barrier), "RACE_LOG": str(rows)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "doit", "run", "preprocess"],
            cwd=c.path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in clones
    ]
    held = _waiting(barrier, procs, 2, "*.job")
    pids = {int(v.split()[0]) for v in held.values()}
    assert len(pids) == 2 and not pids & {p.pid for p in procs}  # two workers, no driver
    assert len({v.split()[1] for v in held.values()}) == 2  # on two nodes
    (barrier / "go").touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o + e for o, e in outs)
    assert _lock(clones[0]) == _lock(clones[1])
    entries = _remote_entries(remote)
    lists = [names for names in entries.values() if names == ["manifest.json"]]
    assert len(lists) == 4  # a list of shards has no data of its own
    for names in entries.values():
        if names != ["manifest.json"]:
            assert len(names) == 2 and names[0].startswith("data-") and names[1] == "manifest.json"
    stages = json.loads((clones[0].path / "hfbuild.lock").read_text())["stages"]
    shards = {k for e in stages.values() for k in e.get("shard_hashes") or {}}
    assert len(shards) == 4 * 3
    assert shards <= set(entries) | set(_remote_packs(remote))
    assert _deep_check(remote, tmp_path / "check") == len(entries)

    built: dict[tuple[int, str], int] = {}  # (part, job) -> rows mapped
    for line in rows.read_text().splitlines():
        x, job = line.split()
        part = 0 if int(x) < 40 else (int(x) - 40) // 20 + 1
        built[part, job] = built.get((part, job), 0) + 1
    assert set(built.values()) <= {40, 20} and set(held) == {job for _, job in built}
    for (part, _), n in built.items():
        assert n == (40 if part == 0 else 20)  # each driver built a shard at most once
    assert {part for part, _ in built} == {0, 1, 2}  # every shard built
    assert len(built) > 3  # the shards held at the barrier were built by both drivers


KILL_ONCE_LOG = """
import os

def log(stage):
    marker = os.environ.get("KILL_ONCE", "")
    if marker.startswith(stage + ":") and not os.path.exists(marker.split(":", 1)[1]):
        open(marker.split(":", 1)[1], "w").close()  # the retry finds it and lives
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    with open(os.environ["CALL_LOG"], "a") as f:
        f.write(stage + "\\n")
"""


def test_worker_killed_mid_task_is_retried(repo: Repo, tmp_path: pathlib.Path, remote: str) -> None:
    """A Ray worker SIGKILLed inside a transform is retried by Ray: the build completes with
    the right results, and every remote entry passes the full content check."""
    make_project(repo)
    repo.write(
        {
            "pkg/log.py": KILL_ONCE_LOG,
            "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG", "KILL_ONCE"]\n',
        },
        commit="kill once",
    )
    clone = repo.clone(tmp_path / "clone")
    log = tmp_path / "calls.log"
    marker = tmp_path / "killed"
    env = {**RAY_ENV, "KILL_ONCE": f"feat:{marker}"}
    doit(clone, "run", "preprocess", log=log, env=env)
    assert marker.exists()  # the first attempt died
    assert calls(log)["feat"] == 1  # the second one finished (the first died before logging)
    got = results(clone)
    assert got["feat"] == expected()["feat"] and got["kept"] == expected()["kept"]
    assert _deep_check(remote, tmp_path / "check") == 5


BAD = {
    "pkg/bad.py": """
        def helper(x):
            return 1 // (x - x)

        def boom(batch):
            return {"z": [helper(x) for x in batch["x"]]}
        """,
    "dodo.py": """
        from hfbuild import Pipeline
        from pkg import bad

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        pipe.map("bad", raw, bad.boom, batched=True)


        def task_preprocess():
            yield from pipe.tasks()
        """,
}


def _failure(out: subprocess.CompletedProcess[str]) -> str:
    """The message doit printed for the failed task."""
    text = out.stdout + out.stderr
    start = text.index("stage 'bad' failed")
    return text[start : text.index("run the build again.", start)]


def test_failing_transform_fails_with_the_users_traceback(
    repo: Repo, tmp_path: pathlib.Path, remote: str
) -> None:
    """A transform raising on a Ray worker fails the stage with the same message as a local
    build: the exception and the traceback lines in the project's own files, named by the
    driver's paths; nothing is published for it."""
    make_project(repo)
    repo.write(BAD, commit="bad stage")
    clone = repo.clone(tmp_path / "clone")
    log = tmp_path / "calls.log"
    local = doit(clone, "run", "preprocess", log=log, check=False, env={"HFBUILD_NO_REMOTE": "1"})
    on_ray = doit(clone, "run", "preprocess", log=log, check=False, env=RAY_ENV)
    assert local.returncode != 0 and on_ray.returncode != 0
    message = _failure(on_ray)
    assert message == _failure(local)
    assert "ZeroDivisionError: integer division or modulo by zero" in message
    assert f'File "{clone.path}/pkg/bad.py", line 3, in helper' in message
    assert len(_remote_entries(remote)) == 1  # raw only (pushed for the worker to read)


SLOW = {
    "pkg/slow.py": """
        import os, time

        def nap(batch):
            with open(os.environ["NAP_PID"], "w") as f:
                f.write(str(os.getpid()))
            time.sleep(120)
            return batch
        """,
    "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG", "KILL_IN", "NAP_PID"]\n',
    "dodo.py": """
        from hfbuild import Pipeline
        from pkg import slow

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        pipe.map("nap", raw, slow.nap, batched=True)


        def task_preprocess():
            yield from pipe.tasks()
        """,
}


def test_ctrl_c_on_the_driver_cancels_its_tasks(
    repo: Repo, tmp_path: pathlib.Path, remote: str
) -> None:
    """SIGINT to a driver waiting on the cluster stops it promptly, in one line and exit 130,
    and kills the worker running its task; nothing is published for the stage."""
    make_project(repo)
    repo.write(SLOW, commit="slow stage")
    clone = repo.clone(tmp_path / "clone")
    pid_file = tmp_path / "nap.pid"
    env = {**os.environ, "CALL_LOG": str(tmp_path / "c.log"), "NAP_PID": str(pid_file), **RAY_ENV}
    proc = subprocess.Popen(
        [sys.executable, "-m", "doit", "run", "preprocess"],
        cwd=clone.path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    worker = int(pid_file.read_text())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "hfbuild: interrupted (stage 'nap'); nothing of it was published." in err
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(worker)
    assert len(_remote_entries(remote)) == 1  # raw only


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


BUILD_ALL = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
from hfbuild.builds.stage import build
from hfbuild.builds.units import Unit
from hfbuild.builds.ray_executor import RayExecutor

pipe = dodo.pipe
build(pipe, "raw")
m = pipe.manifests()
units = [Unit(pipe[s].spec, m[s], {"raw": m["raw"]}) for s in ("feat", "lens")]
reports = RayExecutor().build_all(pipe, units, "two")
print(json.dumps([[r.stage, r.fingerprint, r.action] for r in reports]))
"""


def test_units_of_one_call_run_at_once_with_progress(
    repo: Repo, tmp_path: pathlib.Path, remote: str
) -> None:
    """Several units given to the Ray executor together are submitted at once and reported in
    order, with the count of units done out of the total; each lands in the driver's store
    under the key a local build gives it."""
    make_project(repo)
    clone = repo.clone(tmp_path / "clone")
    out = subprocess.run(
        [sys.executable, "-c", BUILD_ALL],
        cwd=clone.path,
        env={**os.environ, "PYTHONPATH": str(clone.path), "CALL_LOG": str(tmp_path / "c.log")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert [(s, a) for s, _, a in got] == [("feat", "built"), ("lens", "built")]
    assert "two: 2/2 units built on ray" in out.stderr
    local = repo.clone(tmp_path / "local")
    doit(local, "run", "preprocess", log=tmp_path / "l.log", env={"HFBUILD_NO_REMOTE": "1"})
    assert {s: fp for s, fp, _ in got} == {s: _lock(local)[s][0] for s in ("feat", "lens")}
    store = clone.path / ".hfbuild" / "objects"
    assert all((store / fp[:2] / fp / "manifest.json").exists() for _, fp, _ in got)


def test_sharded_stages_travel_one_task_per_shard(
    repo: Repo, tmp_path: pathlib.Path, remote: str
) -> None:
    """A sharded pipeline (a load of three parquet files, then map, filter and map over it)
    built through Ray from a clean clone runs one task per shard (one transform call each)
    and one for the whole-dataset stage; a local clone then builds nothing; keys and content
    hashes equal a local build's. After a fourth file is appended, Ray runs tasks only for
    its shards (and the whole-dataset stage), again equal to a local build."""
    make_project(repo)
    _row_local(repo)
    # Keys of its own: the nodes' stores outlive a test, and would hold the racing test's.
    log_py = (repo.path / "pkg" / "log.py").read_text()
    repo.write({"pkg/log.py": log_py + "# the sharded test\n"})
    for i in (1, 2):
        _add_part(repo, i)
    first = repo.clone(tmp_path / "first")
    log = tmp_path / "first.log"
    out = doit(first, "run", "preprocess", log=log, env=RAY_ENV)
    assert calls(log) == {"feat": 80, "keep": 80, "split": 1, "lens": 80}  # once per row
    for stage in ("raw", "feat", "kept", "lens"):
        assert f"{stage}: 3/3 shards done, 3 built on ray" in out.stderr
    assert "split: 1/1 units built on ray" in out.stderr

    local = _clones_agree(repo, first, tmp_path)
    no_remote = {"HFBUILD_NO_REMOTE": "1"}

    _add_part(repo, 3)
    for clone in (first, local):
        clone.git("pull", "-q", "--ff-only")
    log3 = tmp_path / "again.log"
    again = doit(first, "run", "preprocess", log=log3, env=RAY_ENV)
    assert calls(log3) == {"feat": 20, "keep": 20, "split": 1, "lens": 20}  # the new file's
    for stage in ("raw", "feat", "kept", "lens"):
        assert f"{stage}: 4/4 shards done, 1 built on ray" in again.stderr
    doit(local, "run", "preprocess", log=tmp_path / "local2.log", env=no_remote)
    assert _lock(first) == _lock(local)
    assert results(first) == results(local)


def test_a_workers_forged_input_shard_is_refused_and_built_here(
    repo: Repo,
    tmp_path: pathlib.Path,
    cluster: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A load shard forged on a file:// remote (data changed, every hash recomputed) whose
    key the committed lock pins: a driver holding the right shard builds the next stage on
    Ray, whose worker pulls its input shard from the remote. The worker refuses it (its
    content hash is not the lock's), the driver says so and builds that shard here, and
    every result equals a local build's without the remote."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.test_remote_trust import RemoteFs, forge_shard

    for k, v in cluster.items():
        monkeypatch.setenv(k, v)
    root = tmp_path / "remote"
    root.mkdir()
    remote = RemoteFs(f"file://{root}", fsspec.filesystem("file"), str(root))
    monkeypatch.setenv("HFBUILD_REMOTE", remote.url)
    make_project(repo)
    _row_local(repo)
    # Two files built first (one pack): the next one, appended, is then a shard entry of
    # its own on the remote (shards loaded together are one pack), which `forge_shard` forges.
    _add_part(repo, 1)
    doit(repo, "run", "preprocess", log=tmp_path / "zero.log", env={"HFBUILD_NO_REMOTE": "1"})
    # Keys of its own (the nodes' stores outlive a test): a data file no other test has.
    base = uuid.uuid4().int % 10**9
    xs = [base + i for i in range(20)]
    own = "data/part-own.parquet"
    pq.write_table(pa.table({"x": xs, "text": ["t" * (i % 5) for i in range(20)]}), repo.path / own)
    repo.commit("a data file of its own")
    doit(repo, "run", "preprocess", log=tmp_path / "first.log")
    repo.commit("lock")
    assert run_hfbuild(repo, "push").returncode == 0
    raw = _lock(repo)["raw"][0]
    key = forge_shard(remote, raw, own, tmp_path, lambda ex: {"x": ex["x"] + 1000})
    transforms = (repo.path / "pkg" / "transforms.py").read_text()
    repo.write({"pkg/transforms.py": transforms + "# feat's new code\n"}, commit="new code")

    clone = repo.clone(tmp_path / "second")
    no_remote = {"HFBUILD_NO_REMOTE": "1"}
    # `raw` held as the first repository built it: the first two files one pack (a map's
    # worker pulls a pack its input's list names as the pack), the own file's shard an
    # entry of its own, which the worker pulls by its key: the forged one.
    clone.git("checkout", "-q", "-f", "HEAD~3")
    doit(clone, "run", "preprocess:raw", log=tmp_path / "raw0.log", env=no_remote)
    clone.git("checkout", "-q", "-f", "-")
    doit(clone, "run", "preprocess:raw", log=tmp_path / "raw.log", env=no_remote)
    log = tmp_path / "second.log"
    out = doit(clone, "run", "preprocess", log=log, env=RAY_ENV)
    assert "a Ray worker refused its input" in out.stderr
    assert "feat: 3/3 shards done, 2 built on ray, 1 to build here" in out.stderr
    assert f"the remote {remote.url} holds a forged or damaged entry {key}" in out.stderr

    local = repo.clone(tmp_path / "local")
    doit(local, "run", "preprocess", log=tmp_path / "local.log", env=no_remote)
    assert results(clone) == results(local)
    assert _lock(clone) == _lock(local)


NONDET = {
    # feat records the process that built each row (its pid): two builds of one key differ.
    # With BARRIER set, each process's first call writes <pid>.pid holding its TMPDIR (each
    # node has its own) and waits for BARRIER/go: two calls there at once are on two nodes
    # (1 CPU each), and the drivers that submitted them overlap.
    "pkg/transforms.py": """
        import os
        import tempfile
        import time

        from pkg.log import log
        from pkg.util.mid import shift


        def _barrier():
            here = os.environ.get("BARRIER", "")
            mine = os.path.join(here, f"{os.getpid()}.pid")
            if not here or os.path.exists(mine):
                return
            with open(mine + ".tmp", "w") as f:
                f.write(tempfile.gettempdir())
            os.rename(mine + ".tmp", mine)
            while not os.path.exists(os.path.join(here, "go")):
                time.sleep(0.05)


        def feat(row, k=1):
            log("feat")
            _barrier()
            return {"y": shift(row["x"]) * k, "pid": os.getpid()}

        def keep(row, m=3):
            log("keep")
            return row["y"] % m != 0

        def split(ds, seed=0):
            log("split")
            return ds.train_test_split(test_size=0.25, seed=seed)
        """,
    "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG", "KILL_IN", "BARRIER"]\n',
}


def _remote_packs(url: str) -> dict[str, tuple[str, str]]:
    """Each shard a pack on the remote holds: its key -> (the pack, its content hash there)."""
    import s3fs

    from hfbuild.store.listform import expand

    fs = s3fs.S3FileSystem(
        endpoint_url=os.environ["FSSPEC_S3_ENDPOINT_URL"], key="testing", secret="testing"
    )
    base = url.removeprefix("s3://")
    out: dict[str, tuple[str, str]] = {}
    for fp in _remote_entries(url):
        doc = expand(json.loads(fs.cat_file(f"{base}/objects/{fp[:2]}/{fp}/manifest.json")))
        for key, _, _, content_hash, _ in doc.get("pack") or []:
            out[key] = (fp, content_hash)
    return out


def _remote_hashes(url: str, fps: list[str]) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=os.environ["FSSPEC_S3_ENDPOINT_URL"], key="testing", secret="testing"
    )
    base = url.removeprefix("s3://")
    return [
        json.loads(fs.cat_file(f"{base}/objects/{fp[:2]}/{fp}/manifest.json"))["content_hash"]
        for fp in fps
    ]


def _waiting(
    barrier: pathlib.Path, procs: list[subprocess.Popen[str]], n: int, names: str = "*.pid"
) -> dict[str, str]:
    """The processes held at the barrier ({name: what its file holds}) once `n` are there."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        got = {p.stem: p.read_text() for p in barrier.glob(names)}
        if len(got) >= n:
            return got
        for p in procs:
            assert p.poll() is None, p.communicate()
        time.sleep(0.2)
    raise AssertionError(f"{n} processes never met at the barrier: {sorted(barrier.iterdir())}")


def test_a_remote_outage_leaves_no_node_stuck(
    repo: Repo, tmp_path: pathlib.Path, remote: str, cluster: dict[str, str]
) -> None:
    """A non-deterministic map (it records its pid) over a remote outage. Two drivers race on
    Ray, their feat tasks held at a barrier, one on each node (each node its own TMPDIR and
    store; neither is a driver); the S3 server stops, and both workers fail to publish
    what they built, which stays in their nodes' stores. A third clone built feat locally
    through the outage (a dead endpoint); a fourth publishes its own feat first. Then a Ray
    build succeeds (its workers adopt the published feat before filtering it, rather than
    their own copy: a filter's entry selects rows of its base), so do the other drivers and
    the local clone (which adopts it too), and every lock agrees with the remote."""
    make_project(repo)
    _row_local(repo)
    repo.write(NONDET)
    log_py = (repo.path / "pkg" / "log.py").read_text()  # keys of its own: stores outlive tests
    repo.write({"pkg/log.py": log_py + f"# {uuid.uuid4().hex}\n"}, commit="non-deterministic")
    c0, c1, first, lo = (repo.clone(tmp_path / n) for n in ("c0", "c1", "first", "local"))
    dead = {"FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    out = doit(lo, "run", "preprocess:feat", log=tmp_path / "lo.log", env=dead)
    assert "Building here instead" in out.stderr

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "CALL_LOG": str(tmp_path / "race.log"), "BARRIER": str(barrier)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "doit", "run", "preprocess:feat"],
            cwd=c.path,
            env={**env, **RAY_ENV},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in (c0, c1)
    ]
    held = _waiting(barrier, procs, 2)
    # Recorded by the transform itself: two worker processes, on two nodes, neither a driver.
    assert len(held) == 2 and not {int(k) for k in held} & {p.pid for p in procs}
    assert len(set(held.values())) == 2 and tempfile.gettempdir() not in held.values()
    with outage(cluster["FSSPEC_S3_ENDPOINT_URL"]):
        (barrier / "go").touch()
        outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs, strict=True):
        assert p.returncode != 0 and "cannot reach the remote" in o + e, o + e
    assert len(list(barrier.glob("*.pid"))) == 2  # nothing else built feat meanwhile

    doit(first, "run", "preprocess:feat", log=tmp_path / "first.log", env={"HFBUILD_PUSH": "1"})
    doit(c0, "run", "preprocess", log=tmp_path / "c0.log", env=RAY_ENV)
    doit(c1, "run", "preprocess", log=tmp_path / "c1.log", env=RAY_ENV)
    out = doit(lo, "run", "preprocess", log=tmp_path / "lo2.log")
    assert "the remote's copy replaces it" in out.stderr
    lock = _lock(c0)
    assert _lock(c1) == lock
    assert _lock(lo) == lock
    assert lock["feat"] == _lock(first)["feat"]  # the first writer's
    fps = [fp for fp, _ in lock.values()]
    assert _remote_hashes(remote, fps) == [h for _, h in lock.values()]
    assert _deep_check(remote, tmp_path / "check") == len(_remote_entries(remote))
    assert results(c0)["kept"] == expected()["kept"]


def _node_entries() -> dict[str, set[str]]:
    """The fingerprints each node's store holds, by the node's TMPDIR."""
    out = {}
    for tmp in NODE_TMPDIRS:
        objects = tmp / f"hfbuild-ray-{os.getuid()}" / "objects"
        out[tmp.name] = {p.name for p in objects.glob("*/*") if (p / "manifest.json").exists()}
    return out


def test_gc_collects_each_nodes_store(
    repo: Repo, tmp_path: pathlib.Path, remote: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hfbuild gc` with the Ray executor collects every node's store by the local gc's
    rules: an entry only the nodes hold (an older build's, from another clone) that nothing
    keeps is removed there; what the lock keeps stays; the output says per node what went."""
    make_project(repo)
    log_py = (repo.path / "pkg" / "log.py").read_text()  # keys of its own: stores outlive tests
    repo.write({"pkg/log.py": log_py + f"# {uuid.uuid4().hex}\n"}, commit="keys of its own")
    first = repo.clone(tmp_path / "first")
    doit(first, "run", "preprocess", log=tmp_path / "first.log", env=RAY_ENV)
    old = {fp for fp, _ in _lock(first).values()}
    transforms = (repo.path / "pkg" / "transforms.py").read_text()
    repo.write({"pkg/transforms.py": transforms + "# new code\n"}, commit="new code")
    second = repo.clone(tmp_path / "second")
    doit(second, "run", "preprocess", log=tmp_path / "second.log", env=RAY_ENV)
    new = {fp for fp, _ in _lock(second).values()}
    older = old - new  # feat, kept, split of the first code: second's store never held them
    assert len(older) == 3
    store = second.path / ".hfbuild" / "objects"
    assert not any((store / fp[:2] / fp).exists() for fp in older)

    before = _node_entries()
    held = {n: fps & older for n, fps in before.items()}
    assert any(held.values()), before
    locked = {n: fps & new for n, fps in before.items()}
    assert any(locked.values()), before
    monkeypatch.setenv("HFBUILD_EXECUTOR", "ray")
    out = run_hfbuild(second, "gc", "--keep-days", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    after = _node_entries()
    for n in before:
        assert not after[n] & older, n  # removed on every node
        assert after[n] >= locked[n], n  # what the lock keeps stays
    # Per node: a line for each item removed, then its count and store.
    removed: dict[str, set[str]] = {}
    stores: dict[str, str] = {}
    for line in out.stdout.splitlines():
        if not line.startswith("node "):
            continue
        node, _, said = line[5:].partition(": ")
        if " item(s), " in said:
            stores[node] = pathlib.Path(said.split(" from its store ")[1].rstrip(".")).parent.name
        elif said.startswith("removed objects/"):
            removed.setdefault(node, set()).add(said.split()[1].split("/")[2])
    assert sorted(stores.values()) == sorted(before), out.stdout  # one summary per node
    for node, tmp in stores.items():
        assert removed.get(node, set()) >= held[tmp], out.stdout
        assert not removed.get(node, set()) & new, out.stdout


SHELF = {
    # Lists shelf/ at run time (the folder is named nowhere the static key looks) and reads
    # the sizes of the files named there (os.stat: not a read, so their bytes must travel).
    "pkg/shelf.py": """
        import os
        import pathlib

        from pkg.log import log

        ROOT = pathlib.Path(__file__).resolve().parent.parent


        def names(batch):
            log("shelved")
            folder = ROOT / "shelf"
            found = sorted(os.listdir(folder))
            sizes = [os.path.getsize(folder / n) for n in found]
            said = ",".join(f"{n}:{s}" for n, s in zip(found, sizes))
            return {"names": [said] * len(batch["x"])}


        def row_names(row):
            log("shelved_rows")
            return {"n": len(os.listdir(ROOT / "shelf")) + row["x"]}
        """,
    "shelf/one.csv": "x\n1\n",
    "shelf/two.csv": "x\n22\n",
    "dodo.py": """
        from hfbuild import Pipeline
        from pkg import shelf

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        pipe.map("shelved", raw, shelf.names, batched=True)
        pipe.map("shelved_rows", raw, shelf.row_names)  # sharded: one unit per file


        def task_preprocess():
            yield from pipe.tasks()
        """,
}

SHELVED = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
rows = dodo.pipe.result("shelved_rows")
out = sorted(set(dodo.pipe.result("shelved")["names"]))
print(json.dumps([out, [n - x for n, x in zip(rows["n"], rows["x"])]]))
"""


def _shelved(repo: Repo) -> list[Any]:
    out = subprocess.run(
        [sys.executable, "-c", SHELVED],
        cwd=repo.path,
        env={**os.environ, "PYTHONPATH": str(repo.path), "CALL_LOG": os.devnull},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    got: list[Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def test_a_stage_listing_a_folder_builds_on_ray(
    repo: Repo, tmp_path: pathlib.Path, remote: str
) -> None:
    """A map whose builds list shelf/ at run time (its lock records the listing) builds on
    Ray, whole and shard by shard: the folder travels with the names its listing holds and
    their bytes, the worker's key agrees, and the results and lock entries equal a local
    build's. A file added to shelf/ rebuilds both on Ray, again equal to a local build (they
    were refused: a worker would list other names)."""
    make_project(repo)
    log_py = (repo.path / "pkg" / "log.py").read_text()  # keys of its own: stores outlive tests
    repo.write({**SHELF, "pkg/log.py": log_py + f"# {uuid.uuid4().hex}\n"}, commit="shelf")
    _add_part(repo, 1)  # two files: shelved_rows is built one unit per file
    no_remote = {"HFBUILD_NO_REMOTE": "1"}
    doit(repo, "run", "preprocess", log=tmp_path / "local.log", env=no_remote)
    # Once each: the listing learnt mid-build, what was built before it re-keyed.
    assert calls(tmp_path / "local.log") == {"shelved": 1, "shelved_rows": 60}
    repo.commit("lock: its record names the listing")
    assert _shelved(repo) == [["one.csv:4,two.csv:5"], [2] * 60]

    first = repo.clone(tmp_path / "first")
    log = tmp_path / "first.log"
    out = doit(first, "run", "preprocess", log=log, env=RAY_ENV)
    # Once: its key assumes the listing the committed lock records.
    assert calls(log) == {"shelved": 1, "shelved_rows": 60}
    assert "shelved: 1/1 units built on ray" in out.stderr
    assert "shelved_rows: 2/2 shards done, 2 built on ray" in out.stderr
    assert _shelved(first) == [["one.csv:4,two.csv:5"], [2] * 60]
    assert _lock(first) == _lock(repo)

    repo.write({"shelf/three.csv": "x\n333\n"}, commit="a file added to the listed folder")
    first.git("pull", "-q", "--ff-only")
    log2 = tmp_path / "again.log"
    out = doit(first, "run", "preprocess", log=log2, env=RAY_ENV)
    assert "shelved: 1/1 units built on ray" in out.stderr
    assert "shelved_rows: 2/2 shards done, 2 built on ray" in out.stderr
    assert _shelved(first) == [["one.csv:4,three.csv:6,two.csv:5"], [3] * 60]
    doit(repo, "run", "preprocess", log=tmp_path / "local2.log", env=no_remote)
    assert calls(log2) == calls(tmp_path / "local2.log")  # the calls of a local rebuild
    assert calls(log2)["shelved_rows"] == 60
    assert _lock(first) == _lock(repo)


def test_a_hub_stage_and_a_map_over_it_build_on_ray_as_locally(
    repo: Repo, tmp_path: pathlib.Path, remote: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load of a Hub dataset (two parquet files of its main) and a map over it, built by
    Ray workers shard by shard: the driver resolves the revision and sends each shard's file
    from its own Hub cache, which no node's environment names (HF_HUB_CACHE is the driver's
    alone); each worker checks the bytes against the Hub's id the key holds. The keys,
    content hashes and rows equal a local build's."""
    from tests.test_hub import HubCache, _parquet, _project, _results

    cache = tmp_path / "driver-hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    hub = HubCache(cache)
    hub.commit(
        {
            "README.md": b"# org/name\n",
            "data/part-0.parquet": _parquet("part-0", 0),
            "data/part-1.parquet": _parquet("part-1", 100),
        }
    )
    _project(repo)
    first = repo.clone(tmp_path / "first")
    log = tmp_path / "first.log"
    out = doit(first, "run", "preprocess", log=log, env=RAY_ENV)
    for stage in ("raw", "feat"):
        assert f"{stage}: 2/2 shards done, 2 built on ray" in out.stderr, out.stderr
    assert sorted(calls(log)) == ["feat:part-0", "feat:part-1"]
    local = repo.clone(tmp_path / "local")
    doit(local, "run", "preprocess", log=tmp_path / "local.log", env={"HFBUILD_NO_REMOTE": "1"})
    assert _lock(first) == _lock(local)
    assert _results(first, "raw", "feat") == _results(local, "raw", "feat")


COALESCED = {
    # The row-local feat records, from inside the transform, the Ray task and process it runs
    # in; with FAIL_ROW set, it raises on that row.
    "pkg/transforms.py": ROW_LOCAL["pkg/transforms.py"].replace(
        """
        def feat(row, k=1):
            log("feat")
""",
        """
        def _task():
            import ray

            if not ray.is_initialized():
                return "not-on-ray"
            return ray.get_runtime_context().get_task_id()


        def feat(row, k=1):
            import os

            log("feat")
            with open(os.environ["TASK_LOG"], "a") as f:
                f.write(f"{_task()} {os.getpid()}\\n")
            if str(row["x"]) == os.environ.get("FAIL_ROW"):
                raise ValueError(f"bad row {row['x']}")
            if str(row["x"]) == os.environ.get("KILL_ROW"):  # its worker dies, every attempt
                import signal

                with open(os.environ["TASK_LOG"], "a") as f:
                    f.write(f"killed {os.getpid()}\\n")
                os.kill(os.getpid(), signal.SIGKILL)
""",
    ),
    "pyproject.toml": (
        '[tool.hfbuild]\nuntracked-env = ["CALL_LOG", "KILL_IN", "TASK_LOG", "FAIL_ROW", '
        '"KILL_ROW"]\n'
    ),
}


def _own_rows(repo: Repo) -> None:
    """Rows of its own in every data file: a load's keys are its files' (the nodes' stores
    outlive a test, and a node holding some of a task's shards builds only the others)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tag = uuid.uuid4().hex
    for path in sorted((repo.path / "data").glob("part-*.parquet")):
        table = pq.read_table(path)
        pq.write_table(table.append_column("tag", pa.array([tag] * table.num_rows)), path)
    repo.commit("rows of its own")


def _coalesced_project(repo: Repo) -> None:
    """Six tiny files (part-0's 40 rows, then 20 each), row-local stages, feat recording
    its Ray task; code and rows of its own, so keys of its own (the nodes' stores outlive a
    test: a node holding a shard another test built pushes it as an entry of its own)."""
    make_project(repo)
    _row_local(repo)
    log_py = (repo.path / "pkg" / "log.py").read_text()
    repo.write({**COALESCED, "pkg/log.py": log_py + f"# {uuid.uuid4().hex}\n"})
    for i in range(1, 6):
        _add_part(repo, i)
    _own_rows(repo)


def test_small_shards_travel_coalesced_and_each_task_pushes_one_pack(
    repo: Repo, tmp_path: pathlib.Path, remote: str
) -> None:
    """Six tiny shards per stage on a 2-CPU cluster travel in fewer Ray tasks than shards, as
    the transform itself records (its task ids, none in the driver); each row is mapped once.
    A load's or a map's shards of one task are pushed as one pack (one entry whose manifest
    lists each shard's key, rows and content hash: the lock's), not an entry per shard; a
    filter's shards, selections of their input's rows, each as an entry of its own. Keys,
    content hashes and results equal a local build's."""
    _coalesced_project(repo)
    first = repo.clone(tmp_path / "first")
    tasks = tmp_path / "tasks.log"
    log = tmp_path / "first.log"
    out = doit(first, "run", "preprocess", log=log, env={**RAY_ENV, "TASK_LOG": str(tasks)})
    assert calls(log) == {"feat": 140, "keep": 140, "split": 1, "lens": 140}  # once per row
    ran = {line.split()[0] for line in tasks.read_text().splitlines()}
    assert "not-on-ray" not in ran
    assert 1 < len(ran) < 6, ran  # 6 shards, in as many tasks as the cluster has CPUs
    assert "feat: 6/6 shards done, 6 built on ray" in out.stderr

    lock = json.loads((first.path / "hfbuild.lock").read_text())["stages"]
    entries = _remote_entries(remote)
    packs = _remote_packs(remote)
    for stage in ("raw", "feat", "lens"):
        hashes = lock[stage]["shard_hashes"]
        assert len(hashes) == 6
        assert {k: packs[k][1] for k in hashes} == hashes  # each in a pack, the lock's hash
        assert len({packs[k][0] for k in hashes}) == len(ran), (stage, packs)  # one a task
        # No entry of its own, but a filter's input shard: the base its selection names.
        alone = set(hashes) & set(entries)
        assert alone == (set(hashes) if stage == "feat" else set()), stage
    for key in lock["kept"]["shard_hashes"]:  # a selection: data under its name, manifest
        assert len(entries[key]) == 2 and entries[key][0].startswith("data-"), key
    assert _remote_hashes(remote, list(lock["kept"]["shard_hashes"])) == list(
        lock["kept"]["shard_hashes"].values()
    )

    local = repo.clone(tmp_path / "local")
    env = {"HFBUILD_NO_REMOTE": "1", "TASK_LOG": str(tmp_path / "local-tasks.log")}
    doit(local, "run", "preprocess", log=tmp_path / "local.log", env=env)
    assert _lock(first) == _lock(local)
    assert results(first) == results(local)
    # A fresh clone pulls every stage, its packs checked range by range, and builds nothing.
    second = repo.clone(tmp_path / "second")
    out2 = doit(second, "run", "preprocess", log=tmp_path / "second.log")
    assert calls(tmp_path / "second.log") == {}
    assert out2.stdout.count("pulled") == 5
    assert _lock(second) == _lock(local)
    assert results(second) == results(local)


def test_a_failing_shard_in_a_coalesced_task_names_its_file(
    repo: Repo, tmp_path: pathlib.Path, remote: str
) -> None:
    """A row of the second of three shards one task builds raises: the stage fails with the
    local build's message, its first line naming that shard's data file; the stage's list is
    not published."""
    _coalesced_project(repo)
    clone = repo.clone(tmp_path / "clone")
    env = {**RAY_ENV, "TASK_LOG": str(tmp_path / "tasks.log"), "FAIL_ROW": "45"}  # part-1
    out = doit(clone, "run", "preprocess:feat", log=tmp_path / "c.log", check=False, env=env)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    first = next(line for line in text.splitlines() if "ValueError: bad row 45" in line)
    assert "stage 'feat' (shard data/part-1.parquet) failed: ValueError: bad row 45" in first
    assert 'transforms.py", line' in text  # the user's traceback follows, as locally
    assert "Traceback" not in text
    lock = json.loads((clone.path / "hfbuild.lock").read_text())["stages"]
    assert "feat" not in lock


def test_a_coalesced_task_killed_mid_build_fails_in_one_line_and_a_rebuild_builds_the_rest(
    repo: Repo, tmp_path: pathlib.Path, remote: str
) -> None:
    """The worker of a coalesced task is SIGKILLed at a row of its third shard, on each of
    Ray's attempts (each a new worker process, recorded by the transform): the build fails
    with one line naming the stage and the task's shards and saying what to do, and no
    traceback. What the remote holds then is served only whole: each published entry passes
    the full content check, an upload the kill cut short is never pulled. Built again, the
    lock equals a local build's."""
    from hfbuild.builds.ray_executor import MAX_RETRIES

    _coalesced_project(repo)
    clone = repo.clone(tmp_path / "clone")
    tasks = tmp_path / "tasks.log"
    env = {**RAY_ENV, "TASK_LOG": str(tasks), "KILL_ROW": "65"}  # part-2's: the first task's
    out = doit(clone, "run", "preprocess:feat", log=tmp_path / "c.log", check=False, env=env)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text
    said = [line for line in text.splitlines() if "died" in line]
    assert len(said) == 1, text
    assert (
        "stage 'feat': the Ray worker building its shards data/part-0.parquet.."
        f"data/part-2.parquet died {MAX_RETRIES + 1} times (" in said[0]
    ), said
    assert said[0].endswith(
        "; what it published before is kept, each entry checked when pulled. Build again "
        "(with --executor local if it dies again) and look at the node's memory and Ray's logs."
    ), said
    killed = [line.split()[1] for line in tasks.read_text().splitlines() if line[:7] == "killed "]
    assert len(killed) == len(set(killed)) == MAX_RETRIES + 1  # each attempt a worker killed
    assert not (clone.path / "hfbuild.lock").exists() or "feat" not in _lock(clone)
    published = _deep_check(remote, tmp_path / "check")  # raw's, and feat's before the kill
    # raw: its 6 shards in one pack a task, and its list; a feat shard built before the kill
    # was not pushed: its task's pack was not complete (an interrupted build's cost).
    assert published >= 2 + 1, _remote_entries(remote)
    raw = json.loads((clone.path / "hfbuild.lock").read_text())["stages"]["raw"]
    assert set(raw["shard_hashes"]) <= set(_remote_packs(remote))

    doit(clone, "run", "preprocess", log=tmp_path / "again.log", env=env | {"KILL_ROW": ""})
    local = repo.clone(tmp_path / "local")
    env = {"HFBUILD_NO_REMOTE": "1", "TASK_LOG": str(tmp_path / "local-tasks.log")}
    doit(local, "run", "preprocess", log=tmp_path / "local.log", env=env)
    assert _lock(clone) == _lock(local)
    assert results(clone) == results(local)
    assert _deep_check(remote, tmp_path / "check2") == len(_remote_entries(remote))


def test_a_node_holding_its_own_build_of_a_published_shard_takes_the_published_files(
    repo: Repo, tmp_path: pathlib.Path, remote: str
) -> None:
    """Every node's store holds feat's shards as it built them itself (an attempt killed
    before its pack was published leaves them so), while the remote holds them as written
    out of a pack: the same rows in other files. The filter over them builds on Ray, and the
    whole stage after it pulls the filter's list, which records its bases' files: each node
    takes the published shard for its own (`Remote.adopt`), so the list is served there and
    the build equals a local one. (Seen in `make test`: "its input 'kept' ... is not on the
    remote", when the node running the killed test's rebuild held the killed attempts'.)"""
    _coalesced_project(repo)
    first = repo.clone(tmp_path / "first")
    tasks = {"TASK_LOG": str(tmp_path / "tasks.log")}
    doit(first, "run", "preprocess:feat", log=tmp_path / "first.log", env=RAY_ENV | tasks)
    feat = json.loads((first.path / "hfbuild.lock").read_text())["stages"]["feat"]["shard_hashes"]
    nodes = [t / f"hfbuild-ray-{os.getuid()}" for t in NODE_TMPDIRS]
    for i, store in enumerate(nodes):  # each node's own build of feat's shards
        own = repo.clone(tmp_path / f"own{i}")
        env = {"HFBUILD_NO_REMOTE": "1", "HFBUILD_STORE": str(store), **tasks}
        doit(own, "run", "preprocess:feat", log=tmp_path / f"own{i}.log", env=env)
        for key in feat:
            doc = json.loads((store / "objects" / key[:2] / key / "manifest.json").read_text())
            assert "pulled_from" not in doc and doc["content_hash"] == feat[key]

    second = repo.clone(tmp_path / "second")
    out = doit(second, "run", "preprocess", log=tmp_path / "second.log", env=RAY_ENV | tasks)
    assert "kept: 6/6 shards done, 6 built on ray" in out.stderr
    assert "feat" not in calls(tmp_path / "second.log")  # pulled; the rest built on the nodes
    local = repo.clone(tmp_path / "local")
    env = {"HFBUILD_NO_REMOTE": "1", **tasks}
    doit(local, "run", "preprocess", log=tmp_path / "local.log", env=env)
    assert _lock(second) == _lock(local)
    assert results(second) == results(local)


def test_a_first_ray_build_of_code_listing_a_folder_equals_a_local_build(
    repo: Repo, tmp_path: pathlib.Path, remote: str
) -> None:
    """No build has listed shelf/ yet (no record, no lock): the workers of the whole map
    and of the sharded one find their builds listing a folder their trees lack, publish
    nothing and say so; the driver sends them again with shelf/'s names and files, the
    listing's digest in their keys. Results and lock entries equal a local build's. A file
    added to shelf/ then rebuilds both on Ray (the listing recorded: sent once), again as
    locally."""
    make_project(repo)
    log_py = (repo.path / "pkg" / "log.py").read_text()  # keys of its own: stores outlive tests
    repo.write({**SHELF, "pkg/log.py": log_py + f"# {uuid.uuid4().hex}\n"}, commit="shelf")
    _add_part(repo, 1)
    _own_rows(repo)  # raw's keys of its own too (a node may hold them written otherwise)
    first = repo.clone(tmp_path / "first")
    out = doit(first, "run", "preprocess", log=tmp_path / "first.log", env=RAY_ENV)
    again = "to send again with the folders listed at run time (shelf)"
    assert f"shelved: 0/1 units built on ray, 1 {again}" in out.stderr
    assert "shelved: 1/1 units built on ray" in out.stderr
    assert f"shelved_rows: 0/2 shards done, 0 built on ray, 2 {again}" in out.stderr
    assert "shelved_rows: 2/2 shards done, 2 built on ray" in out.stderr
    assert _shelved(first) == [["one.csv:4,two.csv:5"], [2] * 60]
    no_remote = {"HFBUILD_NO_REMOTE": "1"}
    local = repo.clone(tmp_path / "local")
    doit(local, "run", "preprocess", log=tmp_path / "local.log", env=no_remote)
    assert _lock(first) == _lock(local)

    repo.write({"shelf/three.csv": "x\n333\n"}, commit="a file added to the listed folder")
    for clone in (first, local):
        clone.git("pull", "-q", "--ff-only")
    out = doit(first, "run", "preprocess", log=tmp_path / "again.log", env=RAY_ENV)
    assert "shelved: 1/1 units built on ray" in out.stderr
    assert "shelved_rows: 2/2 shards done, 2 built on ray" in out.stderr
    assert "send again" not in out.stderr
    assert calls(tmp_path / "again.log") == {"shelved": 1, "shelved_rows": 60}
    assert _shelved(first) == [["one.csv:4,three.csv:6,two.csv:5"], [3] * 60]
    doit(local, "run", "preprocess", log=tmp_path / "local2.log", env=no_remote)
    assert _lock(first) == _lock(local)


ROOTED = {
    # Lists the project's root at run time and reads the .csv files named there.
    "pkg/rooted.py": """
        import os
        import pathlib

        from pkg.log import log

        ROOT = pathlib.Path(__file__).resolve().parent.parent


        def tops(batch):
            log("rooted")
            found = sorted(n for n in os.listdir(ROOT) if n.endswith(".csv"))
            said = ",".join(f"{n}:{(ROOT / n).read_text().split()[-1]}" for n in found)
            return {"tops": [said] * len(batch["x"])}
        """,
    "top.csv": "x\n7\n",
    "dodo.py": """
        from hfbuild import Pipeline
        from pkg import rooted

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        pipe.map("rooted", raw, rooted.tops, batched=True)


        def task_preprocess():
            yield from pipe.tasks()
        """,
}

ROOTED_RESULT = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
print(json.dumps(sorted(set(dodo.pipe.result("rooted")["tops"]))))
"""


def test_a_stage_listing_the_project_root_builds_on_ray(
    repo: Repo, tmp_path: pathlib.Path, remote: str
) -> None:
    """A map listing the project's root (and reading the files it finds there) builds on
    Ray from its first build: sent again with the root's names, each file there with its
    bytes, each folder empty (the tree's own marker under a name no listing holds), its
    key and result equal a local build's; a file added at the root rebuilds it on Ray."""
    make_project(repo)
    log_py = (repo.path / "pkg" / "log.py").read_text()
    repo.write({**ROOTED, "pkg/log.py": log_py + f"# {uuid.uuid4().hex}\n"}, commit="rooted")
    first = repo.clone(tmp_path / "first")

    def result(clone: Repo) -> Any:
        out = subprocess.run(
            [sys.executable, "-c", ROOTED_RESULT],
            cwd=clone.path,
            env={**os.environ, "PYTHONPATH": str(clone.path), "CALL_LOG": os.devnull},
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    out = doit(first, "run", "preprocess", log=tmp_path / "first.log", env=RAY_ENV)
    assert (
        "rooted: 0/1 units built on ray, 1 to send again with the folders listed at run time (.)"
        in out.stderr
    )
    assert "rooted: 1/1 units built on ray" in out.stderr
    assert result(first) == ["top.csv:7"]
    no_remote = {"HFBUILD_NO_REMOTE": "1"}
    local = repo.clone(tmp_path / "local")
    doit(local, "run", "preprocess", log=tmp_path / "local.log", env=no_remote)
    assert _lock(first) == _lock(local)

    repo.write({"more.csv": "x\n8\n"}, commit="a file added at the root")
    for clone in (first, local):
        clone.git("pull", "-q", "--ff-only")
    out = doit(first, "run", "preprocess", log=tmp_path / "again.log", env=RAY_ENV)
    assert "rooted: 1/1 units built on ray" in out.stderr
    assert "send again" not in out.stderr
    assert result(first) == ["more.csv:8,top.csv:7"]
    doit(local, "run", "preprocess", log=tmp_path / "local2.log", env=no_remote)
    assert _lock(first) == _lock(local)


def test_a_ray_load_travels_in_few_requests_and_its_shards_come_back_with_the_results(
    repo: Repo, tmp_path: pathlib.Path, remote: str
) -> None:
    """`raw`'s six load shards built on Ray, every S3 request recorded: each shard is asked
    for once (the driver's check before building) and never put: each task's shards are put
    as one pack, its three data files and its manifest once each (no question first, no
    bucket check), and never read back: the worker that published it sends it with its
    results, and the driver's store holds it marked as pulled from the remote. Each task's
    shards are loaded by one call (a part's dataset_info, without the whole load's
    splits). Keys and content hashes are the local build's, and a fresh clone pulls the
    stage and builds nothing."""

    _coalesced_project(repo)
    first = repo.clone(tmp_path / "first")
    env = {**RAY_ENV, "TASK_LOG": str(tmp_path / "tasks.log")}
    with s3_requests() as lines:
        out = doit(first, "run", "preprocess:raw", log=tmp_path / "first.log", env=env)
    assert "raw: 6/6 shards done, 6 built on ray (2 tasks)" in out.stderr
    keys = list(
        json.loads((first.path / "hfbuild.lock").read_text())["stages"]["raw"]["shard_hashes"]
    )
    assert len(keys) == 6
    bucket = remote.removeprefix("s3://").split("/")[0]
    assert not [x for x in lines if x.startswith("HEAD ")], lines  # no bucket checks
    for key in keys:
        mine = [
            x.split()[0] + " " + x.split()[1].split(f"/{key}/")[1] for x in lines if f"/{key}/" in x
        ]
        assert mine == ["GET manifest.json"], mine
    packs = _remote_packs(remote)
    assert len({packs[k][0] for k in keys}) == 2  # one pack a task
    for pack in {packs[k][0] for k in keys}:
        mine = [
            x.split()[0] + " " + x.split()[1].split(f"/{pack}/")[1]
            for x in lines
            if f"/{pack}/" in x
        ]
        assert sorted(mine) == sorted(f"PUT {n}" for n in _remote_files(remote, pack)), mine
        held = json.loads(
            (first.path / ".hfbuild" / "objects" / pack[:2] / pack / "manifest.json").read_text()
        )
        assert held["pulled_from"] == remote
    # Each task's shards are parts of one load of its files (a part's dataset_info has no
    # splits of the whole load); which shard's is not, with its task's log, if any.
    whole = {packs[k][0] for k in keys}
    whole = {p for p in whole if "splits" in _remote_json(remote, p, "dataset_info.json")}
    assert not whole, (whole, keys, out.stderr[-2000:])
    assert all(bucket in x for x in lines if x.startswith(("GET", "PUT")))

    # A map over it: each task pulls the packs holding its input shards, once each (their
    # manifest and data files), and no input shard is asked for or put by its key.
    with s3_requests() as lines:
        out = doit(first, "run", "preprocess:lens", log=tmp_path / "lens.log", env=env)
    assert "lens: 6/6 shards done, 6 built on ray (2 tasks)" in out.stderr
    assert not [x for x in lines if any(f"/{key}/" in x for key in keys)], lines
    for pack in {packs[k][0] for k in keys}:
        data = [x for x in lines if f"/{pack}/data-" in x]
        assert all(x.startswith("GET ") for x in data), data  # none if its node built it
        assert len(data) <= 2 * len(_remote_files(remote, pack)), data  # once a task at most

    local = repo.clone(tmp_path / "local")
    no_remote = {"HFBUILD_NO_REMOTE": "1"}
    doit(local, "run", "preprocess:lens", log=tmp_path / "local.log", env=no_remote)
    assert _lock(first) == _lock(local)
    second = repo.clone(tmp_path / "second")
    out2 = doit(second, "run", "preprocess:lens", log=tmp_path / "second.log")
    assert out2.stdout.count("pulled") == 2
    assert _lock(second) == _lock(local)


def _remote_files(url: str, fp: str) -> list[str]:
    """The names of an entry's files on the remote (`data-<uuid>/<file>`, `manifest.json`)."""
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=os.environ["FSSPEC_S3_ENDPOINT_URL"], key="testing", secret="testing"
    )
    base = f"{url.removeprefix('s3://')}/objects/{fp[:2]}/{fp}/"
    return sorted(p.split(base, 1)[1] for p in fs.find(base, withdirs=False))


def _remote_json(url: str, fp: str, name: str) -> Any:
    """The JSON file `name` of an entry's data on the remote."""
    manifest = json.loads(_remote_cat(url, f"{fp[:2]}/{fp}/manifest.json"))
    return json.loads(_remote_cat(url, f"{fp[:2]}/{fp}/{manifest['data_dir']}/{name}"))


def _remote_cat(url: str, rel: str) -> bytes:
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=os.environ["FSSPEC_S3_ENDPOINT_URL"], key="testing", secret="testing"
    )
    return bytes(fs.cat_file(f"{url.removeprefix('s3://')}/objects/{rel}"))


WARM = {
    # Three sharded maps over a load, all importing the in-repo `helper`; `a` reads WARM_A
    # (in its key: it travels with its tasks) and what its worker process started with;
    # `b` and `c` expand it through the standard library, which hfbuild does not note: what
    # they find is what their worker's environment holds.
    "helper.py": "VALUE = 1\n",
    "step_a.py": """
        import os

        import helper

        def a(row):
            with open("/proc/self/environ", "rb") as f:
                start = f.read().split(b"\\0")
            return {
                "pid": os.getpid(),
                "v": helper.VALUE,
                "env": os.environ.get("WARM_A", ""),
                "start": b"WARM_A=from the driver" in start,
            }
        """,
    "step_b.py": """
        import os

        import helper

        def b(row):
            return {"pid": os.getpid(), "v": helper.VALUE, "env": os.path.expandvars("$WARM_A")}

        def c(row):
            return {**b(row), "c": True}
        """,
    "dodo.py": """
        from hfbuild import Pipeline
        import step_a, step_b

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        a = pipe.map("a", raw, step_a.a)
        b = pipe.map("b", raw, step_b.b)
        c = pipe.map("c", raw, step_b.c)
        """,
}

# One driver process, one Ray job: build raw, a, b and c; commit helper.py at VALUE = 2 and
# build b, c and a (dodo and the project's modules imported anew, as a new driver would):
# c's workers, on 1-CPU nodes, are not the idle ones Ray stops as a's start (its soft limit
# of a node's workers is its CPUs) before b's tasks come.
WARM_BUILDS = """
import json, os, subprocess, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, os.getcwd())
from hfbuild.builds.stage import build

def run(stages):
    import dodo
    for stage in stages:
        build(dodo.pipe, stage, executor="ray")
    rows = {s: dodo.pipe.result(s).to_dict() for s in ("a", "b", "c")}
    for name in ("dodo", "step_a", "step_b", "helper"):
        sys.modules.pop(name, None)
    return rows

first = run(("raw", "a", "b", "c"))
with open("helper.py", "w") as f:
    f.write("VALUE = 2\\n")
subprocess.run(["git", "commit", "-qam", "helper at 2"], check=True)
print(json.dumps([first, run(("b", "c", "a")), os.getpid()]))
"""


def test_stages_run_in_warm_workers_each_with_its_own_code_and_variables(
    repo: Repo, tmp_path: pathlib.Path, remote: str
) -> None:
    """Ray tasks carry no tree in a runtime_env, so a worker process serves stage after stage
    of the same variables: the rows two sharded maps without variables recorded name the same
    (non-driver) worker processes, in one build and in the next one of the same driver.
    Nothing of one task's tree reaches the next: after helper.py changes, every map (whose
    workers imported the old helper) computes with the new one. A stage's variables are in
    its worker process's environment from its start (what a package reads at import sees
    them), and those workers serve no stage without them. A node unpacking a tree removes
    the trees no task used for a day."""
    repo.write(WARM)
    (repo.path / "data").mkdir()
    _add_part(repo, 1)
    _add_part(repo, 2)
    _own_rows(repo)
    clone = repo.clone(tmp_path / "clone")
    old, day = time.time() - 2 * 86400, uuid.uuid4().hex  # trees of another build, per node
    for tmp in NODE_TMPDIRS:
        for age in ("stale", "fresh"):
            (tmp / f"hfbuild-ray-trees-{os.getuid()}" / f"{age}-{day}").mkdir(parents=True)
        os.utime(tmp / f"hfbuild-ray-trees-{os.getuid()}" / f"stale-{day}", (old, old))
    out = subprocess.run(
        [sys.executable, "-c", WARM_BUILDS],
        cwd=clone.path,
        env={**os.environ, "WARM_A": "from the driver", "CALL_LOG": os.devnull},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    first, second, driver = json.loads(out.stdout.strip().splitlines()[-1])
    for stage in ("a", "b", "c"):
        assert out.stderr.count(f"{stage}: 2/2 shards done, 2 built on ray") == 2, out.stderr
    pids = [{s: set(rows[s]["pid"]) for s in ("a", "b", "c")} for rows in (first, second)]
    for rows in (first, second):
        assert set(rows["a"]["start"]) == {True}, pids  # its worker started with it
    assert driver not in set.union(*pids[0].values(), *pids[1].values())
    assert pids[0]["b"] & pids[0]["c"], pids  # one build's two stages, one worker
    assert not pids[0]["a"] & (pids[0]["b"] | pids[0]["c"]), pids  # its own workers
    assert (pids[0]["b"] | pids[0]["c"]) & (pids[1]["b"] | pids[1]["c"]), pids  # the next
    for tmp in NODE_TMPDIRS:  # a node unpacking a tree removed those unused for a day
        trees = tmp / f"hfbuild-ray-trees-{os.getuid()}"
        assert not (trees / f"stale-{day}").exists() and (trees / f"fresh-{day}").is_dir(), tmp
    for rows, value in ((first, 1), (second, 2)):
        assert [set(rows[s]["v"]) for s in ("a", "b", "c")] == [{value}] * 3
        assert set(rows["a"]["env"]) == {"from the driver"}
        assert set(rows["b"]["env"]) == set(rows["c"]["env"]) == {"$WARM_A"}


def test_a_nodes_trees_unused_within_the_keep_time_are_collected_and_held_ones_kept(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's gc task (`raynodes.collect_node`, what `hfbuild gc` runs on each node)
    removes the trees no task used within the keep time (a dry run only names them); it keeps
    a fresh one, one a task used a moment ago (its use marks it), and one a task holds now
    however old its mark (kept after it too: a task marks its tree as it ends); a task's copy
    of a tree (`raywarm._own_copy`) likewise, by its own mark and lock; the bytes named are
    those the removal frees (a copy's files are hard links to its tree's)."""
    from hfbuild.builds import raywarm
    from hfbuild.builds.raynodes import collect_node

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    top = pathlib.Path(raywarm.trees_dir())
    for name in ("stale", "fresh", "used", "held"):
        (top / name / "pkg").mkdir(parents=True)
        (top / name / "pkg" / "code.py").write_text(f"NAME = {name!r}\n")
    old = time.time() - 2 * 86400
    for name in ("stale", "used", "held"):
        os.utime(top / name, (old, old))
    for name in ("used", "stale"):
        with raywarm.tree_dir({"tree": [name, [None]], "stage": "s"}):
            pass
        os.utime(top / f"{name}.0", (old, old))  # its task's copy (`_own_copy`), unused since
    os.utime(top / "stale", (old, old))

    def trees() -> list[str]:  # the node's trees, not the tasks' copies of them
        return sorted(p.name for p in top.iterdir() if "." not in p.name)

    with raywarm.tree_dir({"tree": ["held", [None]], "stage": "s"}) as held:
        assert held == str(top / "held.0")  # its task's copy (`_own_copy`)
        for p in (top / "held", held):
            os.utime(p, (old, old))  # a task running for two days
        dry = collect_node([], 86400, True)
        assert trees() == ["fresh", "held", "stale", "used"]
        done = collect_node([], 86400, False)
        assert trees() == ["fresh", "held", "used"]
    # A copy's files are hard links to its tree's: removing a copy whose tree stays frees
    # nothing but directories; a tree removed with its copy counts its bytes once.
    gone = [[f"../{top.name}/stale.0", 0], [f"../{top.name}/used.0", 0]]
    gone.append([f"../{top.name}/stale", len("NAME = 'stale'\n")])
    assert dry["gone"] == done["gone"] == gone
    assert sorted(p.name for p in top.iterdir() if "." in p.name) == ["held.0", "held.0.lock"]
    assert collect_node([], 86400, False)["gone"] == []  # tasks mark them as they end


def test_a_task_builds_in_a_copy_of_its_tree_no_other_task_opens(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two tasks of one tree on a node at once (a node of several CPUs, one stage's tasks):
    each runs in a copy of the tree of its own (`raywarm._own_copy`), so what the other one
    does there (taking its place, its imports listing the tree, its build listing or reading
    a folder) is not seen by this one's watch (inotify reports any process's opens) as its
    build's listings or reads: a recording around the first sees none of the second's."""
    from hfbuild.builds import raywarm
    from hfbuild.source import observe

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    top = pathlib.Path(raywarm.trees_dir())
    (top / "t" / "data").mkdir(parents=True)
    (top / "t" / "data" / "a.txt").write_text("a\n")
    job = {"tree": ["t", [None]], "stage": "s"}
    other = (
        "import os, tempfile\n"
        f"tempfile.tempdir = {str(tmp_path)!r}\n"
        "from hfbuild.builds import raywarm\n"
        f"with raywarm.tree_dir({job!r}) as root:\n"
        "    os.listdir(root)  # its imports list it, as its build may\n"
        "    open(os.path.join(root, 'data', 'a.txt')).read()\n"
        "    print(root)\n"
    )
    with (
        raywarm.tree_dir(job) as root,
        observe.recording(root, [], str(tmp_path / "spool"), True) as rec,
    ):
        out = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True)
        time.sleep(0.1)  # the watch's events read
        assert (rec.collect_listings(), rec.collect()) == (set(), set()), out.stderr
    assert (root, out.stdout.strip()) == (str(top / "t.0"), str(top / "t.1"))
    assert sorted(p.name for p in top.iterdir()) == ["t", "t.0", "t.0.lock", "t.1", "t.1.lock"]
    assert (top / "t.1" / "data" / "a.txt").read_text() == "a\n"
