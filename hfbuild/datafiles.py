"""The identity of data files a stage reads: `load` data files and `file_deps`.

Owns: resolving data-file patterns (globs, relative to the project root) to files, and giving
each a content id: the git blob id from the index when it is tracked and clean (nothing is
read), otherwise the blob id of its bytes, remembered in a stat cache keyed by path, size,
mtime, ctime and inode so an unchanged large file is hashed once. ctime is in the key because
a write that restores the mtime still moves the ctime: content, never mtime alone, decides.

Must never: identify a file by its absolute path (files outside the project are named
`<outside>/<basename>`), or trust a stat cache entry written while the file could still change
within the same timestamp tick.
"""

from __future__ import annotations

import glob
import json
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from hfbuild import sharing
from hfbuild.errors import MissingDataError
from hfbuild.gitstate import Snapshot, hash_file
from hfbuild.sharing import write_json_atomic

_RACY_NS = 2_000_000_000  # files modified this recently are hashed again next time


class StatCache:
    """`path|size|mtime|ctime|inode` -> blob id, persisted as JSON (losing it costs time only)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, str] | None = None
        self._dirty = False

    def _load(self) -> dict[str, str]:
        if self._data is None:
            data: Any = {}
            if self.path:
                try:
                    with open(self.path, encoding="utf-8") as f:
                        data = json.load(f)
                except (OSError, ValueError):
                    data = {}
            self._data = (
                {k: v for k, v in data.items() if isinstance(v, str)}
                if isinstance(data, dict)
                else {}
            )
        return self._data

    def content_id(self, full: str, compute: Any) -> str:
        st = os.stat(full)
        key = f"{full}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
        with self._lock:
            hit = self._load().get(key)
        if hit is not None:
            return hit
        value: str = compute()
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
            with self._lock:
                self._load()[key] = value
                self._dirty = True
        return value

    def save(self) -> None:
        if not self._dirty or not self.path:
            return
        try:
            sharing.makedirs(os.path.dirname(self.path))
            write_json_atomic(self.path, self._load())
            self._dirty = False
        except OSError:
            pass  # a cache: failing to save it costs a re-hash next time, nothing else


def file_identity(path: str, snap: Snapshot, cache: StatCache) -> list[str]:
    """[name, blob id] of one data file: repo-relative when inside the project."""
    full = path if os.path.isabs(path) else snap.abspath(path)
    rel = snap.rel(full)
    if rel is None:
        return [
            f"<outside>/{os.path.basename(full)}",
            cache.content_id(full, lambda: hash_file(full)),
        ]
    if snap.mode == "worktree":
        # The stat cache first: a thousand data files cost a stat each, not a git status
        # each; the id is the same either way (a clean file's index id is its work-tree id).
        return [rel, cache.content_id(full, lambda: snap.clean_id(rel) or snap.worktree_id(rel))]
    clean = snap.clean_id(rel)
    if clean is not None:
        return [rel, clean]
    return [rel, cache.content_id(snap.abspath(rel), lambda: snap.worktree_id(rel))]


def expand(pattern: str, root: str, what: str) -> list[str]:
    """The files a data-file pattern names, sorted; absolute paths are returned."""
    full = pattern if os.path.isabs(pattern) else os.path.join(root, pattern)
    if glob.has_magic(full):
        found = sorted(p for p in glob.glob(full, recursive=True) if os.path.isfile(p))
    else:
        found = [full] if os.path.isfile(full) else []
    if not found:
        raise MissingDataError(
            f"{what}: {pattern!r} matches no file (looked under {root}). Check the path, or "
            f"create the data before building."
        )
    return found


def resolve_data_files(
    data_files: str | Iterable[str] | Mapping[str, str | Iterable[str]], root: str, what: str
) -> dict[str, list[str]] | list[str]:
    """`data_files` with every pattern expanded: a split dict or a list of absolute paths."""

    def one(spec: str | Iterable[str]) -> list[str]:
        patterns = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
        out: list[str] = []
        for p in patterns:
            out.extend(f for f in expand(os.fspath(p), root, what) if f not in out)
        return out

    if isinstance(data_files, Mapping):
        return {str(split): one(spec) for split, spec in data_files.items()}
    return one(data_files)
