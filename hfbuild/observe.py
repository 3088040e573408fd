"""Watching what a transform really uses while it runs: files it opens, modules it executes.

Owns: the process-wide `sys.addaudithook` hook, installed when `hfbuild` is imported (unless
HFBUILD_OBSERVE=0, which only the benchmark uses); the reads and module executions that
happen while a module is imported, attributed to the module executing at module level (its
frame's file); and `Recording`, the window around one stage's build in which every file
under the project root that is opened for reading, and every project module executed, is
noted, in this process and in fork-started worker processes (datasets' `num_proc` pool on
Linux), which report through spool files in a directory the builder names. A relative name
given to `os.open` is noted under the directory its `dir_fd` refers to, which the event does
not carry (`dirfd.py` reads it from the call), or under every one it could be.

Must never: raise out of the hook (an exception there would fail the user's `open`), keep a
path it was not asked to watch beyond the per-import log, note a write (modes w/a/x), or do
more than a few string comparisons for an event it does not care about.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from types import FrameType

from hfbuild import dirfd

ENV_SWITCH = "HFBUILD_OBSERVE"
_SEP = "\0"  # spool records are NUL-separated: a path may hold a newline
_SPOOL_SUFFIX = ".spool"

# Files of the interpreter and its environment: never project files, never attributed.
_SKIP = tuple(
    sorted(
        {
            os.path.join(p, "")
            for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
            for p in (p, os.path.realpath(p))
        }
        | {"/proc/", "/dev/", "/sys/", os.path.join(os.path.dirname(__file__), "")}
    )
)
_WRITE_FLAGS = os.O_WRONLY | os.O_TRUNC | getattr(os, "O_EXCL", 0)

_installed = False
_preloaded: frozenset[str] = frozenset()  # __file__ of modules loaded before the hook
_import_log: dict[str, set[str]] = {}  # module file -> paths it read or executed on import
_import_lock = threading.Lock()
_active: list[Recording] = []


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "no", "off"}


def install() -> None:
    """Install the audit hook once per process (it cannot be removed: it stays cheap)."""
    global _installed, _preloaded
    if _installed or not enabled():
        return
    _installed = True
    # A module still being imported (dodo.py, importing hfbuild first) is observed from here
    # on: only modules that finished importing before are unobserved.
    importing = set()
    f: FrameType | None = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name == "<module>":
            importing.add(f.f_code.co_filename)
        f = f.f_back
    _preloaded = frozenset(
        p
        for m in list(sys.modules.values())
        if isinstance(p := getattr(m, "__file__", None), str)
        and not p.startswith(_SKIP)
        and p not in importing
    )
    sys.addaudithook(_hook)


def installed() -> bool:
    return _installed


def preloaded() -> frozenset[str]:
    """Files of modules that were imported before the hook: their import-time reads are
    unknown."""
    return _preloaded


# -- the hook -----------------------------------------------------------------------------


def _hook(event: str, args: tuple[object, ...]) -> None:
    # A try costs less than a context manager on every event; the hook must never make the
    # user's open() fail.
    if event == "open":
        try:  # noqa: SIM105
            _on_open(args)
        except Exception:
            pass
    elif event == "exec":
        try:  # noqa: SIM105
            _on_exec(args)
        except Exception:
            pass


def _on_open(args: tuple[object, ...]) -> None:
    path, mode = args[0], args[1]
    if isinstance(path, int) or path is None:
        return
    if mode is None:  # os.open: flags decide
        flags = args[2]
        if not isinstance(flags, int) or flags & _WRITE_FLAGS:
            return
        if flags & os.O_RDWR and flags & os.O_CREAT:
            return
    elif not isinstance(mode, str) or "r" not in mode:
        return  # w, a, x: a write is not a dependency
    p = os.fsdecode(os.fspath(path))  # type: ignore[call-overload]
    if p.endswith((".py", ".pyc")):
        return  # module code: the "exec" event names the module executed
    if mode is None and not os.path.isabs(p):
        # os.open resolves a relative name against its dir_fd, which the event does not
        # carry: dirfd.py finds the directory from the call (the caller's frame is 2 up).
        for d in dirfd.directories(sys._getframe(2)):
            _note(os.path.normpath(os.path.join(d, p)))
        return
    if dirfd.reading_source():
        return  # hfbuild reading a caller's source (linecache), not the program reading
    _note(p)


def _on_exec(args: tuple[object, ...]) -> None:
    code = args[0]
    p = getattr(code, "co_filename", None)
    if not isinstance(p, str) or not p.endswith(".py") or p.startswith("<"):
        return
    _note(p)


def _note(p: str) -> None:
    if not os.path.isabs(p):
        p = os.path.abspath(p)
    if p.startswith(_SKIP):
        return
    new = False
    for rec in _active:
        new = rec.note(p) or new
    if _active and not new:
        return
    module = _module_executing()
    if module is not None and module != p:
        with _import_lock:
            _import_log.setdefault(module, set()).add(p)


def _module_executing() -> str | None:
    """The file of the innermost module whose top-level code is running, if it is outside
    the environment: the module being imported when the event happened."""
    f: FrameType | None = sys._getframe(3)
    while f is not None:
        code = f.f_code
        if code.co_name == "<module>":
            name = code.co_filename
            if name.startswith("<") or name.startswith(_SKIP):
                return None
            return name
        f = f.f_back
    return None


def import_time_uses(modules: Iterable[str]) -> set[str]:
    """Absolute paths read or executed while the given module files were imported."""
    wanted = {os.path.realpath(m) for m in modules}
    with _import_lock:
        items = list(_import_log.items())
    out: set[str] = set()
    for module, paths in items:
        if os.path.realpath(module) in wanted:
            out |= paths
    return out


# -- recording one build ------------------------------------------------------------------


class Recording:
    """What one build used: absolute paths under `root` (outside `exclude`) that were opened
    for reading or executed as modules, by this process or its forked workers."""

    def __init__(self, root: str, exclude: Iterable[str], spool: str) -> None:
        roots = {os.path.join(r, "") for r in (root, os.path.realpath(root))}
        self._roots = tuple(sorted(roots))
        self._exclude = tuple(sorted({os.path.join(e, "") for e in exclude if e}))
        self._spool = spool
        self._pid = os.getpid()
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self.paths: set[str] = set()

    def note(self, p: str) -> bool:
        """Remember `p` if it is watched; True when it is new to this process."""
        if not p.startswith(self._roots) or p.startswith(self._exclude) or p in self.paths:
            return False
        with self._lock:
            self.paths.add(p)
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
            os.write(fd, (p + _SEP).encode("utf-8", "surrogateescape"))
        return True

    def collect(self) -> set[str]:
        """This process's paths and every worker's."""
        out = set(self.paths)
        with contextlib.suppress(OSError):
            for n in os.listdir(self._spool):
                if n.endswith(_SPOOL_SUFFIX):
                    with open(os.path.join(self._spool, n), "rb") as f:
                        data = f.read().decode("utf-8", "surrogateescape")
                    out.update(p for p in data.split(_SEP) if p)
        return out


@contextlib.contextmanager
def recording(root: str, exclude: Iterable[str], spool: str) -> Iterator[Recording]:
    """Record the project files used inside the block (`spool` is created for workers and
    is the caller's to remove). Without the hook, the recording stays empty."""
    os.makedirs(spool, exist_ok=True)
    rec = Recording(root, exclude, spool)
    _active.append(rec)
    try:
        yield rec
    finally:
        _active.remove(rec)
