"""One build's recording: what it used, as the audit hook (`observe.py`) reports it.

Owns: `Recording`, the window around one stage's build in which every file under the project
root (outside `exclude`) opened for reading, every project module executed, every project
directory the program lists and every environment variable project code reads is noted, in
this process and in fork-started worker processes (datasets' `num_proc` pool on Linux), which
report through spool files (NUL-separated records) in a directory the builder names; with a
`watch.Window`, what any process opened to read in the project is added (minus the files this
process's Python opened to write), and a directory it saw opened more often than Python code
listed or `os.open`ed it (hfbuild's own work aside, `own_work`) is a listing made by compiled
code or another process. The recordings in progress (`active`), and the files never recorded
(`SKIP`: the interpreter's and its environment's, hfbuild's own).

Must never: note a path outside its root or inside `exclude`, raise from a note (the hook calls
it inside the user's `open`), import `watch` (its window is handed in).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported at the first build: a no-op never needs it
    from hfbuild.source import watch

_SEP = "\0"  # spool records are NUL-separated: a path may hold a newline
_LISTING = "\x01"  # a spool record starting with it is a directory listed, not a file read
_OPENED_DIR = "\x02"  # ... a directory Python opened (any caller: not a listing by compiled code)
_ENV_MARK = "="  # ... a variable read (paths are absolute: "/...")
_SPOOL_SUFFIX = ".spool"

# Files of the interpreter and its environment: never project files, never attributed.
SKIP = tuple(
    sorted(
        {
            os.path.join(p, "")
            for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
            for p in (p, os.path.realpath(p))
        }
        | {"/proc/", "/dev/", "/sys/", os.path.join(os.path.dirname(os.path.dirname(__file__)), "")}
    )
)

active: list[Recording] = []  # the recordings in progress, in the order they began


class Recording:
    """What one build used: absolute paths under `root` (outside `exclude`) that were opened
    for reading or executed as modules, by this process or its forked workers, and (with a
    watch window, `watch.py`) opened by any process; the directories the program listed; and
    the environment variables project code read (`COPIED`: the whole environment)."""

    def __init__(
        self, root: str, exclude: Iterable[str], spool: str, window: watch.Window | None = None
    ) -> None:
        roots = {os.path.join(r, "") for r in (root, os.path.realpath(root))}
        self._roots = tuple(sorted(roots))
        self._exclude = tuple(sorted({os.path.join(e, "") for e in exclude if e}))
        self._spool = spool
        self._pid = os.getpid()
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._window = window
        self.paths: set[str] = set()
        self.listings: set[str] = set()
        self._python_dir_opens: dict[str, int] = {}  # see `python_opened_dir`
        self._own_dir_opens: dict[str, int] = {}  # see `own_work`
        self._written: set[str] = set()
        self.env: set[str] = set()
        # The environment when the build started: a variable the build sets itself is
        # keyed by the value it had before (what the next build starts with).
        self.env_at_start: dict[str, str] = dict(os.environ)

    def _watched(self, p: str) -> bool:
        return p.startswith(self._roots) and not p.startswith(self._exclude)

    def note(self, p: str) -> bool:
        """Remember `p` if it is watched; True when it is new to this process."""
        if p in self.paths or not self._watched(p):
            return False
        with self._lock:
            self.paths.add(p)
        self._spool_record(p)
        return True

    def note_listing(self, d: str) -> None:
        """Remember that the directory `d` was listed, if it is watched."""
        if d in self.listings or not self._watched(os.path.join(d, "")):
            return
        with self._lock:
            self.listings.add(d)
        self._spool_record(_LISTING + d)

    def python_opened_dir(self, d: str) -> None:
        """Python code (any: the program, the import system, hfbuild) listed or `os.open`ed
        `d`, which may be a directory: one of the opens the watch window counts for it
        that is not a listing by compiled code (`collect_listings`)."""
        if not self._watched(os.path.join(d, "")):
            return
        if os.getpid() != self._pid:
            self._spool_record(_OPENED_DIR + d)
            return
        with self._lock:
            self._python_dir_opens[d] = self._python_dir_opens.get(d, 0) + 1

    def watches(self, file: str) -> bool:
        """Whether code in `file` is the project's (under the root, outside `exclude`)."""
        return self._watched(file)

    def note_env(self, name: str) -> None:
        """Remember that project code read variable `name` (`COPIED`: the environment)."""
        if name in self.env:
            return
        with self._lock:
            self.env.add(name)
        self._spool_record(_ENV_MARK + name)

    def wrote(self, p: str) -> None:
        if os.getpid() == self._pid and self._watched(p):
            with self._lock:
                self._written.add(p)

    def _spool_record(self, record: str) -> None:
        pid = os.getpid()
        if pid != self._pid:  # a forked worker: its memory dies with it, tell the parent
            fd = self._fds.get(pid)
            if fd is None:
                fd = os.open(
                    os.path.join(self._spool, f"{pid}{_SPOOL_SUFFIX}"),
                    os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                    0o600,
                )
                self._fds[pid] = fd
            os.write(fd, (record + _SEP).encode("utf-8", "surrogateescape"))

    def _spooled(self) -> list[str]:
        out: list[str] = []
        with contextlib.suppress(OSError):
            for n in os.listdir(self._spool):
                if n.endswith(_SPOOL_SUFFIX):
                    with open(os.path.join(self._spool, n), "rb") as f:
                        data = f.read().decode("utf-8", "surrogateescape")
                    out.extend(p for p in data.split(_SEP) if p)
        return out

    def collect(self) -> set[str]:
        """This process's paths, every worker's, and what the watch window saw read."""
        out = set(self.paths)
        out.update(
            p for p in self._spooled() if not p.startswith((_LISTING, _OPENED_DIR, _ENV_MARK))
        )
        if self._window is not None:
            with self._lock:
                written = set(self._written)
            out.update(p for p in self._window.reads(written) if self._watched(p))
        return out

    def collect_env(self) -> set[str]:
        """The variables project code read, in this process and every worker (`COPIED`
        when it copied or iterated the whole environment)."""
        n = len(_ENV_MARK)
        return self.env | {r[n:] for r in self._spooled() if r.startswith(_ENV_MARK)}

    def collect_listings(self) -> set[str]:
        """The directories the program listed in this process and in every worker; and,
        with a watch window, those opened by any process more often than Python code
        opened them (listed by compiled code: Arrow's, a Rust crate's, another process's;
        in `watch.py`'s real paths)."""
        spooled = self._spooled()
        out = set(self.listings)
        out.update(p[1:] for p in spooled if p.startswith(_LISTING))
        if self._window is None:
            return out
        opened = self._window.directories_opened()
        if not opened:
            return out
        with self._lock:
            python = list(self._python_dir_opens.items())
        python.extend((p[1:], 1) for p in spooled if p.startswith(_OPENED_DIR))
        with self._lock:
            explained: dict[str, int] = dict(self._own_dir_opens)
        for d, n in python:
            real = os.path.realpath(d)
            explained[real] = explained.get(real, 0) + n
        for d, n in opened.items():
            if n > explained.get(d, 0) and self._watched(os.path.join(d, "")):
                out.add(d)
        return out

    @contextlib.contextmanager
    def own_work(self) -> Iterator[None]:
        """hfbuild's own work inside the window, between builds (identifying what a build
        read): the directories opened meanwhile are not listings of the build's. git's
        index-to-work-tree diff (libgit2, compiled) opens each directory on the path of a
        file it is asked about, which the watch would otherwise take for a listing by
        compiled code. Call it only while the build's own code is not running."""
        if self._window is None:
            yield
            return
        before = self._window.directories_opened()
        try:
            yield
        finally:
            after = self._window.directories_opened()
            with self._lock:
                for d, n in after.items():
                    if n > before.get(d, 0):
                        self._own_dir_opens[d] = (
                            self._own_dir_opens.get(d, 0) + n - before.get(d, 0)
                        )

    @property
    def watched(self) -> bool:
        """Whether any process's opens were watched (else only this process's Python's)."""
        return self._window is not None

    @property
    def unknown(self) -> str | None:
        """Why the build's reads are not all known (None: they are)."""
        return self._window.unknown if self._window is not None else None
