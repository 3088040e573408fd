"""Progress bars on stderr for long work: transfers, shards, cluster units.

Owns: one way to show progress (tqdm on stderr, removed when done) and the rule that small
jobs show none.
Must never: write to stdout (doit's one line per stage), or import tqdm for a job too small
for a bar.
"""

from __future__ import annotations

import sys
from typing import Any


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None


def bar(total: int, desc: str, *, unit: str, at_least: int = 0, unit_scale: bool = False) -> Any:
    """A context-manager progress bar over `total` units; a silent one below `at_least`."""
    if total < at_least:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(
        total=total, unit=unit, unit_scale=unit_scale, desc=desc, file=sys.stderr, leave=False
    )
