"""The code cache: what earlier processes learnt about code files, kept in the store.

Owns: one JSON file per store (its path comes from `store.py`) holding (a) the import scan of
each Python file, keyed by git blob id (a blob's imports never change), (b) the blob id of
work-tree files, keyed by path, size, mtime, ctime and inode, as git's index keeps stat data,
(c) per repository, the index's and HEAD's blob ids of the files asked about, valid for one
*tree state* (the index file's stat data and HEAD's commit, computed by `gitstate.py`): a no-op
then needs neither the index (20,000 entries read in ~8 ms) nor HEAD's trees; with them, for
the same tree state, which of a set of tracked data files (by a digest of their paths and
work-tree ids) are not committed, one entry per set rather than per file; and (d) each
file's resolved imports, keyed by blob id, path and `sys.path`, with the facts the resolution
rested on (`imports.py` records and re-checks them); and (e) the files a data-file pattern
resolved to, with the stat data of the directories the resolution looked at (`datafiles.py`
decides and re-checks them).
The file carries a format number, the Python version (the AST changes between versions) and a
checksum of its body; loading it checks all three, and a file that fails any check is ignored
whole, as if absent. Saving is atomic; concurrent savers lose entries, never correctness.

Must never: be needed for a correct answer (losing the file costs time only), record the blob
id of a file changed within the last 2 s (the racy-git rule: a later write in the same
timestamp tick would keep the same stat data), or hand out an entry whose stat key (or tree
state) does not match the file (or the repository) now.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from hfbuild.core.errors import HfbuildError
from hfbuild.store.sharing import write_text_atomic
from hfbuild.store.store import Store

FORMAT = 3  # 2: scans carry the environment variables a file reads; 3: tree ids, resolutions
MAX_SCANS = 20_000
MAX_RESOLUTIONS = 20_000
MAX_DATA_SETS = 256  # sets of data files' statuses kept per tree state
MAX_GLOBS = 64  # data-file patterns' resolutions kept (those this process used kept first)
RACY_NS = 2_000_000_000
_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


def _id_or_none(x: Any) -> bool:
    return x is None or (type(x) is str and len(x) == 40)


def _checksum(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


class CodeCache:
    """Scans by blob id and work-tree blob ids by stat key, for one store (`None`: in memory
    only)."""

    def __init__(self, store: Store | None) -> None:
        self.store = store
        self.path = store.code_cache_path() if store is not None else None
        self._lock = threading.Lock()
        self._scans: dict[str, Any] | None = None
        self._stats: dict[str, str] = {}
        # repository key -> {"state": tree state, "ids": {path: [index id, HEAD id]},
        #                    "data": {digest of data files: [[path, status], ...]}}
        self._trees: dict[str, Any] = {}
        self._resolutions: dict[str, Any] = {}
        self._globs: dict[str, Any] = {}
        self._dirty = False
        # What this process used, kept when the file is pruned on save.
        self._used_scans: set[str] = set()
        self._used_resolutions: set[str] = set()
        self._used_globs: set[str] = set()
        self._used_stats: dict[str, str] = {}  # path -> its current stat key

    def _load(self) -> dict[str, Any]:
        if self._scans is None:
            self._scans, self._stats, self._trees, self._resolutions, self._globs = _read(self.path)
        return self._scans

    # -- scans ---------------------------------------------------------------------------------

    def scan(self, blob: str) -> Any:
        """The stored scan of blob `blob` (a JSON value), or None."""
        with self._lock:
            self._used_scans.add(blob)
            return self._load().get(blob)

    def put_scan(self, blob: str, value: Any) -> None:
        with self._lock:
            self._load()[blob] = value
            self._used_scans.add(blob)
            self._dirty = True

    # -- work-tree blob ids --------------------------------------------------------------------

    def worktree_id(
        self, full: str, compute: Callable[[], str], st: os.stat_result | None = None
    ) -> str:
        """The blob id of the file at absolute path `full`: remembered when its stat data
        matches an entry recorded outside the racy window, else `compute()`d. `st` is the
        file's stat data when the caller has it (an lstat of a file that is no symlink)."""
        if st is None:
            st = os.stat(full)
        key = f"{full}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
        with self._lock:
            self._load()
            hit = self._stats.get(key)
            self._used_stats[full] = key
        if hit is not None:
            return hit
        value = compute()
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
            with self._lock:
                self._stats[key] = value
                self._dirty = True
        return value

    # -- resolved imports -----------------------------------------------------------------

    def resolution(self, key: str) -> Any:
        """The stored resolution under `key` (a JSON value, checked by its reader), or None."""
        with self._lock:
            self._load()
            self._used_resolutions.add(key)
            return self._resolutions.get(key)

    def put_resolution(self, key: str, value: Any) -> None:
        with self._lock:
            self._load()
            self._resolutions[key] = value
            self._used_resolutions.add(key)
            self._dirty = True

    # -- data-file patterns' resolutions ------------------------------------------------------

    def globbed(self, key: str) -> Any:
        """The stored resolution of a data-file pattern under `key` (a JSON value, checked by
        its reader, `datafiles.py`), or None."""
        with self._lock:
            self._load()
            self._used_globs.add(key)
            return self._globs.get(key)

    def put_globbed(self, key: str, value: Any) -> None:
        with self._lock:
            self._load()
            self._globs[key] = value
            self._used_globs.add(key)
            self._dirty = True

    # -- index and HEAD ids -----------------------------------------------------------------

    def _recorded(self, repo: str, state: str, part: str, key: str) -> Any:
        """What `part` ("ids" or "data") of repository `repo` records under `key` for tree
        state `state` (None when another state, or nothing, is recorded)."""
        with self._lock:
            self._load()
            known = self._trees.get(repo)
            if not isinstance(known, dict) or known.get("state") != state:
                return None
            entries = known.get(part)
            return entries.get(key) if isinstance(entries, dict) else None

    def _record(self, repo: str, state: str, part: str, key: str, value: Any, most: int) -> None:
        """Record `value` under `key` in `part` for tree state `state`: entries of another
        state are dropped (a repository keeps only its current state), and so are the
        state's entries of `part` once it holds `most`."""
        with self._lock:
            self._load()
            known = self._trees.get(repo)
            if not isinstance(known, dict) or known.get("state") != state:
                known = self._trees[repo] = {"state": state, "ids": {}}
            entries = known.get(part)
            if not isinstance(entries, dict) or len(entries) >= most:
                entries = known[part] = {}
            entries[key] = value
            self._dirty = True

    def tree_ids(self, repo: str, state: str, path: str) -> tuple[str | None, str | None] | None:
        """(index id, HEAD id) recorded for `path` (None where it has no entry) in repository
        `repo` while its tree state was `state`; None when not recorded for that state."""
        v = self._recorded(repo, state, "ids", path)
        if type(v) is list and len(v) == 2 and _id_or_none(v[0]) and _id_or_none(v[1]):
            return v[0], v[1]
        return None

    def put_tree_ids(
        self, repo: str, state: str, path: str, index_id: str | None, head_id: str | None
    ) -> None:
        """Record `path`'s ids for tree state `state`."""
        self._record(repo, state, "ids", path, [index_id, head_id], sys.maxsize)

    def data_statuses(self, repo: str, state: str, key: str) -> list[list[str]] | None:
        """The uncommitted files ([path, status]) recorded under `key` (a digest of a set of
        tracked data files' paths and work-tree ids) in repository `repo` while its tree
        state was `state`; None when not recorded for that state."""
        v = self._recorded(repo, state, "data", key)
        if type(v) is list and all(
            type(x) is list and len(x) == 2 and all(type(y) is str for y in x) for x in v
        ):
            return v
        return None

    def put_data_statuses(self, repo: str, state: str, key: str, value: list[list[str]]) -> None:
        """Record `value` under `key` for tree state `state` (at most `MAX_DATA_SETS` sets)."""
        self._record(repo, state, "data", key, value, MAX_DATA_SETS)

    def save(self) -> None:
        """Write the cache back when something was added (errors cost time only)."""
        if not self._dirty or self.store is None:
            return
        with self._lock:
            self._prune()
            body = json.dumps(
                {
                    "scans": self._load(),
                    "stats": self._stats,
                    "trees": self._trees,
                    "resolutions": self._resolutions,
                    "globs": self._globs,
                },
                sort_keys=True,
                separators=(",", ":"),
            )
            self._dirty = False
        doc = {"format": FORMAT, "python": _PYTHON, "checksum": _checksum(body)}
        try:
            path = self.store.code_cache_path(create=True)
            write_text_atomic(path, json.dumps(doc, sort_keys=True) + "\n" + body + "\n")
        except (OSError, HfbuildError):
            pass  # a store that cannot be written costs a re-scan next time, nothing else

    def _prune(self) -> None:
        """Bound the file: a path keeps only its current stat entry, and beyond `MAX_SCANS`
        scans (`MAX_RESOLUTIONS` resolutions, `MAX_GLOBS` patterns' files) those this process
        did not use are dropped."""
        scans = self._load()
        for key in list(self._stats):
            path = key.rsplit("|", 4)[0]
            current = self._used_stats.get(path)
            if current is not None and key != current:
                del self._stats[key]
        if len(scans) > MAX_SCANS:
            for blob in [b for b in scans if b not in self._used_scans]:
                del scans[blob]
                if len(scans) <= MAX_SCANS:
                    break
        if len(self._resolutions) > MAX_RESOLUTIONS:
            for key in [k for k in self._resolutions if k not in self._used_resolutions]:
                del self._resolutions[key]
                if len(self._resolutions) <= MAX_RESOLUTIONS:
                    break
        if len(self._globs) > MAX_GLOBS:
            for key in [k for k in self._globs if k not in self._used_globs]:
                del self._globs[key]
                if len(self._globs) <= MAX_GLOBS:
                    break


