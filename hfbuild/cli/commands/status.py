from __future__ import annotations

import json
import sys

from hfbuild.cli.report import stage_states
from hfbuild.pipeline.pipeline import Pipeline
from hfbuild.store import lockfile


def status(
    pipe: Pipeline, *, as_json: bool = False, quiet: bool = False, strict: bool = False
) -> int:
    """Each stage as up to date, stale (with the first reason), built from uncommitted
    changes, failed (it cannot be fingerprinted, or its last build failed: the error says
    why), or blocked (built from a failed stage); a lock with merge
    conflict markers is reported. Exit 0 only when every stage is up to date from committed
    code and the lock has no conflict. `strict` (`--strict`, HFBUILD_STRICT=1): a stage whose
    key holds uncommitted files is failed, as `verify` and `doit run` fail it."""
    states = stage_states(pipe)
    if strict:
        states = [
            s._replace(
                state="failed",
                reason=f"its key holds uncommitted files ({', '.join(s.dirty_files)}); strict "
                f"mode (HFBUILD_STRICT=1 or --strict) allows only committed code and data: "
                f"commit or stash them",
            )
            if s.dirty_files and s.state != "failed"
            else s
            for s in states
        ]
    conflict = lockfile.conflict(pipe.lock_path, pipe.lock_name)
    if conflict is not None and not quiet:
        print(f"hfbuild status: {conflict}", file=sys.stderr)
    if as_json:
        print(json.dumps([s._asdict() for s in states], indent=1, sort_keys=True))
    elif not quiet:
        width = max((len(s.stage) for s in states), default=0)
        for s in states:
            # The same words as `explain`: a stage whose fingerprint includes uncommitted
            # files is marked whether it is built or stale.
            dirty = (
                f" (from uncommitted changes: {', '.join(s.dirty_files)})" if s.dirty_files else ""
            )
            if s.state in ("failed", "blocked"):
                detail = f"{s.state}: {s.reason}"
            elif s.state == "stale":
                detail = f"stale{dirty}: {s.reason}"
            else:
                detail = f"up to date{dirty}"
            print(f"{s.stage:<{width}}  {detail}")
        if any(s.dirty_files for s in states):
            print(
                "\nStages marked (from uncommitted changes) use files that are not committed: "
                "commit them (their results are kept) or revert them."
            )
        if any(s.state == "failed" for s in states):
            print("\nThe failed stages cannot be built until their error is fixed.")
        if any(s.state == "blocked" for s in states):
            print("Blocked stages are built from a failed one: they build once it does.")
        if any(s.state == "stale" for s in states):
            print(f"\nRun `doit run {pipe.name}` to build the stale stages.")
    ok = conflict is None and all(s.state == "up to date" for s in states)
    return 0 if ok else 1
