"""Watching what a transform really uses while it runs: files it opens, modules it executes,
directories it lists.

Owns: the process-wide `sys.addaudithook` hook, installed when `hfbuild` is imported (unless
HFBUILD_OBSERVE=0, which only the benchmark uses, and which turns off `watch.py` too), which
reports to the active recordings (`recording.py`); the reads and module executions that happen
while a module is imported, attributed to the module executing at module level (its frame's
file); `recording`, the block around one stage's build (a `Recording`, with a `watch.Window`
when any process's opens are to be watched, and `os.environ` watched: `envwatch.py`). A
directory listed (`os.listdir`, `os.scandir`: what glob, os.walk and pathlib call) is the
program's unless the import system or hfbuild lists it (`_listed_by_program`). A relative name
given to `os.open` is noted under the directory its `dir_fd` refers to, which the event does
not carry (`dirfd.py` reads it from the call), or under every one it could be.

Must never: raise out of the hook (an exception there would fail the user's `open`), keep a
path it was not asked to watch beyond the per-import log, note a write (modes w/a/x) as a
read, or do more than a few string comparisons for an event it does not care about.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from types import FrameType

from hfbuild.source import dirfd, envwatch
from hfbuild.source.recording import SKIP, Recording, active

ENV_SWITCH = "HFBUILD_OBSERVE"
_MODULE_CODE = (".py", ".pyc")
_WRITE_FLAGS = os.O_WRONLY | os.O_TRUNC | getattr(os, "O_EXCL", 0)

_installed = False
_preloaded: frozenset[str] = frozenset()  # __file__ of modules loaded before the hook
_import_log: dict[str, set[str]] = {}  # module file -> paths it read or executed on import
_import_lock = threading.Lock()


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
        and not p.startswith(SKIP)
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
        # Most opens are the interpreter's and installed packages' (modules, metadata), or
        # module code (the "exec" event names the module run): a test or two leaves them.
        path = args[0]
        if type(path) is str and (path.startswith(SKIP) or path.endswith(_MODULE_CODE)):
            return
        try:  # noqa: SIM105
            _on_open(args)
        except Exception:
            pass
    elif event == "exec":
        try:  # noqa: SIM105
            _on_exec(args)
        except Exception:
            pass
    elif event == "os.scandir" or event == "os.listdir":  # glob, os.walk, pathlib: these too
        try:  # noqa: SIM105
            _on_list(args)
        except Exception:
            pass


def _on_open(args: tuple[object, ...]) -> None:
    path, mode = args[0], args[1]
    if isinstance(path, int) or path is None:
        return
    if mode is None:  # os.open: flags decide
        if active and isinstance(path, str):  # maybe a directory (fwalk, a dir_fd base)
            d = os.path.abspath(path)
            for rec in active:
                rec.python_opened_dir(d)
        flags = args[2]
        if not isinstance(flags, int) or flags & _WRITE_FLAGS:
            _note_write(path)
            return
        if flags & os.O_RDWR and flags & os.O_CREAT:
            _note_write(path)
            return
    elif not isinstance(mode, str) or "r" not in mode:
        _note_write(path)
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


def _note_write(path: object) -> None:
    """A file this process opened to write, while a build records: not its input, even if
    inotify sees it still open at the build's end (`watch.Window.reads`)."""
    if not active or not isinstance(path, (str, bytes, os.PathLike)):
        return
    p = os.path.abspath(os.fsdecode(path))
    for rec in active:
        rec.wrote(p)


def _on_list(args: tuple[object, ...]) -> None:
    """A directory listed (`os.listdir`, `os.scandir`: what glob, os.walk and pathlib call)
    by the program, not by the import system or hfbuild."""
    if not active:
        return
    path = args[0]
    if path is None:
        p = os.getcwd()
    elif isinstance(path, int):
        p = os.readlink(f"/proc/self/fd/{path}")
    else:
        p = os.fsdecode(os.fspath(path))  # type: ignore[call-overload]
    p = os.path.abspath(p)
    if p.startswith(SKIP):
        return
    for rec in active:
        rec.python_opened_dir(p)
    if not _listed_by_program(sys._getframe(2)):
        return
    for rec in active:
        rec.note_listing(p)


_IMPORT_SYSTEM = (os.path.join(os.path.dirname(importlib.__file__), ""), "<frozen importlib")
_HFBUILD = os.path.join(os.path.dirname(os.path.dirname(__file__)), "")


