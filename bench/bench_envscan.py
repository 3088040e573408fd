"""The cost of finding environment-variable reads in the static scan of closure files.

Run: `.venv/bin/python bench/bench_envscan.py`. Anchor: parsing a file and scanning its imports,
which every closure file costs in every process (scans are memoized by blob id within one).
Measured: the extra walk `env_reads` makes over a file that imports os (others skip it).
Corpus: the installed `datasets` package's modules, real code of the size a project has.
"""

from __future__ import annotations

import ast
import glob
import os
import pathlib
import statistics
import time

import datasets

from hfbuild.source.importscan import env_reads, scan_tree


def main() -> None:
    files = sorted(
        glob.glob(os.path.join(os.path.dirname(datasets.__file__), "**/*.py"), recursive=True)
    )
    sources = [pathlib.Path(f).read_bytes() for f in files]
    with_os = 0
    anchor, extra = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        trees = [ast.parse(s) for s in sources]
        scans = [scan_tree(t) for t in trees]
        t1 = time.perf_counter()
        for tree, scan in zip(trees, scans, strict=True):
            if any(r.module.split(".")[0] == "os" for r in scan.imports if not r.level):
                env_reads(tree)
        t2 = time.perf_counter()
        # scan_tree includes the env walk for files importing os: take it out of the anchor.
        anchor.append((t1 - t0) - (t2 - t1))
        extra.append(t2 - t1)
        with_os = sum(any(r.module.split(".")[0] == "os" for r in s.imports) for s in scans)
    lines = sum(s.count(b"\n") for s in sources)
    a, e = statistics.median(anchor), statistics.median(extra)
    print(f"{len(files)} files, {lines} lines, {with_os} import os")
    print(f"parse + import scan (anchor): {a * 1000:.1f} ms")
    print(f"env-read walk (hfbuild):      {e * 1000:.1f} ms")
    print(f"ratio env / anchor: {e / a:.2f}")


if __name__ == "__main__":
    main()
