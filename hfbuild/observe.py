"""Watching what a transform really uses while it runs: files it opens, modules it executes,
directories it lists.

Owns: the process-wide `sys.addaudithook` hook, installed when `hfbuild` is imported (unless
HFBUILD_OBSERVE=0, which only the benchmark uses, and which turns off `watch.py` too); the
reads and module executions that happen while a module is imported, attributed to the
module executing at module level (its frame's file); and `Recording`, the window around one
stage's build in which every file under the project root that is opened for reading, every
project module executed, and every project directory the program lists (`os.listdir`,
`os.scandir`: what glob, os.walk and pathlib call; not the import system's, nor hfbuild's
own, `_listed_by_program`) is noted, in this process and in fork-started worker processes
(datasets' `num_proc` pool on Linux), which report through spool files in a directory the
builder names; with a `watch.Window`, what any process opened to read in the project is
added (and the files this process's Python opened to write are named to it), and a
directory it saw opened more often than Python code (any caller) listed or `os.open`ed it
is a listing made by compiled code or another process. A relative
name given to `os.open` is noted under the directory its `dir_fd` refers to, which the event
does not carry (`dirfd.py` reads it from the call), or under every one it could be.

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
from typing import TYPE_CHECKING

from hfbuild import dirfd
from hfbuild.envvars import COPIED

if TYPE_CHECKING:  # imported at the first build: a no-op never needs it
    from hfbuild import watch

ENV_SWITCH = "HFBUILD_OBSERVE"
_SEP = "\0"  # spool records are NUL-separated: a path may hold a newline
_LISTING = "\x01"  # a spool record starting with it is a directory listed, not a file read
_OPENED_DIR = "\x02"  # ... a directory Python opened (any caller: not a listing by compiled code)
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
_MODULE_CODE = (".py", ".pyc")
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
        # Most opens are the interpreter's and installed packages' (modules, metadata), or
        # module code (the "exec" event names the module run): a test or two leaves them.
        path = args[0]
        if type(path) is str and (path.startswith(_SKIP) or path.endswith(_MODULE_CODE)):
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
        if _active and isinstance(path, str):  # maybe a directory (fwalk, a dir_fd base)
            d = os.path.abspath(path)
            for rec in _active:
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
    if not _active or not isinstance(path, (str, bytes, os.PathLike)):
        return
    p = os.path.abspath(os.fsdecode(path))
    for rec in _active:
        rec.wrote(p)


def _on_list(args: tuple[object, ...]) -> None:
    """A directory listed (`os.listdir`, `os.scandir`: what glob, os.walk and pathlib call)
    by the program, not by the import system or hfbuild."""
    if not _active:
        return
    path = args[0]
    if path is None:
        p = os.getcwd()
    elif isinstance(path, int):
        p = os.readlink(f"/proc/self/fd/{path}")
    else:
        p = os.fsdecode(os.fspath(path))  # type: ignore[call-overload]
    p = os.path.abspath(p)
    if p.startswith(_SKIP):
        return
    for rec in _active:
        rec.python_opened_dir(p)
    if not _listed_by_program(sys._getframe(2)):
        return
    for rec in _active:
        rec.note_listing(p)


_IMPORT_SYSTEM = (os.path.join(os.path.dirname(importlib.__file__), ""), "<frozen importlib")
_HFBUILD = os.path.join(os.path.dirname(__file__), "")


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
        if not name.startswith(_SKIP) and not name.startswith("<frozen"):
            return True
        f = f.f_back
    return True


def _on_exec(args: tuple[object, ...]) -> None:
    code = args[0]
    p = getattr(code, "co_filename", None)
    if type(p) is not str or p.startswith(_SKIP) or not p.endswith(".py") or p[:1] == "<":
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
            if name.startswith("<") or name.startswith(_SKIP):
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
        from hfbuild import watch

        exclude = list(exclude)
        ex = tuple({os.path.join(r, "") for e in exclude if e for r in (e, os.path.realpath(e))})

        def skipped(d: str) -> bool:
            return (d + "/").startswith(ex)

        window = watch.window(os.path.realpath(root), skipped)
    rec = Recording(root, exclude, spool, window)
    with _lock_env:
        _active.append(rec)
        if _installed and type(os.environ) is _ENVIRON:
            os.environ.__class__ = _WatchedEnviron
    try:
        yield rec
    finally:
        with _lock_env:
            _active.remove(rec)
            if not _active and type(os.environ) is _WatchedEnviron:
                os.environ.__class__ = _ENVIRON  # type: ignore[assignment]
            _copy_site.__dict__.clear()
        if window is not None:
            window.close()


# -- environment variables read by project code -------------------------------------------------
#
# While a build is recorded, `os.environ` is an instance of `_WatchedEnviron` (its class is
# swapped, the object and its data stay): reading a variable (`os.environ[name]`, `.get`,
# `os.getenv`, `in`) from project code notes the name; iterating it (`dict(os.environ)`,
# `{**os.environ}`, `.copy()`, `.items()`, a `for` loop) notes a copy of the whole
# environment (`COPIED`), and the reads that copy makes are not noted one by one. Forked
# workers inherit the swapped class. Reads by hfbuild, datasets and other installed code are
# not the project's: the caller's file decides (os.py and _collections_abc.py frames, through
# which `getenv` and the mapping methods pass, are skipped).

_ENV_MARK = "="  # a spooled record naming a variable (paths are absolute: "/...")
_ENVIRON = type(os.environ)
_lock_env = threading.Lock()
_copy_site = threading.local()  # the frame and instruction of an environment copy under way
# The files the code of os.py and _collections_abc.py names (frozen modules: "<frozen os>").
_OS_FILE = os.getenv.__code__.co_filename
_ABC_FILE = _ENVIRON.get.__code__.co_filename
_PASS_THROUGH = (_OS_FILE, _ABC_FILE)


def _caller(f: FrameType | None) -> FrameType | None:
    """The first frame from `f` outward that is not os.py's or _collections_abc.py's."""
    while f is not None and f.f_code.co_filename in _PASS_THROUGH:
        f = f.f_back
    return f


def _env_read(name: object, f: FrameType | None) -> None:
    try:
        if not isinstance(name, str) or not _active:
            return
        f = _caller(f)
        if f is None:
            return
        file = f.f_code.co_filename
        if file.startswith(_SKIP):
            return
        for rec in _active:
            if rec.watches(file):
                rec.note_env(name)
    except Exception:
        pass  # never fail the user's read


class _WatchedEnviron(_ENVIRON):  # type: ignore[misc,valid-type]
    """`os.environ` while a build is recorded (see above)."""

    def __getitem__(self, key: str) -> str:
        f = sys._getframe(1)
        code = f.f_code
        if code.co_filename == _ABC_FILE:
            if code.co_name in ("pop", "setdefault"):
                _env_read(key, f)
            # else: a view (`items()`, `values()`) iterating: noted as a copy by __iter__
        elif getattr(_copy_site, "at", None) != (id(f), id(code), f.f_lasti):
            _env_read(key, f)
        return super().__getitem__(key)  # type: ignore[no-any-return]

    def get(self, key: str, default: object = None) -> object:
        _env_read(key, sys._getframe(1))
        try:
            return super().__getitem__(key)
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        _env_read(key, sys._getframe(1))
        try:
            super().__getitem__(key)
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        site: FrameType | None = sys._getframe(1)
        while site is not None and site.f_code.co_filename == _ABC_FILE:
            site = site.f_back  # a keys() view: the copy is made from the frame above
        if site is not None:
            # dict(os.environ), {**os.environ}: the C code then reads every key from this
            # very instruction of this frame; those reads are the copy's, not one by one. (The
            # code and offset name the instruction, so a reused frame address cannot hide
            # another read.)
            _copy_site.at = (id(site), id(site.f_code), site.f_lasti)
        _env_read(COPIED, site)
        return super().__iter__()  # type: ignore[no-any-return]