def _listed_by_program(frame: FrameType | None) -> bool:
    """Whether a listing made in `frame` is the program's: the innermost frame that is not
    the standard library or an installed package decides (a transform, or a library called
    by it, lists; hfbuild, or datasets called by hfbuild to load a stage's data, does not);
    the import system finding modules or distributions (`importlib.metadata` lists every
    `sys.path` entry) never does."""
    f = frame
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(_IMPORT_SYSTEM) or name.startswith(_HFBUILD):
            return False
        if not name.startswith(SKIP) and not name.startswith("<frozen"):
            return True
        f = f.f_back
    return True


def _on_exec(args: tuple[object, ...]) -> None:
    code = args[0]
    p = getattr(code, "co_filename", None)
    if type(p) is not str or p.startswith(SKIP) or not p.endswith(".py") or p[:1] == "<":
        return
    _note(p)


def _note(p: str) -> None:
    if not os.path.isabs(p):
        p = os.path.abspath(p)
    if p.startswith(SKIP):
        return
    new = False
    for rec in active:
        new = rec.note(p) or new
    if active and not new:
        return
    module = _module_executing()
    if module is not None and module != p:
        with _import_lock:
            _import_log.setdefault(module, set()).add(p)


def _module_executing() -> str | None:
    """The file of the innermost module whose top-level code is running, if it is outside
    the environment and hfbuild is not running between it and the event: the module being
    imported when the event happened. (What hfbuild reads, the store, the lock, is its own
    even when a module's top level calls it; and the walk from hfbuild's reads, the most
    frequent, stops at their first frame instead of the bottom of the stack.)"""
    f: FrameType | None = sys._getframe(4)  # the caller of the audited call (see _hook)
    while f is not None:
        code = f.f_code
        name = code.co_filename
        if name.startswith(_HFBUILD):
            return None
        if code.co_name == "<module>":
            if name.startswith("<") or name.startswith(SKIP):
                return None
            return name
        f = f.f_back
    return None


_reals: dict[str, str] = {}  # a module file -> its real path (asked once per stage build)
_real_dirs: dict[str, str] = {}  # a module's directory -> its real path


def real_module_path(p: str) -> str:
    """`os.path.realpath` of a module's file, remembered for the process: a module's file
    is where it was loaded from, and every stage's build asks about hundreds of them."""
    r = _reals.get(p)
    if r is None:
        # Its directory's real path, asked once per directory (a realpath costs an lstat per
        # component), unless the file itself is a symbolic link.
        d, name = os.path.split(p)
        rd = _real_dirs.get(d)
        if rd is None:
            rd = _real_dirs[d] = os.path.realpath(d)
        r = os.path.realpath(p) if os.path.islink(p) else os.path.join(rd, name)
        _reals[p] = r
    return r


_logged_by_real: dict[str, list[str]] = {}  # a real module path -> its keys in _import_log
_logged_seen = 0  # how many of _import_log's keys (in insertion order) _logged_by_real holds


def import_time_uses(modules: Iterable[str]) -> set[str]:
    """Absolute paths read or executed while the given module files were imported (each
    stage's build asks for its closure's: the log is indexed by real path once per module
    logged, not walked per stage)."""
    global _logged_seen
    out: set[str] = set()
    with _import_lock:
        if len(_import_log) > _logged_seen:
            for module in itertools.islice(_import_log, _logged_seen, None):
                _logged_by_real.setdefault(real_module_path(module), []).append(module)
            _logged_seen = len(_import_log)
        for m in modules:
            for module in _logged_by_real.get(real_module_path(m), ()):
                out |= _import_log[module]
    return out


# -- recording one build ------------------------------------------------------------------


@contextlib.contextmanager
def recording(
    root: str,
    exclude: Iterable[str],
    spool: str,
    watch_all: bool = False,
) -> Iterator[Recording]:
    """Record the project files used inside the block (`spool` is created for workers and
    is the caller's to remove). Without the hook, the recording stays empty. With
    `watch_all`, opens by any process are watched too where the platform allows
    (`watch.py`; `exclude` is not watched)."""
    os.makedirs(spool, exist_ok=True)
    window = None
    if watch_all and _installed:
        from hfbuild.source import watch

        exclude = list(exclude)
        ex = tuple({os.path.join(r, "") for e in exclude if e for r in (e, os.path.realpath(e))})

        def skipped(d: str) -> bool:
            return (d + "/").startswith(ex)

        window = watch.window(os.path.realpath(root), skipped)
    rec = Recording(root, exclude, spool, window)
    try:
        with envwatch.watching(rec, _installed):
            yield rec
    finally:
        if window is not None:
            window.close()
