"""hfbuild.fingerprint vs datasets' Hasher on a function that reads a 1M-entry global dict.

Run: `make bench` or `.venv/bin/python bench/bench_fingerprint.py`. Target (issue #2): hfbuild
costs at most 1/50 of the Hasher. The function lives in a user's script, committed in a
temporary git repository and run there as __main__ (so dill pickles it by value, dragging the
dict along, while hfbuild reads the script's git blob id); both are timed in that one process.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

SCRIPT = """
import statistics
import time
import warnings

import hfbuild

TABLE = {f"token-{i}": i for i in range(1_000_000)}


def lookup(example):
    return {"id": TABLE.get(example["text"], -1)}


def timed(fn, repeat):
    t0 = time.perf_counter()
    fn()
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    return cold, statistics.median(warm)


if __name__ == "__main__":
    from datasets.fingerprint import Hasher

    warnings.simplefilter("error", hfbuild.DirtyTreeWarning)  # the script is committed
    h_cold, h_warm = timed(lambda: Hasher.hash(lookup), 3)
    f_cold, f_warm = timed(lambda: hfbuild.fingerprint(lookup, {"k": 1}), 20)
    print(f"datasets Hasher.hash      cold {h_cold * 1e3:9.2f} ms   warm {h_warm * 1e3:9.2f} ms")
    print(f"hfbuild.fingerprint       cold {f_cold * 1e3:9.2f} ms   warm {f_warm * 1e3:9.2f} ms")
    print(f"ratio hfbuild/Hasher      cold {f_cold / h_cold:9.4f}      warm {f_warm / h_warm:9.4f}"
          f"   (target <= 0.02)")
"""


def main() -> None:
    work = pathlib.Path(tempfile.mkdtemp(prefix="hfbuild-bench-fp-"))
    (work / "job.py").write_text(textwrap.dedent(SCRIPT))
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "b",
        "GIT_AUTHOR_EMAIL": "b@b",
        "GIT_COMMITTER_NAME": "b",
        "GIT_COMMITTER_EMAIL": "b@b",
        "HF_DATASETS_OFFLINE": "1",
    }
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "job"]):
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "job.py"], cwd=work, env=env, check=True)


if __name__ == "__main__":
    main()
