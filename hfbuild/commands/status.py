from __future__ import annotations

import json

from hfbuild.pipeline import Pipeline
from hfbuild.report import stage_states


def status(pipe: Pipeline, *, as_json: bool = False, quiet: bool = False) -> int:
    """Each stage as up to date, stale (with the first reason), built from uncommitted
    changes, or failed (it cannot be fingerprinted: the error says why). Exit 0 only when
    every stage is up to date from committed code."""
    states = stage_states(pipe)
    if as_json:
        print(json.dumps([s._asdict() for s in states], indent=1, sort_keys=True))
    elif not quiet:
        width = max((len(s.stage) for s in states), default=0)
        for s in states:
            if s.state == "up to date":
                detail = "up to date"
            elif s.state == "failed":
                detail = f"failed: {s.reason}"
            elif s.state == "dirty":
                detail = f"up to date, built from uncommitted changes: {', '.join(s.dirty_files)}"
            else:
                detail = f"stale: {s.reason}"
            print(f"{s.stage:<{width}}  {detail}")
        if any(s.state == "failed" for s in states):
            print("\nThe failed stages cannot be built until their error is fixed.")
        if any(s.state == "stale" for s in states):
            print(f"\nRun `doit run {pipe.name}` to build the stale stages.")
    return 0 if all(s.state == "up to date" for s in states) else 1
