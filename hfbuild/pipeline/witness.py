"""A build's side check (issue #20): a fresh process that imports dodo.py while this one works,
so that what this process builds is recorded *confirmed* and the next check (`hfbuild status`,
the commit hook after `git add`) answers without importing anything of the user's.

An entry of the no-import record (`record.py`) is used only once two imports of the same tree
computed the same manifests (a pipeline whose arguments come from the clock or `random` is
volatile), and a process that built anything recorded nothing, so the check right after a
build was that second import. Here, a process that may build (`doit run`, `hfbuild build`)
starts `python -m hfbuild --witness DODO PID` (`cli/witness.py`) when it takes the full path
(before it imports the transform modules itself: the two imports run on two cores), or at the
first build or pull when it has no record session. The child imports dodo.py as `hfbuild
status` would and reports its context and what of its manifests no build changes
(`recordmanifests.static_parts`). Before a build opens its window of observed reads the
building process waits for the child to end: inotify takes any process's opens in the
project for the build's reads (`watch.py`), so the child's imports and listings must be over.
At exit the building process computes its manifests again (keys after the build: its inputs'
results are in the store now) and captures the facts; when the facts are those taken before
the build (but the lock and the store's key directories) and its static parts and shape equal
the child's, it writes the entry for the child's context (the CLI's, which the hook's
`verify --staged` derives from) and its own, confirmed; when they differ, volatile.

The child is never waited for longer than `WAIT_MIN` seconds or as long as it has run so
far, whichever is more, and is killed then (nothing recorded). It prints nothing (its stdout
is a pipe read here, its stderr /dev/null), dies with its parent (it watches its parent
process), and is killed on Ctrl-C (`interrupted`) and at exit.

Owns: starting, waiting for and killing the side check, and deciding what its answer makes of
the building process's manifests.
Must never: let the child run while a build's window is open; record when the child failed,
timed out or was interrupted, when a fact changed during the build, or when a key rests on
reads only this process knows; take the whole `Pipeline` (it gets callables); print.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from hfbuild.keys.fullkey import UNOBSERVED
from hfbuild.keys.manifests import Manifests
from hfbuild.keys.recordmanifests import dump_manifests, outside_data, static_parts
from hfbuild.pipeline.record import Session
from hfbuild.source.recordfacts import capture, same_but_built

WAIT_MIN = 10.0  # seconds: at least this long, else as long as the child has run so far
FLAG = "--witness"  # `python -m hfbuild --witness DODO PID` (hfbuild/__main__.py)

_live: set[Witness] = set()
_in_child = False  # this process is a side check: it starts none of its own


def in_child() -> None:
    """Called by the side check itself: a witness starts no witness."""
    global _in_child
    _in_child = True


def interrupted() -> None:
    """Ctrl-C: kill every side check this process started; nothing is recorded."""
    for w in list(_live):
        w.abandon()


def warned(caught: list[warnings.WarningMessage]) -> bool:
    """Whether hfbuild warned (a library's `DeprecationWarning` or a `ResourceWarning` of
    dodo.py's is no reason to record nothing)."""
    return any(w.category.__module__.startswith("hfbuild") for w in caught)


class Witness:
    """The side check of one building process, for the pipeline the dodo file of `session()`
    (the record session, made when the child starts; None: no record) defines. `own`: the
    process answers from that session too, so its own context's entry is written as well.
    `final(fresh)`: the process's manifests (`fresh` after a build)."""

    def __init__(
        self,
        session: Callable[[], Session | None],
        *,
        own: bool,
        final: Callable[[bool], Manifests],
    ):
        self.make_session = session
        self.session: Session | None = None
        self.own = own
        self.final = final
        self.proc: subprocess.Popen[bytes] | None = None
        self.start: dict[str, Any] | None = None  # the facts before the build
        self.launched = 0.0
        self.answer: dict[str, Any] | None = None
        self.over = False  # the child has ended (or was killed, or never started)
        self.built = False
        self.pid = os.getpid()  # the process that started it (a fork cannot wait for it)

    def launch(self, facts: dict[str, Any] | None = None) -> None:
        """Start the child (once), with `facts` (captured now when not given) as the facts
        before the build."""
        if self.proc is not None or self.over or _in_child:
            return
        s = self.session = self.session or self.make_session()
        if s is None or s.volatile():
            self.over = True  # no record, or another import would differ again
            return
        if not s.heavy():
            # An import as cheap as this side check, or not measured yet (this process's own
            # full check measures it: at its first build it may start one): none now.
            return
        self.over = True  # unless it starts
        if facts is None:
            facts = capture(s.root, s.store, s.lock)
        if facts is None:
            return
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hfbuild", FLAG, s.dodo, str(os.getpid())],
                cwd=os.path.dirname(s.dodo),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            return
        self.start, self.over, self.launched = facts, False, time.monotonic()
        self.pid = os.getpid()
        _live.add(self)
        atexit.register(self.finish)

    def settle(self) -> None:
        """Before anything is built or pulled: start the child if it was not, and wait for it
        to end, so that no read of its falls in the build's window."""
        self.built = True
        self.launch()
        self._collect()

    def _collect(self) -> None:
        proc = self.proc
        if proc is None or self.over:
            return
        if os.getpid() != self.pid:  # a forked worker (`doit -n`): it cannot wait, so kill
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGKILL)
            self.over = True
            return
        timeout = max(WAIT_MIN, time.monotonic() - self.launched)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.abandon()
            return
        except KeyboardInterrupt:
            self.abandon()
            raise
        self.over = True
        _live.discard(self)
        if proc.returncode != 0:
            return
        with contextlib.suppress(ValueError):
            got = json.loads(out)
            if isinstance(got, dict):
                self.answer = got

    def abandon(self) -> None:
        """Kill the child and reap it; nothing will be recorded."""
        self.over = True
        self.answer = None
        _live.discard(self)
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                proc.communicate()

    def finish(self) -> None:
        """At exit: record what the child's answer confirms (or shows volatile)."""
        try:
            self._collect()
            if self.answer is not None and self.start is not None:
                self._record(self.answer, self.start)
        except Exception:  # never a traceback at exit for what only saves a later import
            self.abandon()

    def _record(self, answer: dict[str, Any], start: dict[str, Any]) -> None:
        s = self.session
        assert s is not None  # the child started
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ms = self.final(self.built)
        doc = dump_manifests(ms) if not warned(caught) else None
        if doc is None or any(p == UNOBSERVED for m in ms.ok.values() for p, _ in m.observed):
            return  # a warning, a failed stage, or a key only this process can compute
        lock = s.lock
        script = _console_script(answer["context"])
        paths = [*sys.path, *[p for p in answer.get("path") or [] if isinstance(p, str)]]
        paths += script["path"][:1] if script is not None else []
        end = capture(s.root, s.store, lock, outside_data(doc, s.root), paths=paths)
        if end is None or not same_but_built(start, end, lock, s.store):
            return  # the project changed while this process worked
        assert s.shape is not None
        confirmed = static_parts(doc) == answer.get("static") and s.shape() == answer.get("shape")
        contexts = [(answer["context"], answer.get("hook_env"))]
        if script is not None:
            contexts.append((script, answer.get("hook_env")))
        if self.own and s.context("worktree") != answer["context"]:
            contexts.append((s.context("worktree"), s.hook_env))
        cost = answer.get("cost")
        s.witnessed(
            end, doc, contexts, confirmed=confirmed, cost=cost if isinstance(cost, float) else 0.0
        )


def _console_script(ctx: dict[str, Any]) -> dict[str, Any] | None:
    """The context of `hfbuild status` typed in a shell, from the side check's (`python -m
    hfbuild`, whose `sys.path[0]` is the working directory): the console script beside the
    interpreter puts its own directory first instead, and is the same process otherwise. Its
    entry is written too (that directory a fact like any `sys.path` entry), so the status a
    user types after a build answers from the record as the hook does."""
    path = ctx.get("path")
    if not isinstance(path, list) or not path:
        return None
    bindir = os.path.dirname(sys.executable)  # the side check's interpreter is this one
    if not os.path.isfile(os.path.join(bindir, "hfbuild")):
        return None
    return {**ctx, "path": [bindir, *path[1:]]}
