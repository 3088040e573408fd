"""The identity of data files a stage reads: `load` data files and `file_deps`.

Owns: resolving data-file patterns (globs, relative to the project root) to files, and giving
each a content id: the git blob id from the index when it is tracked and clean (nothing is
read), otherwise the blob id of its bytes, remembered in a stat cache keyed by path, size,
mtime, ctime and inode so an unchanged large file is hashed once. ctime is in the key because
a write that restores the mtime still moves the ctime: content, never mtime alone, decides.
Also which of them are not committed (`uncommitted`; git answers, through `gitstate`).

Must never: identify a file by its absolute path (files outside the project are named
`<outside>/<basename>`), or trust a stat cache entry written while the file could still change
within the same timestamp tick.
"""

from __future__ import annotations

import glob
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from hfbuild.core.errors import MissingDataError
from hfbuild.source.caches import CodeCache
from hfbuild.source.gitrepo import FileId, hash_file
from hfbuild.source.gitstate import Snapshot
from hfbuild.store import sharing
from hfbuild.store.sharing import write_json_atomic

# Names of data files that are not the checkout's: outside the project, or on the Hub (hub.py).
NOT_IN_GIT = ("<outside>/", "hf://")
_RACY_NS = 2_000_000_000  # files modified this recently are hashed again next time


class StatCache:
    """`path|size|mtime|ctime|inode` -> blob id, persisted as JSON (losing it costs time only):
    one entry per path as it is now, older ones dropped when a new one is saved (`save`)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, str] | None = None
        self._dirty = False
        self._added: set[str] = set()  # the keys this process remembered

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

    def content_id(self, full: str, compute: Callable[[], str]) -> str:
        return self.content_ids([full], lambda _: [compute()])[0]

    def content_ids(
        self, fulls: Sequence[str], compute: Callable[[list[int]], list[str]]
    ) -> list[str]:
        """The id of each file: remembered by its stat data, else computed, all those the
        cache lacks in one call (`compute(their positions in fulls)`, their ids in that
        order). Each file is stat'ed before its id is computed, and an id is remembered only
        when the file's last change is older than the racy window."""
        keys: list[tuple[str, int]] = []
        out: list[str | None] = []
        with self._lock:
            data = self._load()
            for full in fulls:
                st = os.stat(full)
                key = f"{full}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
                keys.append((key, max(st.st_mtime_ns, st.st_ctime_ns)))
                out.append(data.get(key))
        missing = [i for i, hit in enumerate(out) if hit is None]
        if missing:
            values = compute(missing)
            now = time.time_ns()
            with self._lock:
                data = self._load()
                for i, value in zip(missing, values, strict=True):
                    out[i] = value
                    key, changed = keys[i]
                    if now - changed > _RACY_NS:
                        data[key] = value
                        self._added.add(key)
                        self._dirty = True
        return [v for v in out if v is not None]

    def save(self) -> None:
        """Written whole, without the entries of a path this process remembered anew under
        other stat data: those can never match again, since a file's ctime only moves
        forward (every write, chmod or rename moves it; nothing sets it back). Kept, a
        data file rewritten N times left N entries that every later run parsed."""
        if not self._dirty or not self.path:
            return
        data = self._load()
        paths = {k.rsplit("|", 4)[0] for k in self._added}
        for key in [k for k in data if k not in self._added and k.rsplit("|", 4)[0] in paths]:
            del data[key]
        try:
            sharing.makedirs(os.path.dirname(self.path))
            write_json_atomic(self.path, data)
            self._dirty = False
        except OSError:
            pass  # a cache: failing to save it costs a re-hash next time, nothing else


def file_identity(path: str, snap: Snapshot, cache: StatCache) -> list[str]:
    """[name, blob id] of one data file: repo-relative when inside the project."""
    return file_identities([path], snap, cache)[0]


def file_identities(paths: Sequence[str], snap: Snapshot, cache: StatCache) -> list[list[str]]:
    """[name, blob id] of each data file, in order: repo-relative when inside the project.
    In a work tree the stat cache answers first (a thousand data files cost a stat each);
    the tracked files it does not know take their index id when git finds them unmodified,
    asked in one pass for all of them (`Snapshot.unmodified_ids`), the others are hashed.
    The id is the same either way (a clean file's index id is its work-tree id)."""
    out: list[list[str]] = []
    inside: list[tuple[int, str, str]] = []  # (position in out, full path, rel)
    # A directory's repo-relative name (None: outside), by the directory as written: the
    # files of one directory share it (`Snapshot.rel` of each cost a no-op over 5,000 files
    # ~8 ms of normalizing and splitting).
    dirs: dict[str, str | None] = {}
    for path in paths:
        full = path if os.path.isabs(path) else snap.abspath(path)
        d, sep, base = full.rpartition(os.sep)
        plain = bool(sep) and base not in ("", os.curdir, os.pardir)
        if plain and d in dirs:
            pre = dirs[d]
            rel = None if pre is None else pre + base
        else:
            rel = snap.rel(full)
            if plain and (rel is None or rel.endswith(base)):
                dirs[d] = None if rel is None else rel[: len(rel) - len(base)]
        if rel is None:
            out.append([f"<outside>/{os.path.basename(full)}", _outside_id(full, cache)])
        elif snap.mode == "worktree":
            out.append([rel, ""])
            inside.append((len(out) - 1, full, rel))
        else:
            out.append([rel, snap.clean_id(rel) or _staged_mode_id(full, rel, snap, cache)])

    def compute(missing: list[int]) -> list[str]:
        rels = [inside[i][2] for i in missing]
        clean = snap.unmodified_ids(rels)
        return [clean.get(rel) or snap.worktree_id(rel) for rel in rels]

    ids = cache.content_ids([full for _, full, _ in inside], compute)
    for (pos, _, _), blob_id in zip(inside, ids, strict=True):
        out[pos][1] = blob_id
    return out


