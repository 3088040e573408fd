"""Growing data (issue #11): rebuild only the new shards. Every figure with its anchor and
ratio, in one run.

Run: `.venv/bin/python bench/bench_incremental.py` (`--quick` for smaller shapes). Each shape
is a real git repository in a temporary directory; every time is a fresh `doit run
preprocess` process (wall clock, start-up included), over load -> batched map -> filter:

- (a) 100 files x 10,000 rows: the rebuild after appending one file / the cold build
  (the issue's bound: <= 1/20);
- (b) 1,000 files x 20 rows: the same ratio (bound: <= 1/50);
- (c) the no-op run of the 1,000-shard pipeline / the no-op of the same pipeline over one
  file (bound: <= 2);
- (d) the cold build of (a)'s sharded chain / a plain `datasets` script doing the same over the
  same files, results saved with `save_to_disk` (bound: <= 1.10).
"""

from __future__ import annotations

import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

DODO = """
from hfbuild import Pipeline
import transforms

pipe = Pipeline()
raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
feat = pipe.map("feat", raw, transforms.feat, batched=True)
kept = pipe.filter("kept", feat, transforms.keep, batched=True)


def task_preprocess():
    yield from pipe.tasks()
"""

TRANSFORMS = """
def feat(batch):
    return {"y": [x * 3 + 1 for x in batch["x"]]}


def keep(batch):
    return [y % 7 != 0 for y in batch["y"]]
"""

PLAIN = """
import sys, glob, datasets
import transforms
datasets.disable_caching()
ds = datasets.load_dataset("parquet", data_files=sorted(glob.glob("data/*.parquet")),
                           split="train", cache_dir=sys.argv[1] + "/hf")
ds = ds.map(transforms.feat, batched=True)
ds = ds.filter(transforms.keep, batched=True)
ds.save_to_disk(sys.argv[1] + "/out")
"""


def git(cwd: pathlib.Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def write_part(root: pathlib.Path, i: int, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    xs = list(range(i * rows, (i + 1) * rows))
    pq.write_table(pa.table({"x": xs}), root / "data" / f"part-{i:05d}.parquet")


def project(root: pathlib.Path, files: int, rows: int) -> pathlib.Path:
    root.mkdir(parents=True)
    (root / "data").mkdir()
    (root / "dodo.py").write_text(textwrap.dedent(DODO))
    (root / "transforms.py").write_text(textwrap.dedent(TRANSFORMS))
    (root / "plain.py").write_text(textwrap.dedent(PLAIN))
    for i in range(files):
        write_part(root, i, rows)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "data")
    return root


def timed(root: pathlib.Path, *cmd: str) -> float:
    # Offline, both sides: `load_dataset` pings the Hub's download counter, which measures
    # the network (a failing DNS lookup here), not the build.
    env = {
        **os.environ,
        "HFBUILD_NO_REMOTE": "1",
        "PYTHONPATH": str(root),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    took = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return took


def doit(root: pathlib.Path) -> float:
    return timed(root, sys.executable, "-m", "doit", "run", "preprocess")


def append(root: pathlib.Path, i: int, rows: int) -> None:
    write_part(root, i, rows)
    git(root, "add", "-A")
    git(root, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "grow")


def grow(tmp: pathlib.Path, name: str, files: int, rows: int) -> tuple[float, float]:
    """(cold build, rebuild after appending one file)."""
    root = project(tmp / name, files, rows)
    cold = doit(root)
    append(root, files, rows)
    return cold, doit(root)


def noop(root: pathlib.Path, n: int = 5) -> float:
    return statistics.median(doit(root) for _ in range(n))


def main() -> None:
    quick = "--quick" in sys.argv
    a_files, a_rows = (20, 10_000) if quick else (100, 10_000)
    b_files, b_rows = (200, 20) if quick else (1_000, 20)
    rows: list[tuple[str, float, str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="hfbuild-incr-") as t:
        tmp = pathlib.Path(t)
        cold, again = grow(tmp, "a", a_files, a_rows)
        rows.append((f"(a) append 1 to {a_files}x{a_rows:,}", again, "cold build", cold, "0.05"))
        plain_root = tmp / "a"
        (plain_root / "data" / f"part-{a_files:05d}.parquet").unlink()  # the cold build's files
        plain = statistics.median(
            timed(plain_root, sys.executable, "plain.py", str(tmp / f"plain{i}")) for i in range(3)
        )
        cold_d = project(tmp / "d", a_files, a_rows)
        sharded = statistics.median([doit(cold_d)] + [_cold_again(cold_d) for _ in range(2)])
        cold_b, again_b = grow(tmp, "b", b_files, b_rows)
        rows.append((f"(b) append 1 to {b_files}x{b_rows}", again_b, "cold build", cold_b, "0.02"))
        noop_many = noop(tmp / "b")
        one = project(tmp / "one", 1, b_rows)
        doit(one)
        rows.append(
            (f"(c) no-op, {b_files + 1} shards", noop_many, "no-op, 1 file", noop(one), "2")
        )
        rows.append(("(d) cold sharded chain", sharded, "plain datasets", plain, "1.10"))
    width = max(len(r[0]) for r in rows)
    aw = max(len(r[2]) for r in rows)
    print(
        f"\n{'figure':<{width}}  {'hfbuild s':>9}  {'anchor':<{aw}}  {'anchor s':>9}  ratio  bound"
    )
    for name, value, anchor, anchor_value, bound in rows:
        print(
            f"{name:<{width}}  {value:>9.3f}  {anchor:<{aw}}  {anchor_value:>9.3f}  "
            f"{value / anchor_value:5.3f}  <= {bound}"
        )


def _cold_again(root: pathlib.Path) -> float:
    import shutil

    shutil.rmtree(root / ".hfbuild")
    return doit(root)


if __name__ == "__main__":
    main()
