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
from the shipped tree, pulling its input shard (a load shard: its data file, sent with the
task), pushing its result to the remote, and the driver's checked pull. On one small machine
no speedup is expected, only the cost of going distributed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
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
    t0 = time.perf_counter()
    out = subprocess.run(
        [str(BIN / "hfbuild"), "build", stage, "--executor", executor],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"hfbuild build --executor {executor} failed:\n{out.stderr}")
    n = len(list((clone / "data").iterdir()))
    if executor == "ray" and f"{stage}: {n}/{n} shards done, {n} built on ray" not in out.stderr:
        raise SystemExit(f"{stage} was not built on Ray:\n{out.stderr}")
    return seconds


TIMED = """
import json, os, sys, time
from hfbuild.builds import ray_executor as rx

marks = {"connect": 0.0}
connect, result, wait, build = rx._connect, rx._result, rx._wait, rx.RayExecutor.build

def timed_connect():
    t = time.perf_counter()
    connect()
    marks["connect"] += time.perf_counter() - t

def timed_result(*a):
    r = result(*a)
    marks["last"] = time.perf_counter()
    return r

def timed_wait(*a, **k):
    marks.setdefault("wait", time.perf_counter())
    return wait(*a, **k)

def timed_build(self, place, unit):
    t = time.perf_counter()
    try:
        return build(self, place, unit)
    finally:
        marks["build"] = time.perf_counter() - t

rx._connect, rx._result, rx._wait, rx.RayExecutor.build = (
    timed_connect, timed_result, timed_wait, timed_build
)
from hfbuild.cli.main import main

sys.argv = ["hfbuild", "build", "raw", "--executor", "ray"]
try:
    code = main()
except SystemExit as e:
    code = e.code
with open(os.environ["BENCH_MARKS"], "w") as f:
    json.dump(marks, f)
sys.exit(code or 0)
"""


def _bookkeeping(clone: pathlib.Path, env: dict[str, str], n: int) -> dict[str, float]:
    """The Ray executor's marks building the `raw` stage of `n` shards in `clone`."""
    marks = clone.parent / "marks.json"
    t0 = time.perf_counter()
    out = subprocess.run(
        [PY, "-c", TIMED],
        cwd=clone,
        env={**env, "BENCH_MARKS": str(marks), "PYTHONPATH": str(clone)},
        capture_output=True,
        text=True,
        check=False,
    )
    total = time.perf_counter() - t0
    if out.returncode != 0 or f"raw: {n}/{n} shards done, {n} built on ray" not in out.stderr:
        raise SystemExit(f"the {n}-shard Ray build failed:\n{out.stderr}")
    got: dict[str, float] = json.loads(marks.read_text())
    got["total"] = total
    return got


def _s3(env: dict[str, str]) -> tuple[Any, dict[str, str]]:
    """A moto S3 server on loopback (as the tests start one) with a fresh bucket; the server
    and the environment every process using the remote needs."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
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
                marks = _bookkeeping(_clone(big_src, base / "big-clone"), ray_env, big)
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
