"""Per-shard overhead of the Ray executor against the local one, with an S3 remote (moto).

Run: `.venv/bin/python bench/bench_ray.py [--shards N] [--big M]` (Ray and moto come with
the test extra). In one go, in a temporary git repository, with a moto S3 server on loopback
as the remote and a one-node Ray cluster (1 CPU; started before timing):

1. N tiny parquet files (10 rows each, so the time is all overhead), loaded by one sharded
   load stage (`raw`, N shards) and mapped by one sharded map stage (`m`, N shards). Each
   executor builds them in a fresh clone and store, stage by stage (`hfbuild build raw`,
   then `hfbuild build m`), timed separately: the local one (the anchor, no remote), then the
   Ray one, whose tasks each build several shards (`ray_executor.coalesce`). Printed: seconds
   per shard for each, the ratio ray/local and the overhead per shard, (ray - local) / N.
2. A stage of M tiny shards (a load of M files) built through Ray in a fresh clone: the
   driver's own time in the Ray executor (checking the remote for each shard, uploading the
   tree, submitting, pulling what the tasks published that arrived after the last task was
   done, the stage's list, pushing it), that is the executor's time less connecting to the
   cluster and less the span from the first submission waited on to the last shard's
   result (the tasks' own work, with the pulls made meanwhile).

Each task pays for a round trip, the worker's setup, and per shard recomputing its key
from the shipped tree and its input (a load shard: its data file, sent with the task; a map
shard: read in place from its input's pack, pulled once per task); a task's load shards are
loaded by one call, its map shards built together under one observation (`raymaps`), each
written as a pack, one entry for up to 64 shards, which travel back with the results when
small. On one small
machine no speedup is expected, only the cost of going distributed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

PY = sys.executable
BIN = pathlib.Path(PY).parent

TRANSFORMS = """
def add(row, k):
    return {"y": row["x"] + k}
"""

DODO = """
import hfbuild
from hfbuild import Pipeline
import transforms as t

pipe = Pipeline()
raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
pipe.map("m", raw, t.add, {"k": 1})


def task_preprocess():
    yield from pipe.tasks()
"""


def _git(cwd: pathlib.Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def _project(base: pathlib.Path, n: int, first: int = 0) -> pathlib.Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = base / "src"
    (src / "data").mkdir(parents=True)
    (src / "transforms.py").write_text(textwrap.dedent(TRANSFORMS))
    (src / "dodo.py").write_text(textwrap.dedent(DODO))
    for i in range(n):
        xs = list(range(first + 10 * i, first + 10 * i + 10))
        pq.write_table(pa.table({"x": xs}), src / "data" / f"part-{i:04d}.parquet")
    _git(src, "init", "-q", "-b", "main")
    _git(src, "add", "-A")
    _git(src, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "bench")
    return src


def _clone(src: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    _git(src.parent, "clone", "-q", str(src), str(dest))
    return dest


def _build(clone: pathlib.Path, env: dict[str, str], executor: str) -> tuple[float, float]:
    """Seconds to build `raw`, then `m`."""
    return _build_one(clone, env, executor, "raw"), _build_one(clone, env, executor, "m")


def _build_one(clone: pathlib.Path, env: dict[str, str], executor: str, stage: str) -> float:
    n = len(list((clone / "data").iterdir()))
    REQUESTS.clear()
    marks = _timed(clone, env, executor, stage, n)
    marks.update({f"requests {k}": v for k, v in REQUESTS.items()})
    MARKS[f"{stage} ({executor})"] = marks
    return marks["total"]


# Each run's marks (see TIMED), by "stage (executor)", for the breakdown `--profile` prints.
MARKS: dict[str, dict[str, float]] = {}


TIMED = """
import json, os, sys, time
from hfbuild.builds import ray_executor as rx

marks = {"connect": 0.0, "results": 0}
worker = {}
connect, result, wait, build = rx._connect, rx._result, rx._wait, rx.RayExecutor.build

def timed_connect():
    t = time.perf_counter()
    connect()
    marks["connect"] += time.perf_counter() - t

def timed_result(*a):
    r = result(*a)
    marks["last"] = time.perf_counter()
    marks.setdefault("first", marks["last"])
    marks["results"] += 1
    for k, v in (r.get("timings") or {}).items():
        worker[k] = worker.get(k, 0.0) + v
    return r

def timed_wait(*a, **k):
    marks.setdefault("wait", time.perf_counter())
    return wait(*a, **k)

def timed_build(self, place, unit):
    t = marks["start"] = time.perf_counter()
    try:
        return build(self, place, unit)
    finally:
        marks["end"] = time.perf_counter()
        marks["build"] = marks["end"] - t

