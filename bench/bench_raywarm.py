"""A Ray task's place on its node (`raywarm.tree_dir`) alone: what taking it costs a task.

Run: `.venv/bin/python bench/bench_raywarm.py [--files N] [--repeat K]`. A tree of N files
(1 KB each, 50 to a directory, a few directories deep) is put in place under a temporary
`hfbuild-ray-trees-<uid>` as a node's unpack leaves it, then, K times each, timed (ms):

- `held`: `tree_dir` entered and left with the tree in place, as every task of a tree on a
  node after its first (and, if the code gives each task a copy of its own, `_own_copy`,
  with that copy kept from the task before: the slot reused);
- `fresh slot`: the same with the task's copy removed first (`<digest>.0`, if the code makes
  one): what a slot's first task pays to make it (hard links, its directories its own);
- `unpack`: the tree's tar extracted (`tarfile`, `filter="data"`, as `raywarm._unpack`
  does, less Ray's fetch), what a node's first task of a tree pays, for scale.

Medians and spreads printed. `BENCH_PYTHONPATH=<another checkout>` measures that checkout's
`raywarm` (its path printed): alternate the two and compare the medians.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import shutil
import statistics
import sys
import tarfile
import tempfile
import time

if os.environ.get("BENCH_PYTHONPATH"):  # ahead of the editable install's finder
    sys.path.insert(0, os.environ["BENCH_PYTHONPATH"])


def _tree(root: pathlib.Path, files: int) -> None:
    """`files` files of 1 KB, 50 to a directory, two levels of directories."""
    (root / "dodo.py").write_text("# a project's tasks\n")
    for i in range(files - 1):
        d = root / f"d{i // 500}" / f"e{(i // 50) % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_bytes(b"x" * 1024)


def _ms(fn: object, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()

    base = tempfile.mkdtemp(prefix="hfbuild-bench-raywarm-")
    tempfile.tempdir = base
    from hfbuild.builds import raywarm

    try:
        top = pathlib.Path(raywarm.trees_dir())
        src = pathlib.Path(base) / "src"
        src.mkdir()
        _tree(src, args.files)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:") as tar:
            tar.add(src, arcname=".")
        packed = buf.getvalue()
        name = raywarm.digest(packed)
        top.mkdir(parents=True)
        shutil.copytree(src, top / name)
        job = {"tree": [name, [None]], "stage": "s"}

        def held() -> None:
            with raywarm.tree_dir(job):
                pass

        def fresh() -> None:
            shutil.rmtree(top / f"{name}.0", ignore_errors=True)
            t0 = time.perf_counter()
            with raywarm.tree_dir(job):
                pass
            spent[0] += time.perf_counter() - t0

        def unpack() -> None:  # the extract only: its removal is not timed
            part = tempfile.mkdtemp(dir=base)
            with tarfile.open(fileobj=io.BytesIO(packed), mode="r:") as tar:
                tar.extractall(part, filter="data")
            removals.append(part)

        held()  # a slot, if any, made once
        spent = [0.0]
        removals: list[str] = []
        rows = {"held": _ms(held, args.repeat)}
        fresh_times = []
        for _ in range(args.repeat):
            spent[0] = 0.0
            fresh()
            fresh_times.append(spent[0] * 1000)
        rows["fresh slot"] = fresh_times
        rows["unpack"] = _ms(unpack, args.repeat)
        for part in removals:
            shutil.rmtree(part, ignore_errors=True)
        load = os.getloadavg()[0]
        print(f"raywarm: {raywarm.__file__}")
        print(f"tree: {args.files} files, {args.repeat} runs each, load {load:.2f}")
        print("slots there:", sorted(p.name for p in top.iterdir() if "." in p.name))
        for label, xs in rows.items():
            print(
                f"  {label:>10}: median {statistics.median(xs):8.3f} ms "
                f"(min {min(xs):.3f}, max {max(xs):.3f})"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