_Parts = tuple[dict[str, Any], dict[str, str], dict[str, Any], dict[str, Any], dict[str, Any]]


def _read(path: str | None) -> _Parts:
    """(scans, stats, trees, resolutions, globs) from the file at `path`; empty unless header
    and checksum check out (entries are checked for shape by their readers). The header is the
    first line and the body the second, so the checksum covers the exact bytes of the body. A
    file without `globs` (written before they were kept) is read without them."""
    if not path:
        return {}, {}, {}, {}, {}
    try:
        with open(path, encoding="utf-8") as f:
            head, body = f.read().split("\n")[:2]
        doc = json.loads(head)
        if (
            not isinstance(doc, dict)
            or doc.get("format") != FORMAT
            or doc.get("python") != _PYTHON
            or doc.get("checksum") != _checksum(body)
        ):
            return {}, {}, {}, {}, {}
        data = json.loads(body)
        scans, stats, trees = data["scans"], data["stats"], data["trees"]
        resolutions, globs = data["resolutions"], data.get("globs", {})
        if not all(isinstance(x, dict) for x in (scans, stats, trees, resolutions, globs)):
            return {}, {}, {}, {}, {}
        stats = {k: v for k, v in stats.items() if isinstance(v, str)}
        return scans, stats, trees, resolutions, globs
    except (OSError, ValueError, KeyError, TypeError):
        return {}, {}, {}, {}, {}


_shared_lock = threading.Lock()
_shared: dict[str, CodeCache] = {}


def for_store(store: Store) -> CodeCache:
    """The one `CodeCache` of this process for `store`."""
    key = store.code_cache_path()
    with _shared_lock:
        cache = _shared.get(key)
        if cache is None:
            cache = _shared[key] = CodeCache(store)
        return cache