if os.environ["BENCH_EXECUTOR"] == "ray":  # the local anchor runs untouched
    rx._connect, rx._result, rx._wait, rx.RayExecutor.build = (
        timed_connect, timed_result, timed_wait, timed_build
    )
from hfbuild.cli.main import main

stage, executor = os.environ["BENCH_STAGE"], os.environ["BENCH_EXECUTOR"]
sys.argv = ["hfbuild", "build", stage, "--executor", executor]
profile = os.environ.get("BENCH_PROFILE")
if profile:
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
try:
    code = main()
except SystemExit as e:
    code = e.code
if profile:
    prof.disable()
    prof.dump_stats(profile)
marks.update({"worker_" + k: v for k, v in worker.items()})
with open(os.environ["BENCH_MARKS"], "w") as f:
    json.dump(marks, f)
sys.exit(code or 0)
"""


def _timed(
    clone: pathlib.Path, env: dict[str, str], executor: str, stage: str, n: int
) -> dict[str, float]:
    """`hfbuild build STAGE --executor EXECUTOR` in `clone` (a stage of `n` shards), with the
    Ray executor's marks (TIMED); "total" is the command's wall time. With $BENCH_PROFILE_DIR,
    the driver runs under cProfile, its stats in that directory."""
    marks = clone.parent / f"marks-{clone.name}-{stage}.json"
    extra = {"BENCH_MARKS": str(marks), "PYTHONPATH": str(clone)}
    extra |= {"BENCH_STAGE": stage, "BENCH_EXECUTOR": executor}
    if env.get("BENCH_PROFILE_DIR"):
        extra["BENCH_PROFILE"] = os.path.join(
            env["BENCH_PROFILE_DIR"], f"{clone.name}-{stage}-{executor}.prof"
        )
    t0 = time.perf_counter()
    out = subprocess.run(
        [PY, "-c", TIMED],
        cwd=clone,
        env={**env, **extra},
        capture_output=True,
        text=True,
        check=False,
    )
    total = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"hfbuild build {stage} --executor {executor} failed:\n{out.stderr}")
    if executor == "ray" and f"{stage}: {n}/{n} shards done, {n} built on ray" not in out.stderr:
        raise SystemExit(f"{stage} was not built on Ray:\n{out.stderr}")
    got: dict[str, float] = json.loads(marks.read_text())
    got["total"] = total
    return got


def _bookkeeping(clone: pathlib.Path, env: dict[str, str], n: int) -> dict[str, float]:
    """The Ray executor's marks building the `raw` stage of `n` shards in `clone`."""
    return _timed(clone, env, "ray", "raw", n)


def _s3(env: dict[str, str]) -> tuple[Any, dict[str, str]]:
    """A moto S3 server on loopback (as the tests start one) with a fresh bucket; the server
    and the environment every process using the remote needs."""
    import s3fs
    from moto.server import ThreadedMotoServer

    # One record per request: counted (`REQUESTS`, by method), never printed.
    log = logging.getLogger("werkzeug")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(_Counter())
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    creds = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}",
    }
    fs = s3fs.S3FileSystem(endpoint_url=creds["FSSPEC_S3_ENDPOINT_URL"], key="t", secret="t")
    fs.mkdir("bench")
    return server, {**env, **creds, "HFBUILD_REMOTE": "s3://bench/cache"}


# S3 requests the moto server answered, by method ("GET", "PUT", "HEAD", ...).
REQUESTS: dict[str, int] = {}


