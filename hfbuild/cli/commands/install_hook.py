from __future__ import annotations

import os
import shlex
import stat
import sys

from hfbuild.core.errors import HfbuildError
from hfbuild.pipeline.pipeline import Pipeline
from hfbuild.source.gitstate import Snapshot

MARK = "# installed by `hfbuild install-hook`"


def install_hook(pipe: Pipeline, dodo: str, *, force: bool = False) -> int:
    """A plain git pre-commit hook: a shim that runs `hfbuild verify --staged` on the dodo
    file `dodo` (an absolute path) with this interpreter, and says what to do once that
    interpreter is gone (the project moved to another environment)."""
    hooks = Snapshot(pipe.root).hooks_dir()
    if hooks is None:
        raise HfbuildError(f"{pipe.root} is not a git repository: nothing to install into.")
    path = os.path.join(hooks, "pre-commit")
    if os.path.exists(path) and not force:
        with open(path, encoding="utf-8", errors="replace") as f:
            if MARK not in f.read():
                raise HfbuildError(
                    f"{path} exists and is not hfbuild's. Add hfbuild to it by hand, use the "
                    f"pre-commit framework (.pre-commit-hooks.yaml), or pass --force to replace."
                )
    os.makedirs(hooks, exist_ok=True)
    py = shlex.quote(sys.executable)
    gone = shlex.quote(
        f"hfbuild hook: {sys.executable}, the Python `hfbuild install-hook` was run with, no "
        f"longer exists (the project moved to another environment?). Run `hfbuild "
        f"install-hook` again from the project environment."
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(
            f"#!/bin/sh\n{MARK}\n"
            f"[ -x {py} ] || {{ echo {gone} >&2; exit 1; }}\n"
            f"exec {py} -m hfbuild --dodo {shlex.quote(dodo)} verify --staged\n"
        )
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    print(f"installed {path}")
    return 0
