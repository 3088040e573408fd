"""The store's layout: every path under a store directory, and the checks of what names one.

Owns: the formula of each path in the store (`Layout`): `objects/<fp[:2]>/<fp>/` (an entry:
`data/` and `manifest.json`), `tmp/` (builds in progress, leftovers), `locks/` (per-fingerprint
build locks, `roots.lock`), `refs/<stage>`, `observed/<fp[:2]>/<fp>.json`,
`failures/<fp[:2]>/<fp>.json`, `records/<digest>.json`, `cache/code.json`, `roots.json`; making
the store's directories (`ensure`); the default store of a project; what a fingerprint, a stage
name, a relative path in an entry (`safe_rel`) and an observed path (`safe_observed`) may be;
the checksum of a manifest (`manifest_digest`); a permission error in the store as a
`StoreError` pointing at `hfbuild doctor`; the size of a tree and the disk-full error behind an
exception.

Must never: read or write an entry's content, let a stage name or fingerprint address a path
outside the store, import `datasets` or an hfbuild module but `sharing`, `envvars`, `errors`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from hfbuild.core.errors import StoreError
from hfbuild.store import sharing

MANIFEST = "manifest.json"
DATA = "data"
IDS = "ids"  # the manifest's field of the identities of the files an entry's check stats
LEGACY_IDS = "ids.json"  # where the hfbuild of December 2026 kept them, beside the manifest
FP = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_PART = re.compile(r"^[A-Za-z0-9_.-]+$")
POSIX = os.sep == "/"


def check_fp(fp: str) -> str:
    if not FP.match(fp):
        raise StoreError(f"not a fingerprint: {fp!r} (expected 32 lowercase hex digits)")
    return fp


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise StoreError(f"not a stage name: {name!r}")
    return name


def safe_rel(rel: object) -> bool:
    """A relative posix path of plain names: nothing absolute, no '..', nothing hidden."""
    return isinstance(rel, str) and _safe_rel(rel)


@functools.lru_cache(maxsize=1024)
def _safe_rel(rel: str) -> bool:
    # Memoized: a list of shards names the same few files (state.json, data-00000-of-00001.arrow)
    # thousands of times.
    return bool(rel) and all(_PART.match(p) and p not in (".", "..") for p in rel.split("/"))


# The prefix of an observed entry that is a variable read at run time (`env://NAME`, see
# `envvars.observed_entry`), not a path: git and snapshots never give a path an empty part.
OBSERVED = "env://"


def safe_observed(rel: str) -> bool:
    """A repo-relative path as recorded: not absolute, no '..', no empty part; or a variable
    read at run time (`OBSERVED`: `env://NAME`, never a path)."""
    if rel.startswith(OBSERVED):
        return "\0" not in rel and "=" not in rel
    parts = rel.split("/")
    return bool(rel) and not os.path.isabs(rel) and ".." not in parts and "" not in parts


def join(data: str, rel: str) -> str:
    """A safe relative path joined as os.path.join joins its parts (on POSIX, with "/")."""
    return f"{data}/{rel}" if POSIX else os.path.join(data, *rel.split("/"))


def manifest_digest(doc: dict[str, Any]) -> str:
    """A checksum of a stored manifest (without this field), so an edited one is noticed."""
    import xxhash

    body = {k: v for k, v in doc.items() if k != "manifest_digest"}
    return str(xxhash.xxh3_128_hexdigest(json.dumps(body, sort_keys=True).encode()))


@contextlib.contextmanager
def permission_hint(root: str) -> Iterator[None]:
    """Turn a permission error in the store at `root` (another user's files, in a store not
    set up for sharing) into a StoreError that points at `hfbuild doctor`."""
    try:
        yield
    except PermissionError as e:
        raise StoreError(
            f"permission denied on {e.filename or root} in the store {root}: it was written "
            f"by another user without access for you. Run `hfbuild doctor`, which prints the "
            f"commands that make it usable by the group (a shared store must be setgid)."
        ) from e


def default_root(project_root: str) -> str:
    """The store of a project when none is given: $HFBUILD_STORE (relative to the project
    root), else `<project root>/.hfbuild`."""
    store = os.environ.get("HFBUILD_STORE") or ".hfbuild"
    return os.path.join(project_root, store)


def tree_size(path: str) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


def disk_full(e: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT/EFBIG error behind `e` (datasets and pyarrow wrap them), if any."""
    import errno

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return seen
        if isinstance(seen, OSError) and "No space left on device" in str(seen):
            return OSError(errno.ENOSPC, "No space left on device")
        seen = seen.__cause__ or seen.__context__
    return None


