from __future__ import annotations

import json

from hfbuild.cli.report import Explanation
from hfbuild.cli.report import explain as explain_stage
from hfbuild.pipeline.pipeline import Pipeline


def explain(pipe: Pipeline, stage: str, *, as_json: bool = False) -> int:
    """What differs between the stage's current manifest and the one it was last built with."""
    ex = explain_stage(pipe, stage)
    if as_json:
        doc = ex._asdict()
        doc["changes"] = [c._asdict() | {"text": c.describe()} for c in ex.changes]
        print(json.dumps(doc, indent=1, sort_keys=True))
        return 0 if ex.up_to_date else 1
    dirty = f" (from uncommitted changes: {', '.join(ex.dirty_files)})" if ex.dirty_files else ""
    if ex.up_to_date:
        why = "; ".join(ex.cut_off) or "nothing changed since it was built"
        print(f"stage {stage!r} is up to date{dirty}: {why}.")
        print(f"fingerprint {ex.fingerprint}; {_where(ex)}")
        for note in ex.notes:
            print(f"Note: {note}.")
        return 0
    if ex.failed is not None or ex.blocked is not None:
        what = ex.failed if ex.failed is not None else f"blocked: {ex.blocked}"
        print(f"stage {stage!r} is not built, {what} (fingerprint {ex.fingerprint}).")
        if ex.previous is not None:
            print(f"It was last built as {ex.previous}.")
        print(f"Fix the error, then run `doit run {pipe.name}:{stage}`.")
        return 1
    if ex.pending is not None and ex.changes:  # its own change first: it rebuilds the stage
        print(f"stage {stage!r} is stale{dirty}: its own definition changed:")
        for c in ex.changes:
            print(f"  {c.describe()}")
        print(f"Its input {ex.pending!r} is being rebuilt too (may be cut off).")
    elif ex.pending is not None:
        print(
            f"stage {stage!r} is stale{dirty}: input {ex.pending!r} is being rebuilt (may be cut "
            f"off). Its key holds its input's result, known once that is built: then it is up "
            f"to date if the result is the same, else built again."
        )
    elif ex.previous is None:
        print(f"stage {stage!r} has never been built (fingerprint {ex.fingerprint}).")
        for text in ex.shards:
            print(f"  {text}")
    else:
        print(
            f"stage {stage!r} is stale{dirty}: fingerprint {ex.fingerprint}, "
            f"last built as {ex.previous}. What changed:"
        )
        for text in ex.shards:
            print(f"  {text}")
        for c in ex.changes:
            line = f"  {c.describe()}"
            if c.path in ex.line_stats:
                added, removed = ex.line_stats[c.path]
                line += f" (+{added} -{removed} lines)"
            print(line)
    for note in ex.notes:
        print(f"Note: {note}.")
    print(f"Run `doit run {pipe.name}:{stage}` to build it.")
    return 1


def _where(ex: Explanation) -> str:
    """Where the result is, and how to read it when its directory is not a `save_to_disk`
    layout (`load_from_disk` reads only an ordinary entry's `data/`)."""
    load = f"load it with pipe.result({ex.stage!r})"
    if ex.result_kind == "indices":
        where = f"indices at {ex.result_path} over the rows of the entry {ex.result_base}"
        return f"result: {where}; {load}"
    if ex.result_kind == "shards":
        n = ex.result_shards
        where = f"{n:,} {'shard' if n == 1 else 'shards'} listed by the entry {ex.result_path}"
        return f"result: {where}; {load}"
    return f"result at {ex.result_path}"
