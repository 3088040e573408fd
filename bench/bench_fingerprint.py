"""hfbuild.fingerprint vs datasets' Hasher on a function that reads a 1M-entry global dict.

Run: `make bench` or `.venv/bin/python bench/bench_fingerprint.py` from the repo root.
Target (issue #2): hfbuild costs at most 1/50 of the Hasher. Both run in this one process, on
the same function; this file runs as __main__, so dill pickles the function by value,
dragging the dict along, while hfbuild reads this file's git blob id.
"""

from __future__ import annotations

import statistics
import time
import warnings

import hfbuild

TABLE = {f"token-{i}": i for i in range(1_000_000)}


def lookup(example: dict[str, str]) -> dict[str, int]:
    return {"id": TABLE.get(example["text"], -1)}


def timed(fn, repeat: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    return cold, statistics.median(warm)


def main() -> None:
    from datasets.fingerprint import Hasher

    warnings.simplefilter("ignore", hfbuild.DirtyTreeWarning)
    h_cold, h_warm = timed(lambda: Hasher.hash(lookup), 3)
    f_cold, f_warm = timed(lambda: hfbuild.fingerprint(lookup, {"k": 1}), 20)
    print(f"datasets Hasher.hash      cold {h_cold * 1e3:9.2f} ms   warm {h_warm * 1e3:9.2f} ms")
    print(f"hfbuild.fingerprint       cold {f_cold * 1e3:9.2f} ms   warm {f_warm * 1e3:9.2f} ms")
    print(
        f"ratio hfbuild/Hasher      cold {f_cold / h_cold:9.4f}      warm {f_warm / h_warm:9.4f}"
        f"   (target <= 0.02)"
    )


if __name__ == "__main__":
    main()