class _Counter(logging.Handler):
    """Counts the moto server's request lines ('"GET /bucket/... HTTP/1.1" 200 -')."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # werkzeug colours some
        if '"' in msg:
            method = msg.split('"', 2)[1].split(" ", 1)[0]
            REQUESTS[method] = REQUESTS.get(method, 0) + 1


def _own_ports() -> list[str]:
    """Free ports for every listener of the head: other Ray clusters on the machine (other
    benches, tests) hold Ray's default ones, and a head that cannot bind them dies."""
    out = []
    for flag in (
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--node-manager-port",
        "--object-manager-port",
    ):
        out += [flag, str(_free_port())]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=200, help="shards per stage of part 1")
    ap.add_argument("--big", type=int, default=1000, help="shards of part 2's stage (0: skip)")
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="run each driver under cProfile (stats in DIR) and print where each Ray run's "
        "time went (driver phases, the worker's per-shard timings)",
    )
    args = ap.parse_args()
    n, big = args.shards, args.big
    with tempfile.TemporaryDirectory(prefix="hfbuild-bench-ray-") as d:
        base = pathlib.Path(d)
        src = _project(base / "small", n)
        big_src = _project(base / "big", big, 10**9) if big else None  # rows no other has
        env = {
            **os.environ,
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "TMPDIR": str(base),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            env["BENCH_PROFILE_DIR"] = os.path.abspath(args.profile)
        env.pop("HFBUILD_STORE", None)
        env.pop("HFBUILD_REMOTE", None)
        local_env = {**env, "HFBUILD_NO_REMOTE": "1"}
        local = _build(_clone(src, base / "local"), local_env, "local")

        server, s3_env = _s3(env)
        port = _free_port()
        head_log = open(base / "head.log", "wb")  # noqa: SIM115  (closed with the head)
        head = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                "--port",
                str(port),
                "--num-cpus",
                "1",
                "--node-ip-address",
                "127.0.0.1",
                "--include-dashboard=false",
                "--disable-usage-stats",
                "--object-store-memory",
                str(80 * 1024 * 1024),
                "--temp-dir",
                str(base / "ray"),
                *_own_ports(),
            ],
            env=s3_env,  # every node needs the remote's credentials and endpoint
            stdout=head_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            ray_env = {**s3_env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
            _wait(ray_env, head)
            on_ray = _build(_clone(src, base / "ray-clone"), ray_env, "ray")
            marks = {}
            if big_src is not None:
                REQUESTS.clear()
                marks = _bookkeeping(_clone(big_src, base / "big-clone"), ray_env, big)
                marks.update({f"requests {k}": v for k, v in REQUESTS.items()})
                MARKS[f"raw of {big} (ray)"] = marks
        finally:
            server.stop()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
            head_log.close()
    print(f"{n} tiny shards per stage; Ray: a 1-CPU node, an S3 remote (moto) on loopback")
    for i, stage in enumerate(("load (raw)", "map (m)")):
        lo, ra = local[i], on_ray[i]
        print(
            f"{stage:10}  local {lo:7.2f} s ({lo / n * 1000:6.1f} ms/shard)   "
            f"ray {ra:7.2f} s ({ra / n * 1000:6.1f} ms/shard)   ratio ray/local {ra / lo:6.2f}x"
            f"   overhead {(ra - lo) / n * 1000:+.1f} ms per shard"
        )
    if marks:
        cluster = marks["last"] - marks["wait"]
        own = marks["build"] - marks["connect"] - cluster
        print(
            f"{big}-shard load through Ray: driver's bookkeeping {own:.2f} s "
            f"({own / big * 1000:.2f} ms/shard; the executor {marks['build']:.2f} s, less "
            f"connecting {marks['connect']:.2f} s and the tasks' span {cluster:.2f} s; "
            f"the whole command {marks['total']:.2f} s)"
        )
    if args.profile:
        _breakdown()


def _breakdown() -> None:
    """Where each Ray run's time went: the command, connecting, the driver before its first
    wait, the first result's wait (a new worker: its process, imports, runtime env), the
    tasks' span, the driver after the last result; the worker's own per-shard time by part
    (summed over shards, then per shard)."""
    print("\nwhere the time went (s; worker parts per shard in ms)")
    for run, m in MARKS.items():
        if "wait" not in m:
            continue
        n = max(1, int(m["results"]))
        parts = {
            "command": m["total"],
            "executor": m["build"],
            "connect": m["connect"],
            "before wait": m["wait"] - m["start"] - m["connect"],
            "to 1st result": m["first"] - m["wait"],
            "span": m["last"] - m["wait"],
            "after last": m["end"] - m["last"],
        }
        worker = {k[7:]: v / n * 1000 for k, v in m.items() if k.startswith("worker_")}
        asked = {k[9:]: v / n for k, v in m.items() if k.startswith("requests ")}
        print(
            f"  {run:18} "
            + "  ".join(f"{k} {v:.2f}" for k, v in parts.items())
            + "   worker/shard: "
            + "  ".join(f"{k} {v:.1f}" for k, v in sorted(worker.items()))
            + "   S3 requests/shard: "
            + "  ".join(f"{k} {v:.2f}" for k, v in sorted(asked.items()))
        )


def _wait(env: dict[str, str], head: subprocess.Popen[bytes]) -> None:
    code = "import ray; ray.init(logging_level='ERROR'); print(len(ray.nodes()))"
    for _ in range(60):
        if head.poll() is not None:
            log = pathlib.Path(env["TMPDIR"]) / "head.log"
            raise SystemExit(f"the Ray head exited:\n{log.read_text()[-3000:]}")
        try:
            out = subprocess.run([PY, "-c", code], env=env, capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            continue
        if out.returncode == 0:
            return
        time.sleep(1)
    raise SystemExit("the Ray head did not come up")


if __name__ == "__main__":
    main()
