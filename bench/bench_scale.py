"""Flat cost at scale (issue #10): every figure with its anchor and ratio, in one run.

Run: `make bench`, or `.venv/bin/python bench/bench_scale.py`. Two groups of shapes, each built
in a temporary directory and measured in fresh processes (medians of 5, anchors interleaved):

- `scale_repo.py`: a 20,000-file repository whose 20 stages have ~200-module closures (no-op
  `doit run preprocess`, `hfbuild status`), and the first `hfbuild.fingerprint` call over a
  200-file closure;
- `scale_build.py`: a 200-stage pipeline's no-op against doit alone, a 1,000,000-row cold build
  (load -> batched map -> filter) and its store bytes against a plain datasets script, and the
  demo's no-op against its floor `import doit, dodo`.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import scale_build
import scale_repo


def main() -> None:
    rows: list[tuple[str, float, str, float]] = []
    for shape in (scale_repo, scale_build):
        with tempfile.TemporaryDirectory(prefix="hfbuild-scale-") as tmp:
            rows.extend(shape.run(pathlib.Path(tmp)))
    width = max(len(r[0]) for r in rows)
    awidth = max(len(r[2]) for r in rows)
    print(f"\n{'figure':<{width}}  {'hfbuild':>10}  {'anchor':<{awidth}}  {'anchor':>10}  ratio")
    for name, value, anchor, anchor_value in rows:
        ratio = value / anchor_value if anchor_value else float("nan")
        print(
            f"{name:<{width}}  {value:>10.3f}  {anchor:<{awidth}}  {anchor_value:>10.3f}  "
            f"{ratio:.2f}"
        )


if __name__ == "__main__":
    main()
