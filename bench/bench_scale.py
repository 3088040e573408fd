"""Flat cost at scale (issue #10): every figure with its anchor and ratio, in one run.

Run: `make bench`, or `.venv/bin/python bench/bench_scale.py [--clock wall|cpu] [--rows N]`.
Two groups of shapes, each built in a temporary directory and measured in fresh processes
(medians of 5, anchors interleaved):

- `scale_repo.py`: a 20,000-file repository whose 20 stages have ~200-module closures (no-op
  `doit run preprocess`, `hfbuild status`), and the first `hfbuild.fingerprint` call over a
  200-file closure;
- `scale_build.py`: a 200-stage pipeline's no-op against doit alone, a 1,000,000-row cold build
  (load -> batched map -> filter) and its store bytes against a plain datasets script, and the
  demo's no-op against its floor `import doit, dodo`.

Then each figure with a target is printed again with its ratio and the target (issue #10),
the big-repo no-op's ratio to its `import doit, dodo` anchor first.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import scale_build
import scale_repo

# figure -> (most seconds, or None; largest ratio to its anchor, or None)
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "no-op doit run preprocess (20k files)": (0.30, 1.25),
    "hfbuild status (20k files)": (0.30, None),
    "first fingerprint, 200-file closure": (0.060, None),
    "no-op, 200-stage pipeline (s)": (0.25, None),
    "no-op of the demo, 5 stages (s)": (None, 1.10),
    "cold build, 1,000,000 rows, load -> map -> filter (s)": (None, 1.10),
    "store bytes for that build (MB)": (None, 1.10),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    rows: list[tuple[str, float, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="hfbuild-scale-") as tmp:
        rows.extend(scale_repo.run(pathlib.Path(tmp), clock=args.clock))
    with tempfile.TemporaryDirectory(prefix="hfbuild-scale-") as tmp:
        rows.extend(scale_build.run(tmp, rows=args.rows, clock=args.clock))
    width = max(len(r[0]) for r in rows)
    awidth = max(len(r[2]) for r in rows)
    print(f"\n{'figure':<{width}}  {'hfbuild':>10}  {'anchor':<{awidth}}  {'anchor':>10}  ratio")
    for name, value, anchor, anchor_value in rows:
        ratio = value / anchor_value if anchor_value else float("nan")
        print(
            f"{name:<{width}}  {value:>10.3f}  {anchor:<{awidth}}  {anchor_value:>10.3f}  "
            f"{ratio:.2f}"
        )
    print(f"\ntargets ({args.clock} clock; the targets are stated in wall time)")
    for name, value, anchor, anchor_value in rows:
        if name not in TARGETS:
            continue
        most, max_ratio = TARGETS[name]
        ratio = value / anchor_value if anchor_value else float("nan")
        checks = []
        if most is not None:
            checks.append(f"{value:.3f} <= {most:.3f}: {'met' if value <= most else 'NOT met'}")
        if max_ratio is not None:
            verdict = "met" if ratio <= max_ratio else "NOT met"
            checks.append(f"{ratio:.2f}x {anchor} <= {max_ratio:.2f}x: {verdict}")
        print(f"{name:<{width}}  " + "; ".join(checks))


if __name__ == "__main__":
    main()
