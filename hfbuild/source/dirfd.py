"""Which file an `os.open` of a relative name opens: the working directory's, or the one
under the directory its `dir_fd` refers to.

The audit event `open` that `os.open` raises carries (path, None, flags) and never its
`dir_fd` (CPython issue #116429), so `os.open("x.txt", flags, dir_fd=fd)` looks exactly like
an open of `./x.txt`. The call is still on the stack when the hook runs: the innermost Python
frame is executing the call (its `f_lasti`), and the call's source position
(`co_positions`, Python 3.11+) names the call's text in the frame's source. When that call's
function is `os.open` itself and its `dir_fd` is absent, a literal, or a plain name (a local,
global or builtin variable, read without running any code), the directory is known: the
working directory, or what `/proc/self/fd/<fd>` links to. Otherwise (`**kwargs`, an
expression, a call made from C code such as `functools.partial`, no source, Python 3.10, an
fd that links to no directory) every directory the open could be relative to is named: the
working directory and each directory this process holds open as an fd. `openat` with a
relative name succeeds only for an open directory fd or the working directory, so the file
really opened is among them: a read is never dropped, at worst a file of the same name in
another open directory is counted too.

Owns: recovering a call's `dir_fd` from its frame (the call's source analysed once per call
site) and turning it into directories.
Must never: raise (it runs inside the audit hook), run user code (no attribute or property
lookups on anything but modules, no calls), or return fewer directories than the open could
be relative to where `/proc/self/fd` exists (elsewhere, macOS, an fd it cannot read leaves
only the working directory: README's limits say so).
"""

from __future__ import annotations

import ast
import itertools
import linecache
import os
import threading
from types import CodeType, FrameType, ModuleType
from typing import Any, NamedTuple

_OS_OPEN = os.open
_FD_DIR = "/proc/self/fd"


class _Site(NamedTuple):
    """What a call site's source says: its function as a dotted name (None: not a plain
    dotted name), and its `dir_fd` argument as `absent`, `const` (value) or `name` (the
    variable), or `unknown`."""

    func: tuple[str, ...] | None
    how: str
    value: Any = None


_UNKNOWN = _Site(None, "unknown")
_sites: dict[tuple[CodeType, int], _Site] = {}
_lock = threading.Lock()
_reading = threading.local()  # set while this thread reads a call's source


def reading_source() -> bool:
    """Whether this thread is reading a call's source for `directories`: that open is
    hfbuild's own, not the program's."""
    return getattr(_reading, "on", False)


def directories(frame: FrameType | None) -> list[str]:
    """The directories a relative name given to `os.open`, called by `frame`, is resolved
    against: one when the call's `dir_fd` is known, else every one it could be."""
    try:
        known = _known(frame)
    except Exception:
        known = None
    if known is not None:
        return [known]
    try:
        cwd = [os.getcwd()]
    except OSError:  # removed: nothing relative to it can be opened
        cwd = []
    return [*cwd, *_open_directories()]


def _known(frame: FrameType | None) -> str | None:
    """The directory of this call's relative name, when the call is `os.open` and its
    `dir_fd` can be read without running code; else None."""
    if frame is None:
        return None
    site = _site(frame.f_code, frame.f_lasti)
    if site.func is None or site.how == "unknown":
        return None
    found, fn = _lookup(frame, site.func)
    if not found or fn is not _OS_OPEN:
        return None
    if site.how == "absent":
        fd: Any = None
    elif site.how == "const":
        fd = site.value
    else:
        found, fd = _lookup(frame, (str(site.value),))
        if not found:
            return None
    if fd is None:
        return os.getcwd()
    if type(fd) is not int:
        return None
    target = os.readlink(f"{_FD_DIR}/{fd}")
    return target if os.path.isabs(target) and os.path.isdir(target) else None


def _lookup(frame: FrameType, dotted: tuple[str, ...]) -> tuple[bool, Any]:
    """(found, value) of a dotted name in the frame, as the call evaluated it: its first
    part from locals, globals or builtins, the rest as attributes of modules only."""
    first, *rest = dotted
    for scope in (frame.f_locals, frame.f_globals, frame.f_builtins):
        if first in scope:
            obj = scope[first]
            break
    else:
        return False, None
    for attr in rest:
        if not isinstance(obj, ModuleType) or attr not in vars(obj):
            return False, None
        obj = vars(obj)[attr]
    return True, obj


def _site(code: CodeType, lasti: int) -> _Site:
    key = (code, lasti)
    with _lock:
        hit = _sites.get(key)
    if hit is None:
        _reading.on = True
        try:
            hit = _analyse(code, lasti)
        except Exception:
            hit = _UNKNOWN
        finally:
            _reading.on = False
        with _lock:
            _sites[key] = hit
    return hit


def _analyse(code: CodeType, lasti: int) -> _Site:
    """The call `code` is executing at `lasti`, read from its source: only the call's own
    text (its positions are UTF-8 byte columns) is parsed, not the whole file."""
    positions = getattr(code, "co_positions", None)
    if positions is None or lasti < 0:
        return _UNKNOWN  # Python 3.10: a line number names no single call
    line, end_line, col, end_col = next(itertools.islice(positions(), lasti // 2, None))
    if line is None or end_line is None or col is None or end_col is None:
        return _UNKNOWN
    linecache.checkcache(code.co_filename)
    lines = linecache.getlines(code.co_filename)
    if not 0 < line <= end_line <= len(lines):
        return _UNKNOWN
    chunk = [t.encode("utf-8") for t in lines[line - 1 : end_line]]
    chunk[-1] = chunk[-1][:end_col]
    chunk[0] = chunk[0][col:]
    call = ast.parse("(" + b"".join(chunk).decode("utf-8") + "\n)", mode="eval").body
    if not isinstance(call, ast.Call):
        return _UNKNOWN
    func = _dotted(call.func)
    if any(k.arg is None for k in call.keywords):
        return _Site(func, "unknown")  # **kwargs may hold dir_fd
    given = [k.value for k in call.keywords if k.arg == "dir_fd"]
    if not given:
        return _Site(func, "absent")  # dir_fd is keyword-only: *args cannot pass it
    if call.keywords[-1].arg != "dir_fd":
        return _Site(func, "unknown")  # an argument evaluated after it could rebind it
    value = given[0]
    if isinstance(value, ast.Constant):
        return _Site(func, "const", value.value)
    if isinstance(value, ast.Name):
        return _Site(func, "name", value.id)
    return _Site(func, "unknown")


def _dotted(node: ast.expr) -> tuple[str, ...] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return (node.id, *reversed(parts))


def _open_directories() -> list[str]:
    """Every directory this process holds open as a file descriptor ([] where
    `/proc/self/fd` does not exist)."""
    out = []
    try:
        fds = os.listdir(_FD_DIR)
    except OSError:
        return []
    for n in fds:
        try:
            target = os.readlink(f"{_FD_DIR}/{n}")
        except OSError:
            continue
        if os.path.isabs(target) and os.path.isdir(target) and target not in out:
            out.append(target)
    return out