def uncommitted(ids: Iterable[Sequence[str]], snap: Snapshot) -> list[FileId]:
    """Of data files identified as `file_identities` does ([name, blob id]), those whose
    content is not what HEAD's commit holds, as `FileId`s of kind "data" with their git
    status (modified, staged, untracked, or norepo). Git-ignored files (kept out of git on
    purpose), files outside the project and files the checkout lacks are not the
    checkout's to commit and are left out. Work-tree mode only: in index mode ids already
    come from what is staged."""
    if snap.mode != "worktree":
        return []
    inside = [(name, blob_id) for name, blob_id in ids if not name.startswith(NOT_IN_GIT)]
    ids_by_name = dict(inside)
    return [
        FileId(name, ids_by_name[name], status, "data")
        for name, status in snap.data_statuses(inside).items()
        if status != "ignored"
    ]


def _outside_id(full: str, cache: StatCache) -> str:
    return cache.content_id(full, lambda: hash_file(full))


def _staged_mode_id(full: str, rel: str, snap: Snapshot, cache: StatCache) -> str:
    """An untracked or modified data file's id in index mode (data is read from the work
    tree even when code is read from the index)."""
    return cache.content_id(full, lambda: snap.worktree_id(rel))


# datasets.data_files.FILES_TO_IGNORE: never data unless a pattern names one by its name.
_FILES_TO_IGNORE = frozenset(
    {
        "README.md",
        "config.json",
        "dataset_info.json",
        "dataset_infos.json",
        "dummy_data.zip",
        "dataset_dict.json",
    }
)


# The parts of a path are split on the separator, not by `PurePath` (which costs ~0.2 ms
# a path: 5,000 data files made it most of a no-op's work); the counts are the same, since
# the parts `PurePath` drops or merges (empty, ".") count for neither.


def _hidden(path: str, sep: str = os.sep) -> int:
    return sum(1 for p in path.split(sep) if p.startswith(".") and p.strip("."))


def _special(path: str, sep: str = os.sep) -> int:
    parts = [p for p in path.split(sep) if p not in ("", ".")]
    return sum(1 for p in parts[:-1] if p.startswith("__"))


def keep_matched(found: Iterable[str], pattern: str, sep: str = os.sep) -> list[str]:
    """Of the paths a pattern's glob found, those datasets keeps (`resolve_pattern`'s rule):
    not a file named in FILES_TO_IGNORE unless the pattern ends with that name, nor one in a
    hidden or special directory, or hidden itself, that the pattern does not name as such.
    `sep` separates parts (a Hub repository's paths use "/")."""
    ignore = _FILES_TO_IGNORE - {pattern.rsplit(sep, 1)[-1]}
    hidden, special = _hidden(pattern, sep), _special(pattern, sep)
    return [
        p
        for p in found
        if p.rsplit(sep, 1)[-1] not in ignore
        and _hidden(p, sep) == hidden
        and _special(p, sep) == special
    ]


def matches(pattern: str, root: str, memo: CodeCache | None = None) -> list[str]:
    """The files one data-file pattern names, by `datasets.data_files.resolve_pattern`'s
    rule: sorted; only files; not a file named in datasets' FILES_TO_IGNORE (README.md, ...)
    unless the pattern ends with that name; nothing in a hidden (`.x`) or special (`__x`)
    directory, or hidden itself, that the pattern does not name as such (the same count of
    such parts in the path as in the pattern). Absolute paths; [] when none.

    With `memo` (the code cache), a pattern with wildcards is answered from its last
    resolution while every directory that resolution could have looked at is the same
    directory holding the same names (`_looked_at`, `_still`); else resolved and recorded."""
    full = pattern if os.path.isabs(pattern) else os.path.join(root, pattern)
    if not glob.has_magic(full):
        return [full] if os.path.isfile(full) else []
    if memo is None:
        return _resolve(full)
    key = f"{_RULE}|{full}"
    hit = memo.globbed(key)
    if _still(hit):
        under = hit["dirs"][0][0] + os.sep
        return [under + name for name in hit["files"]]
    dirs = _looked_at(full)  # before the resolution: a change in between is seen next time
    found = _resolve(full)
    if dirs is not None:
        under = dirs[0][0] + os.sep  # every file found lies below (kept relative: smaller)
        if all(f.startswith(under) for f in found):
            memo.put_globbed(key, {"dirs": dirs, "files": [f[len(under) :] for f in found]})
    return found


