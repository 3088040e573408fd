"""Environment variables read by project code while a build is recorded.

Owns: `os.environ`'s class swap while a recording is active (`watching`): reading a variable
(`os.environ[name]`, `.get`, `os.getenv`, `in`) from project code notes the name in every
active recording; iterating it (`dict(os.environ)`, `{**os.environ}`, `.copy()`, `.items()`,
a `for` loop) notes a copy of the whole environment (`COPIED`), and the reads that copy makes
are not noted one by one. Forked workers inherit the swapped class. Reads by hfbuild, datasets
and other installed code are not the project's: the caller's file decides (os.py and
_collections_abc.py frames, through which `getenv` and the mapping methods pass, are skipped).

Must never: fail or change the user's read, note a read by installed code, leave the class
swapped once no recording is active.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from types import FrameType

from hfbuild.source.envvars import COPIED
from hfbuild.source.recording import SKIP, Recording, active

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
        if not isinstance(name, str) or not active:
            return
        f = _caller(f)
        if f is None:
            return
        file = f.f_code.co_filename
        if file.startswith(SKIP):
            return
        for rec in active:
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


@contextlib.contextmanager
def watching(rec: Recording, hooked: bool) -> Iterator[None]:
    """`rec` is active inside the block, and `os.environ` watched while any recording is
    (with `hooked`: the audit hook is installed, so recordings are made at all)."""
    with _lock_env:
        active.append(rec)
        if hooked and type(os.environ) is _ENVIRON:
            os.environ.__class__ = _WatchedEnviron
    try:
        yield
    finally:
        with _lock_env:
            active.remove(rec)
            if not active and type(os.environ) is _WatchedEnviron:
                os.environ.__class__ = _ENVIRON  # type: ignore[assignment]
            _copy_site.__dict__.clear()