class Layout:
    """The paths of the store at `root`. Cheap: nothing is touched until `ensure`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.objects = os.path.join(self.root, "objects")
        self.tmp = os.path.join(self.root, "tmp")

    def entry(self, fp: str) -> str:
        check_fp(fp)
        return os.path.join(self.root, "objects", fp[:2], fp)

    def data_path(self, fp: str) -> str:
        return os.path.join(self.entry(fp), DATA)

    def entry_of(self, fp: str) -> str:
        """`entry` of a key its caller has matched as a fingerprint already: the same path,
        built without a check or `os.path.join` (a shard list's check builds thousands)."""
        if POSIX:
            return f"{self.objects}/{fp[:2]}/{fp}"
        return os.path.join(self.objects, fp[:2], fp)

    def data_of(self, fp: str) -> str:
        """`data_path` of a key its caller has matched as a fingerprint already."""
        return f"{self.entry_of(fp)}/{DATA}" if POSIX else os.path.join(self.entry_of(fp), DATA)

    def lock_path(self, name: str) -> str:
        """The lock file `locks/<name>.lock` (a fingerprint's build lock, or `roots`)."""
        return os.path.join(self.root, "locks", name + ".lock")

    def roots_path(self) -> str:
        return os.path.join(self.root, "roots.json")

    def ref_path(self, stage: str) -> str:
        return os.path.join(self.root, "refs", check_name(stage))

    def record_path(self, name: str) -> str:
        """The no-import record of one dodo file (`record.py`); `name` is a digest."""
        return os.path.join(self.root, "records", check_fp(name) + ".json")

    def observed_path(self, static_fp: str) -> str:
        check_fp(static_fp)
        if POSIX:
            return f"{self.root}/observed/{static_fp[:2]}/{static_fp}.json"
        return os.path.join(self.root, "observed", static_fp[:2], static_fp + ".json")

    def failure_path(self, fp: str) -> str:
        return os.path.join(self.root, "failures", check_fp(fp)[:2], fp + ".json")

    def key_dirs(self) -> list[str]:
        """The directories whose entries a stage's current key is chosen among (`fullkey`):
        the stored results and the observed path sets. Publishing, pulling, removing or
        recording in either renames inside one of their subdirectories."""
        return [os.path.join(self.root, "objects"), os.path.join(self.root, "observed")]

    def code_cache_path(self, *, create: bool = False) -> str:
        """The code cache file (`caches.py`): import scans and work-tree blob ids. With
        `create`, the store and the file's directory are made first."""
        if create:
            self.ensure()
            sharing.makedirs(os.path.join(self.root, "cache"))
        return os.path.join(self.root, "cache", "code.json")

    def checked_path(self, *, create: bool = False) -> str:
        """The manifests found intact by their checksum, with their file's stat data then
        (`entry.py`). With `create`, the store and the file's directory are made first."""
        if create:
            self.ensure()
            sharing.makedirs(os.path.join(self.root, "cache"))
        return os.path.join(self.root, "cache", "checked.json")

    def ensure(self) -> None:
        """Make the store's directories (and its `.gitignore`) if they are not there."""
        try:
            for sub in ("objects", "tmp", "locks", "refs"):
                sharing.makedirs(os.path.join(self.root, sub))
            ignore = os.path.join(self.root, ".gitignore")
            if not os.path.exists(ignore):
                text = "# created by hfbuild: the store is never committed\n*\n"
                sharing.write_text_atomic(ignore, text)
        except OSError as e:
            raise StoreError(
                f"cannot create the store at {self.root} ({e.strerror}). Make it writable, or "
                f"point HFBUILD_STORE at a writable directory."
            ) from e

    def absent(self, fps: Iterable[str]) -> set[str]:
        """Of `fps`, those with no entry directory now, by one listing of each
        `objects/<fp[:2]>/` they fall in (a directory that cannot be listed for another
        reason than its absence leaves its keys out: not known to be absent)."""
        by_dir: dict[str, list[str]] = {}
        for fp in fps:
            by_dir.setdefault(fp[:2], []).append(fp)
        out: set[str] = set()
        for d, keys in by_dir.items():
            try:
                names = set(os.listdir(os.path.join(self.root, "objects", d)))
            except FileNotFoundError:
                names = set()
            except OSError:
                continue
            out.update(k for k in keys if k not in names)
        return out

    def fingerprints(self) -> list[str]:
        """The fingerprints of every entry directory under `objects/`, sorted."""
        base = os.path.join(self.root, "objects")
        out = []
        for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            for fp in sorted(os.listdir(os.path.join(base, d))):
                if FP.match(fp):
                    out.append(fp)
        return out
