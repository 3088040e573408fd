"""The side check of a build, as a process: `python -m hfbuild --witness DODO PID`, started by a
building process (`pipeline/witness.py`), never by a user.

It imports dodo.py as `hfbuild status` would (the same `python -m hfbuild` process, so the same
`sys.path`; the record's context taken before the import, as the CLI takes it), computes every
stage's manifest, and writes one JSON document to its stdout: its record context, its hook
environment digest, its `sys.path`, the pipeline's shape and what of the manifests no build
changes (`recordmanifests.static_parts`). Exit 0 with it, else 1 with nothing (a warning of
hfbuild's, a stage that cannot be fingerprinted, dodo.py failing), 130 when interrupted.

Owns: the child's side of the side check.
Must never: print to the terminal (what dodo.py or a library prints goes to /dev/null: its
stdout is the parent's pipe), write the record, build, outlive its parent (a thread watches
it), start a side check of its own.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Sequence

from hfbuild.cli.project import load_pipeline
from hfbuild.keys.recordmanifests import dump_manifests, static_parts
from hfbuild.pipeline import record, witness

_POLL = 0.2  # seconds between looks at the parent


def _die_with(parent: int) -> None:
    """Exit as soon as the process that started this one (`parent`) is gone (killed, say)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_POLL)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: Sequence[str]) -> int:
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    witness.in_child()
    try:
        dodo, parent = argv
        _die_with(int(parent))  # given: the parent may be gone before this line runs
        session = record.Session(dodo, "cli")  # the context, before the import (as the CLI)
        pipe = load_pipeline(dodo)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            doc = dump_manifests(pipe.manifests())
        if witness.warned(caught) or doc is None:
            return 1
        answer = {
            "context": session.context("worktree"),
            "hook_env": session.hook_env,
            "path": list(sys.path),
            "shape": pipe.shape(),
            "static": static_parts(doc),
            "cost": time.process_time(),  # what this import cost: `record.Session.heavy`
        }
        out.write(json.dumps(answer, sort_keys=True))
        out.flush()
        return 0
    except KeyboardInterrupt:
        return 130
    except BaseException:  # dodo.py failing, or anything: the building process records nothing
        return 1
