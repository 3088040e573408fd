"""What this process loaded: each project source file executed as a module, and its stat then.

Owns: the `exec` audit hook installed when this module is imported (with `hfbuild`): importlib
runs every module body through `exec`, and so do `importlib.reload` and runpy; per source file
that could be project code (not the standard library or site-packages), the module's code
object of its last execution and the file's stat at that moment (`Loaded`; modules already
loaded when hfbuild is imported get the file's stat then and no code object); whether that stat
proves the loaded code is the file's (not within 2 s of the file's change, nor when its
bytecode cache was written before the change or within one timestamp tick after it).

Must never: import, reload or execute a module; record a file of site-packages or the standard
library; raise out of the audit hook.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import time
import types
from typing import Any, NamedTuple

from hfbuild.source.codedigest import walk_code

# A file modified this close to (or after) the moment it was loaded may have changed within
# one timestamp tick after it was read: its stat proves nothing (git's racy-file rule).
_RACY_NS = 2_000_000_000
_PYC_TAG = sys.implementation.cache_tag
_PYC_TICK_NS = 100_000_000  # timestamps of one write: coarse kernel clocks tick in ~10 ms

_INSTALLED = tuple(
    os.path.realpath(p) + os.sep
    for k in ("stdlib", "platstdlib", "purelib", "platlib")
    if (p := sysconfig.get_paths().get(k))
)


class Stat(NamedTuple):
    """A file's stat data as a load is compared by it."""

    mtime_ns: int
    size: int
    ino: int


class Loaded:
    """One execution of a module's source file in this process."""

    __slots__ = ("code", "code_ids", "pyc_racy", "stat", "trusted")

    def __init__(self, code: types.CodeType | None, path: str, stat: Stat, at_ns: int) -> None:
        self.code = code  # None: loaded before hfbuild was imported
        self.stat = stat
        # Whether "the file's stat has not moved" proves the loaded code is the file's: not
        # when the file changed within 2 s of the load, nor when its bytecode cache was
        # written before the file's last change or within one timestamp tick after it:
        # importlib validates a pyc by the source's size and mtime in whole seconds, so a
        # same-size rewrite within that second is served the old bytecode, in every process.
        self.pyc_racy = _racy_pyc(path, stat)
        self.trusted = stat.mtime_ns < at_ns - _RACY_NS and not self.pyc_racy
        self.code_ids: frozenset[int] | None = None

    def holds(self, code: types.CodeType) -> bool:
        """Whether `code` is part of this execution (the same object, not only equal)."""
        if self.code is None:
            return True  # nothing to compare against
        if self.code_ids is None:
            self.code_ids = frozenset(id(c) for c in walk_code(self.code))
        return id(code) in self.code_ids


_records: dict[str, Loaded] = {}  # file key (real directory + file name) -> last execution
_keys: dict[str, str] = {}  # path -> file key


def file_key(path: str) -> str:
    """A file's key: its real directory and its own name (a symlinked file keeps its name)."""
    k = _keys.get(path)
    if k is None:
        p = os.path.abspath(path)
        k = _keys[path] = os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
    return k


def stat_now(path: str) -> Stat | None:
    """The file's stat data now, or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Stat(st.st_mtime_ns, st.st_size, st.st_ino)


def _racy_pyc(path: str, stat: Stat) -> bool:
    if _PYC_TAG is None:
        return False
    head, tail = os.path.split(path)
    pyc = os.path.join(head, "__pycache__", f"{tail[:-3]}.{_PYC_TAG}.pyc")
    try:
        written = os.stat(pyc).st_mtime_ns
    except OSError:
        return False  # no cache (or an -O one, checked the same way by whoever wrote it)
    return written < stat.mtime_ns + _PYC_TICK_NS


def _ours(path: str) -> bool:
    """A source file that could be project code: not the standard library or site-packages."""
    return path.endswith(".py") and not path.startswith(_INSTALLED) and "-packages" not in path


def _on_audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "exec" or not args:
        return
    code = args[0]
    if type(code) is not types.CodeType or code.co_name != "<module>":
        return
    path = code.co_filename
    if not _ours(path):
        return
    st = stat_now(path)
    if st is not None:
        _records[file_key(path)] = Loaded(code, path, st, time.time_ns())


def _install() -> None:
    now = time.time_ns()
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__file__", None)
        if isinstance(path, str) and _ours(path):
            st = stat_now(path)
            if st is not None:
                _records.setdefault(file_key(path), Loaded(None, path, st, now))
    sys.addaudithook(_on_audit)


def loaded(key: str) -> Loaded | None:
    """The last execution in this process of the source file with this `file_key`, if any."""
    return _records.get(key)


_install()
