from __future__ import annotations

import sys

from hfbuild.cli.verify import Problem, check_deep, check_lock, check_rebuild
from hfbuild.keys.absentdata import Unchecked, confirm
from hfbuild.pipeline.pipeline import Pipeline


def verify(
    pipe: Pipeline,
    *,
    staged: bool,
    rebuild: bool,
    deep: bool,
    strict: bool,
    quiet: bool,
    require_data: bool = False,
) -> int:
    """The pre-commit check (--staged), the CI check, the reproducibility check (--rebuild),
    or the store's integrity check (--deep). The CI check says which load stages' data files
    were absent (their identity taken from the lock, or confirmed by the remote); with
    `require_data`, unconfirmed absent data is a failure."""
    unchecked: list[Unchecked] = []
    if deep:
        problems = check_deep(pipe)
    elif rebuild:
        problems = check_rebuild(pipe)
    else:
        problems = check_lock(pipe, staged=staged, strict=strict, unchecked=unchecked)
    if unchecked:
        unchecked = confirm(unchecked, pipe.remote())
    for u in unchecked:
        if require_data and not u.confirmed_by:
            problems.append(
                Problem(u.stage, u.describe(pipe.lock_name) + " (--require-data: a failure)")
            )
        elif u.confirmed_by:
            if not quiet:
                print(f"hfbuild verify: {u.describe(pipe.lock_name)}")
        else:
            print(f"hfbuild verify: {u.describe(pipe.lock_name)}", file=sys.stderr)
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
        not_checked = [u.stage for u in unchecked if not u.confirmed_by]
        tail = (
            f"; the data of {len(not_checked)} load stage(s) was not checked "
            f"({', '.join(not_checked)})"
            if not_checked
            else ""
        )
        print(f"hfbuild verify: all {len(pipe)} stages {what}{tail}.")
    return 1 if problems else 0
