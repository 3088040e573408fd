from __future__ import annotations

import os
import sys

from hfbuild.pipeline.pipeline import Pipeline
from hfbuild.store.sharing import diagnose

_SHOWN = 10  # paths listed before "and N more"


def doctor(pipe: Pipeline, *, shared: bool) -> int:
    """Whether others can use the store: for a shared one (a setgid or group-writable store
    directory, files of several users, or --shared), every directory group-writable and
    setgid, every file group-readable, lock files group-writable, all in the store's group;
    and flock working on its disk. Exit 1 with the commands that fix it."""
    root = pipe.store.root
    if not os.path.isdir(root):
        print(f"hfbuild doctor: no store at {root} yet; nothing to check.")
        return 0
    d = diagnose(root, want_shared=shared)
    bad = bool(d.findings) or d.flock is not None
    if d.flock is not None:
        print(
            f"hfbuild doctor: {root}: {d.flock}. Concurrent builds are not safe there: put "
            f"the store on a local disk or one with working locks (HFBUILD_STORE).",
            file=sys.stderr,
        )
    if d.findings:
        print(
            f"hfbuild doctor: the store {root} (group {d.group}) cannot be used by others "
            f"in its group:",
            file=sys.stderr,
        )
        for f in d.findings[:_SHOWN]:
            print(f"  {f.path}: {f.problem}", file=sys.stderr)
        if len(d.findings) > _SHOWN:
            print(f"  ... and {len(d.findings) - _SHOWN} more", file=sys.stderr)
        print(
            "Fix it (as the owner of those files, or root), then have every user build "
            "with this hfbuild:",
            file=sys.stderr,
        )
        for cmd in d.fix():
            print(f"  {cmd}", file=sys.stderr)
    if bad:
        return 1
    if d.shared:
        print(f"hfbuild doctor: the store {root} is shared with group {d.group}; flock works.")
    else:
        print(
            f"hfbuild doctor: the store {root} is private (not setgid, not group-writable); "
            f"flock works. To share it with a group: " + "; ".join(d.fix())
        )
    return 0
