"""Per-task overhead of the Ray executor against the local one, on many tiny shards.

Run: `.venv/bin/python bench/bench_ray.py [--shards N]` (Ray comes with the test extra). In
one go, in a temporary git repository: N tiny parquet files (10 rows each, so the time is all
overhead), loaded by one sharded load stage (`raw`, N shards) and mapped by one sharded map
stage (`m`, N shards). Each executor builds them in a fresh clone and store, stage by stage
(`hfbuild build raw`, then `hfbuild build m`), timed separately: the local one in this
process (`shardbuild`), the Ray one as one task per shard on a one-node Ray cluster on
loopback (1 CPU; started before timing) with a file:// remote. Printed: seconds per shard
for each stage and executor, the ratios (the anchor is the local executor) and the time
each Ray task adds. Each Ray task pays for a round trip, the worker recomputing the shard's
key from the shipped tree, pulling its input shard (a load shard: its data file, sent with
the task), pushing its result to the remote and the driver pulling it back; all the shards
of a stage share one shipped tree. On one small machine no speedup is expected, only the
cost of going distributed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

PY = sys.executable
BIN = pathlib.Path(PY).parent

TRANSFORMS = """
def add(batch, k):
    return {"y": [x + k for x in batch["x"]]}
"""

DODO = """
import hfbuild
from hfbuild import Pipeline
import transforms as t

pipe = Pipeline()
raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
pipe.map("m", raw, t.add, {"k": 1}, batched=True)


def task_preprocess():
    yield from pipe.tasks()
"""


def _git(cwd: pathlib.Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def _project(base: pathlib.Path, n: int) -> pathlib.Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = base / "src"
    (src / "data").mkdir(parents=True)
    (src / "transforms.py").write_text(textwrap.dedent(TRANSFORMS))
    (src / "dodo.py").write_text(textwrap.dedent(DODO))
    for i in range(n):
        xs = list(range(10 * i, 10 * i + 10))
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
        raise SystemExit(f"{stage} was not built as {n} Ray tasks:\n{out.stderr}")
    return seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=200)
    args = ap.parse_args()
    n = args.shards
    with tempfile.TemporaryDirectory(prefix="hfbuild-bench-ray-") as d:
        base = pathlib.Path(d)
        src = _project(base, n)
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

        port = _free_port()
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
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            ray_env = {
                **env,
                "RAY_ADDRESS": f"127.0.0.1:{port}",
                "HFBUILD_REMOTE": f"file://{base / 'remote'}",
            }
            _wait(ray_env)
            on_ray = _build(_clone(src, base / "ray-clone"), ray_env, "ray")
        finally:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
    print(f"{n} tiny shards per stage; Ray: one task per shard on a 1-CPU node")
    for i, stage in enumerate(("load (raw)", "map (m)")):
        lo, ra = local[i], on_ray[i]
        print(
            f"{stage:10}  local {lo:7.2f} s ({lo / n * 1000:6.1f} ms/shard)   "
            f"ray {ra:7.2f} s ({ra / n * 1000:6.1f} ms/shard)   ratio ray/local {ra / lo:6.2f}x"
            f"   (+{(ra - lo) / n * 1000:.1f} ms per task)"
        )


def _wait(env: dict[str, str]) -> None:
    code = "import ray; ray.init(logging_level='ERROR'); print(len(ray.nodes()))"
    for _ in range(60):
        if subprocess.run([PY, "-c", code], env=env, capture_output=True).returncode == 0:
            return
        time.sleep(1)
    raise SystemExit("the Ray head did not come up")


if __name__ == "__main__":
    main()
