"""Per-unit overhead of the Ray executor against the local one, on many tiny units.

Run: `.venv/bin/python bench/bench_ray.py [--units N]` (Ray comes with the test extra). In one
go, in a temporary git repository: a pipeline of one tiny load stage and N tiny map stages
(10 rows each, so the time is all overhead), built once by `hfbuild build --executor local`
in a fresh clone and store, and once by `hfbuild build --executor ray` in another fresh clone,
on a one-node Ray cluster on loopback (1 CPU; started before timing) with a file:// remote.
Printed: seconds per unit for each, and the ratio (the anchor is the local executor). Each
Ray unit pays for a task round trip, the worker recomputing the key from the shipped tree,
pushing its result to the remote and the driver pulling it back; on one small machine no
speedup is expected, only the cost of going distributed.
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
raw = pipe.load("raw", "parquet", data_files="data/tiny.parquet", split="train")
for i in range({n}):
    pipe.map(f"m{{i}}", raw, t.add, {{"k": i}}, batched=True)


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
    (src / "dodo.py").write_text(textwrap.dedent(DODO.format(n=n)))
    pq.write_table(pa.table({"x": list(range(10))}), src / "data" / "tiny.parquet")
    _git(src, "init", "-q", "-b", "main")
    _git(src, "add", "-A")
    _git(src, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "bench")
    return src


def _clone(src: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    _git(src.parent, "clone", "-q", str(src), str(dest))
    return dest


def _build(clone: pathlib.Path, env: dict[str, str], executor: str) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(
        [str(BIN / "hfbuild"), "build", "--executor", executor],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"hfbuild build --executor {executor} failed:\n{out.stderr}")
    return seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=200)
    args = ap.parse_args()
    n = args.units
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
    units = n + 1
    print(f"{units} tiny units (1 load + {n} maps), one process building them in turn")
    print(f"local executor: {local:7.2f} s  ({local / units * 1000:7.1f} ms per unit)")
    print(f"ray executor:   {on_ray:7.2f} s  ({on_ray / units * 1000:7.1f} ms per unit)")
    print(f"ratio ray/local: {on_ray / local:.2f}x")


def _wait(env: dict[str, str]) -> None:
    code = "import ray; ray.init(logging_level='ERROR'); print(len(ray.nodes()))"
    for _ in range(60):
        if subprocess.run([PY, "-c", code], env=env, capture_output=True).returncode == 0:
            return
        time.sleep(1)
    raise SystemExit("the Ray head did not come up")


if __name__ == "__main__":
    main()
