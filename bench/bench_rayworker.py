"""A Ray task's worker side alone: one task of N tiny shards, no Ray (issue #23 item 4).

Run: `.venv/bin/python bench/bench_rayworker.py [--shards N] [--repeat K] [--stage m|raw]
[--profile DIR]`. In a temporary git repository of N parquet files of 10 rows, the load
`raw` is built locally (one pack) and pushed to a file:// remote, and a task of the N shards
of the map `m` (or, with `--stage raw`, of the load itself, each with its data file) is
prepared as the Ray driver prepares it (`ray_executor.shards_args`, the tree `raytree`
ships). Then, K times, the task
runs in this process (datasets imported first, as in a warm worker), in a fresh node store,
pushing to a fresh copy of the remote:
`rayworker.run_shards`, as a Ray worker runs it. Printed, per run: milliseconds per shard
and the worker's own timings per shard (each result's "timings": input, key, build, push);
with `--profile`, each run's cProfile stats in DIR.

To compare two versions of the code, run this script with each one's venv (a venv whose
editable install points at the other code), alternated, and compare the medians.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

PREPARE = """
import json, os, shutil, sys, warnings
warnings.simplefilter("ignore")
import dodo
from hfbuild.builds import ray_executor, raytree
from hfbuild.builds.stage import build
from hfbuild.builds.units import Unit
from hfbuild.store.remote import Remote

pipe = dodo.pipe
build(pipe, "raw")
ms = pipe.manifests()
stage = sys.argv[3]
m, spec = ms[stage], pipe[stage].spec
remote = Remote(sys.argv[1])
ins = {"raw": ms["raw"]} if stage == "m" else {}
units = [Unit(spec, m, ins, s, 0) for s in m.shard_list]
common, spec_bytes, parts, datas = ray_executor.shards_args(pipe.place, remote, units)
for i, d in enumerate(datas):
    if d is not None:
        with open(os.path.join(sys.argv[2], f"data-{i}"), "wb") as f:
            f.write(d)
for p in {p["input_pack"]["key"] for p in parts if "input_pack" in p}:
    remote.push(pipe.store, p, "pack")
with raytree.tree(pipe.place, raytree.shipped_files(m, units[0].shard)) as d:
    shutil.copytree(d, os.path.join(sys.argv[2], "tree"))
with open(os.path.join(sys.argv[2], "task.json"), "w") as f:
    json.dump({"job": common, "parts": parts}, f)
with open(os.path.join(sys.argv[2], "spec"), "wb") as f:
    f.write(spec_bytes)
"""


def _project(base: pathlib.Path, n: int) -> pathlib.Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = base / "proj"
    (src / "data").mkdir(parents=True)
    (src / "transforms.py").write_text("def add(row, k):\n    return {'y': row['x'] + k}\n")
    dodo = """
        from hfbuild import Pipeline
        import transforms as t
        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        pipe.map("m", raw, t.add, {"k": 1})
        """
    (src / "dodo.py").write_text(textwrap.dedent(dodo))
    for i in range(n):
        xs = list(range(10 * i, 10 * i + 10))
        pq.write_table(pa.table({"x": xs}), src / "data" / f"part-{i:04d}.parquet")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"]):
        subprocess.run(["git", *args], cwd=src, check=True, capture_output=True)
    who = ["-c", "user.name=b", "-c", "user.email=b@b"]
    subprocess.run(["git", *who, "commit", "-qm", "x"], cwd=src, check=True, capture_output=True)
    return src


def _run(base: pathlib.Path, k: int, profile: str = "") -> tuple[float, dict[str, float]]:
    """The task in this process, in a fresh node store, pushing to a fresh copy of the
    remote (a map's: its input's pack only); (seconds, timings summed). `profile`: a file
    for its cProfile stats."""
    os.environ["HFBUILD_STORE"] = str(base / f"store-{k}")
    from hfbuild.builds.rayworker import run_shards

    task = json.loads((base / "task.json").read_text())
    remote = base / f"remote-{k}"
    if (base / "remote").exists():  # a map's input pack
        shutil.copytree(base / "remote", remote)
    task["job"]["remote"] = f"file://{remote}"
    spec = (base / "spec").read_bytes()
    n = len(task["parts"])
    datas = [_data(base / f"data-{i}") for i in range(n)]
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    summed: dict[str, float] = {}
    for res in run_shards(task["job"], spec, task["parts"], datas):
        if "fingerprint" not in res:
            raise SystemExit(f"the task failed: {res}")
        for k, v in (res.get("timings") or {}).items():
            summed[k] = summed.get(k, 0.0) + float(v)
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile)
    return time.perf_counter() - t0, summed


def _data(path: pathlib.Path) -> bytes | None:
    """A load shard's data file as the driver sends it (None for a map shard)."""
    return path.read_bytes() if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--stage", choices=("m", "raw"), default="m", help="the map (m) or the load (raw)"
    )
    parser.add_argument("--profile", metavar="DIR", help="each run's cProfile stats in DIR")
    args = parser.parse_args()
    n = args.shards
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hfbuild-bench-rayworker-") as tmp:
        base = pathlib.Path(tmp)
        src = _project(base, n)
        env = {**os.environ, "PYTHONPATH": str(src), "HFBUILD_NO_REMOTE": ""}
        prep = [sys.executable, "-c", PREPARE, f"file://{base}/remote", str(base), args.stage]
        out = subprocess.run(prep, cwd=src, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"preparing the task failed:\n{out.stderr[-3000:]}")
        import datasets  # noqa: F401  (imported, as in a warm worker)

        here = os.getcwd()
        os.chdir(base / "tree")
        per: list[float] = []
        try:
            for k in range(args.repeat):
                prof = os.path.join(args.profile, f"run-{k}.prof") if args.profile else ""
                took, summed = _run(base, k, prof)
                shutil.rmtree(base / f"store-{k}", ignore_errors=True)
                shutil.rmtree(base / f"remote-{k}", ignore_errors=True)
                per.append(1000 * took / n)
                parts = "  ".join(f"{p} {1000 * v / n:.1f}" for p, v in sorted(summed.items()))
                print(f"run {k + 1}: {per[-1]:.1f} ms a shard   worker/shard: {parts}")
        finally:
            os.chdir(here)
    what = "map" if args.stage == "m" else "load"
    print(f"{n} {what} shards in one task: median {statistics.median(per):.1f} ms a shard")


if __name__ == "__main__":
    main()
