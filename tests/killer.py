"""Run doit in this process, SIGKILLing it right before or after the Nth call of a function.

    python tests/killer.py MODULE:ATTR N before|after DOIT-ARGS...

ATTR may be dotted (Class.method). The wrapped function behaves exactly as before until the
chosen call; then the process dies as from `kill -9`, mid-build, with nothing cleaned up.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from typing import Any


def arm(target: str, nth: int, when: str) -> None:
    module_name, _, attr = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    parts = attr.split(".")
    for p in parts[:-1]:
        owner = getattr(owner, p)
    original = getattr(owner, parts[-1])
    calls = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == nth and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, parts[-1], wrapper)


def main() -> int:
    target, nth, when, *doit_args = sys.argv[1:]
    from doit.cmd_base import DodoTaskLoader
    from doit.doit_cmd import DoitMain

    arm(target, int(nth), when)
    return int(DoitMain(DodoTaskLoader()).run(doit_args))


if __name__ == "__main__":
    sys.exit(main())
