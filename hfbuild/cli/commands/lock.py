from __future__ import annotations

import sys

from hfbuild.pipeline.pipeline import Pipeline
from hfbuild.pipeline.relock import relock


def lock(pipe: Pipeline) -> int:
    """Rewrite the lock from the current code and the store's results, building nothing
    (also the way to resolve a merge conflict in it). Stages without a result for their
    current fingerprint are left out and reported: exit 1."""
    r, changed = relock(pipe.place, pipe.manifests)
    for spec in pipe.specs:
        entry = r.stages.get(spec.name)
        if entry is None:
            continue
        where = "the store" if r.source[spec.name] == "store" else "the recorded entry"
        print(f"{spec.name}: {entry['fingerprint']} (from {where})")
    for name in r.missing:
        print(
            f"hfbuild lock: stage {name!r} has no result for the current code and data; "
            f"left out of {pipe.lock_name}. Build it with `doit run {pipe.name}` (or fetch it "
            f"with `hfbuild pull`).",
            file=sys.stderr,
        )
    print(f"{'wrote' if changed else 'unchanged:'} {pipe.lock_name} ({len(r.stages)} stages)")
    return 1 if r.missing else 0