def _resolve(full: str) -> list[str]:
    """`matches` of an absolute pattern with wildcards, resolved now."""
    found = sorted(p for p in glob.glob(full, recursive=True) if os.path.isfile(p))
    return keep_matched(found, full)


# The resolution a memo holds is `_resolve`'s: a change of its rule changes this, so that no
# memo written under the old rule is served.
_RULE = 1


def _dir_stat(path: str) -> list[Any] | None:
    """What identifies a directory and its names: [path, device, inode, mtime ns, ctime ns,
    size], or None when `path` is not a directory or changed within `_RACY_NS` (a change in
    the same timestamp tick could leave it equal)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) <= (
        _RACY_NS
    ):
        return None
    return [path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size]


def _looked_at(full: str) -> list[list[Any]] | None:
    """Every directory a resolution of the absolute pattern `full` may list or look into,
    each with its `_dir_stat`, taken before it is listed: the directory the pattern's part
    before its first wildcard names, and its directories below to as many levels as the
    pattern has parts after it (all levels for `**`), without hidden names unless a part of
    the pattern after its fixed directory starts with ".". None when no memo may be kept: that
    directory is missing, one of them changed within `_RACY_NS`, or one holds a symbolic
    link (what a link leads to can change while its directory stays the same)."""
    parts = full.split(os.sep)
    first = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    rest = parts[first:]
    depth = None if any("**" in p for p in rest) else len(rest) - 1
    # `glob` neither matches nor enters a hidden name unless the pattern's part for it starts
    # with "." (the store, `.git`, a `.venv` below a `**`): such entries are then no concern.
    hidden_too = any(p.startswith(".") for p in rest)
    out: list[list[Any]] = []

    def visit(path: str, level: int) -> bool:
        st = _dir_stat(path)
        if st is None:
            return False
        out.append(st)
        try:
            with os.scandir(path) as entries:
                below = []
                for e in entries:
                    if not hidden_too and e.name.startswith("."):
                        continue
                    if e.is_symlink():
                        return False
                    if (depth is None or level < depth) and e.is_dir(follow_symlinks=False):
                        below.append(e.path)
        except OSError:
            return False
        return all(visit(d, level + 1) for d in below)

    return out if visit(os.sep.join(parts[:first]) or os.sep, 0) else None


def _still(hit: Any) -> bool:
    """Whether a recorded resolution (`matches`' memo) still holds: every directory it
    looked at is the same directory (device and inode) with the same mtime, ctime and
    size. Adding, removing or renaming an entry of a directory changes its mtime and
    ctime, replacing the directory its inode; and none was recorded within `_RACY_NS` of a
    change, so a later change cannot leave its times as they were."""
    if not isinstance(hit, dict):
        return False
    dirs, files = hit.get("dirs"), hit.get("files")
    if not isinstance(dirs, list) or not dirs or not isinstance(files, list):
        return False
    if not all(type(f) is str for f in files):
        return False
    for d in dirs:
        if not isinstance(d, list) or len(d) != 6 or type(d[0]) is not str:
            return False
        try:
            st = os.stat(d[0])
        except OSError:
            return False
        if d[1:] != [st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size]:
            return False
    return True


def expand(pattern: str, root: str, what: str, memo: CodeCache | None = None) -> list[str]:
    """The files a data-file pattern names (`matches`); an error when there are none."""
    found = matches(pattern, root, memo)
    if not found:
        raise MissingDataError(
            f"{what}: {pattern!r} matches no file (looked under {root}). Check the path, or "
            f"create the data before building."
        )
    return found


def resolve_data_files(
    data_files: str | Iterable[str] | Mapping[str, str | Iterable[str]],
    root: str,
    what: str,
    *,
    strict: bool = False,
    memo: CodeCache | None = None,
) -> dict[str, list[str]] | list[str]:
    """`data_files` with every pattern expanded, as `datasets.DataFilesList.from_patterns`
    expands them: pattern by pattern, each pattern's files sorted, a file named by two
    patterns listed twice (datasets loads it twice); a pattern with wildcards may match
    nothing where another matches something (with `strict`, every pattern must match: for
    a check without the data, which takes an empty pattern's files from the lock). A split
    dict or a list of absolute paths. `memo`: the code cache, where a pattern's last
    resolution is kept (`matches`)."""

    def one(spec: str | Iterable[str]) -> list[str]:
        patterns = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
        out: list[str] = []
        for p in patterns:
            text = os.fspath(p)
            lax = glob.has_magic(text) and not strict
            out.extend(matches(text, root, memo) if lax else expand(text, root, what, memo))
        if not out:
            expand(os.fspath(patterns[0]) if patterns else "", root, what)  # raises
        return out

    if isinstance(data_files, Mapping):
        return {str(split): one(spec) for split, spec in data_files.items()}
    return one(data_files)
