"""Build leftovers removed when the process ends, not while it builds.

Owns: one trash directory per store and process, inside the store's `tmp/`; `defer`, which
moves a leftover of a build (a shard's scratch, a duplicate of an entry another process
published first) into it with one rename; and `empty`, which removes the trash, run at exit,
and whenever `LIMIT` leftovers or `LIMIT_BYTES` are waiting (a long build does not hold
every shard's scratch, say files datasets extracted from compressed data, until it ends,
nor does a notebook pile leftovers up). Why: removing a file costs every file created
after it, where the filesystem skips recently freed inodes when it picks one for a new file
(ext4 without a journal skips those freed in the last 5 to 35 s, and its search walks past
each one: `perf` put 11-25% of a cold sharded build's samples in that search,
bench/bench_incremental.py (d), while it removed each shard's scratch as it went). A
sharded build creates a few files per shard; its removals now come after them.

A process killed before its exit handler runs leaves its trash directory in `tmp/`, where
`hfbuild gc` removes it with other leftovers of killed builds. A forked worker moves its
leftovers into its parent's trash (created before the fork) and leaves the emptying to it.

Must never: remove anything that is not a leftover of a build (the caller names only paths
under the store's `tmp/`), or hold a leftover in a place the store reads.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import threading

from hfbuild.store import sharing

LIMIT = 10_000  # leftovers waiting before they are removed at once
LIMIT_BYTES = 256 << 20  # bytes waiting before they are removed at once
PREFIX = "trash."

_lock = threading.Lock()
_bins: dict[str, tuple[str, int]] = {}  # a store's tmp/ -> (this process's trash in it, pid)
_count = 0  # leftovers deferred by this process (their names in the trash)
_pending = 0  # of them, not yet removed
_waiting = 0  # their bytes
_registered = False


def prepare(tmp: str) -> None:
    """Create this process's trash in `tmp` now (before forking workers that use it)."""
    _bin(tmp)


def defer(path: str, tmp: str, size: int = 0) -> None:
    """Remove `path` (a directory or file inside `tmp`, a store's tmp/, of `size` bytes)
    by the time this process exits: moved into the trash now, removed then. When it cannot
    be moved (a concurrent `hfbuild gc` removed the trash) it is removed at once."""
    global _count, _pending, _waiting
    if not os.path.lexists(path):
        return
    with _lock:
        here = _bin(tmp)
        _count += 1
        _pending += 1
        _waiting += size
        name = os.path.join(here, str(_count))
        owner = _bins[tmp][1] == os.getpid()
        full = _pending >= LIMIT or _waiting >= LIMIT_BYTES
    try:
        os.rename(path, name)
    except OSError:
        remove_tree(path)
        return
    if owner and full:
        empty()


def empty() -> None:
    """Remove every trash directory this process made (the exit handler)."""
    global _pending, _waiting
    with _lock:
        _pending = _waiting = 0
        mine = [b for b, pid in _bins.values() if pid == os.getpid()]
        for tmp in [t for t, (_, pid) in _bins.items() if pid == os.getpid()]:
            del _bins[tmp]
    for b in mine:
        shutil.rmtree(b, ignore_errors=True)


def _bin(tmp: str) -> str:
    global _registered
    got = _bins.get(tmp)
    if got is not None and os.path.isdir(got[0]):
        return got[0]
    here = tempfile.mkdtemp(dir=tmp, prefix=PREFIX)
    os.chmod(here, sharing.dir_mode(tmp))  # as a build dir: in a shared store, gc by anyone
    _bins[tmp] = (here, os.getpid())
    if not _registered:
        _registered = True
        atexit.register(empty)
    return here


def remove_tree(path: str) -> None:
    """Remove `path` (a directory tree or a file) now, ignoring errors."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)
