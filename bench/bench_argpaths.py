"""What keying paths in arguments (argpaths.py, issue #18 item 2) costs when nothing is a path.

Run: `.venv/bin/python bench/bench_argpaths.py` from the repository root. Prints, in CPU time:

- the paths check over a 100,000-key dict of strings encoded as an argument (no key names a
  project file), against encoding that dict: the check must stay a small part of it;
- the demo pipeline's manifests (this repository's dodo.py) with and without the paths part,
  median of 40: the difference is what a no-op pays for it.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any


def cpu(fn: Callable[[], Any], repeat: int) -> float:
    """Median CPU seconds of `fn()`."""
    out = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return statistics.median(out)


def main() -> None:
    sys.path.insert(0, os.getcwd())
    warnings.simplefilter("ignore")
    from hfbuild.core import canonical
    from hfbuild.keys import argpaths
    from hfbuild.keys.manifests import compute, stage_manifest
    from hfbuild.source.datafiles import StatCache
    from hfbuild.source.gitstate import Snapshot

    snap = Snapshot(os.getcwd())
    table = {f"token-{i}": i for i in range(100_000)}
    enc = canonical.encode(table, root=snap.root)
    tree = {"fn_kwargs": enc}
    encode = cpu(lambda: canonical.encode(table, root=snap.root), 3)
    check = cpu(lambda: argpaths.paths_part([(argpaths.ARGS, tree)], snap, StatCache(None)), 5)
    print(
        f"100k-key dict argument: encode {encode * 1000:.1f} ms, paths check {check * 1000:.1f} ms"
    )

    import dodo  # the demo pipeline

    pipe = dodo.pipe

    def manifests() -> None:
        s = Snapshot(pipe.root)
        lookup = pipe.ledger.lookup()  # inputs' results, as Pipeline.manifests reads them
        compute(
            pipe.specs,
            lambda spec, done: stage_manifest(spec, s, done, pipe.stat_cache, lookup=lookup),
        )

    with_part = cpu(manifests, 40)
    real = argpaths.paths_part
    argpaths.paths_part = lambda *a, **k: []  # type: ignore[assignment]
    without = cpu(manifests, 40)
    argpaths.paths_part = real
    print(
        f"demo manifests ({len(pipe.specs)} stages): with the paths part {with_part * 1000:.2f} ms,"
        f" without {without * 1000:.2f} ms (median CPU of 40)"
    )


if __name__ == "__main__":
    main()
