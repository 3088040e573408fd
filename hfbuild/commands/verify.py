from __future__ import annotations

import sys

from hfbuild.pipeline import Pipeline
from hfbuild.verify import check_deep, check_lock, check_rebuild


def verify(
    pipe: Pipeline, *, staged: bool, rebuild: bool, deep: bool, strict: bool, quiet: bool
) -> int:
    """The pre-commit check (--staged), the CI check, the reproducibility check (--rebuild),
    or the store's integrity check (--deep)."""
    if deep:
        problems = check_deep(pipe)
    elif rebuild:
        problems = check_rebuild(pipe)
    else:
        problems = check_lock(pipe, staged=staged, strict=strict)
    for p in problems:
        print(f"hfbuild verify: {p.message}", file=sys.stderr)
    if not problems and not quiet:
        what = (
            "intact"
            if deep
            else "reproducible"
            if rebuild
            else ("staged and built" if staged else "locked")
        )
        print(f"hfbuild verify: all {len(pipe)} stages {what}.")
    return 1 if problems else 0
