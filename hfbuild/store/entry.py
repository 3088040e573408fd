"""An entry's manifest as the store reads it, and the identity record kept inside it.

Owns: reading an entry's `manifest.json` (`Manifests.read_why`: the manifest, or why it is not
usable: unreadable, not JSON, another fingerprint's, written without a checksum or edited since,
listing unsafe paths), its identity record (the manifest's `ids`, outside its checksum, never
pushed; an entry of the hfbuild that kept it in `ids.json` read from there) kept for the
process and rewritten whole and atomically (`write_ids`); the manifest's stamp ([mtime ns,
size]); the entries an entry references (the shards a list names, an indices entry's base);
the manifest's written layout (`indent`), the rows of a stage's list of shards (`row_base`,
`row_indexed`, `without_empty`, `listed_files`) and the form of an identity record (`identity`,
`flat`, `file_digest`).

Must never: decide whether an entry is intact (`check.py`), unpickle or execute anything
it reads, import `datasets`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from hfbuild.core import teardown
from hfbuild.core.errors import HfbuildError
from hfbuild.store import listform, sharing
from hfbuild.store.paths import (
    FP,
    IDS,
    LEGACY_IDS,
    MANIFEST,
    POSIX,
    Layout,
    manifest_digest,
    safe_rel,
)


class Manifests:
    """The manifests of the entries of one store, with the identity records they held when
    this process read them (a reference, not a verdict)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        # fingerprint -> the identity record its manifest held when this process read it
        self._ids: dict[str, dict[str, Any]] = {}
        self._checked: dict[str, list[int]] | None = None  # `checked.json`, read when needed

    def read(self, fp: str) -> dict[str, Any] | None:
        """The entry's manifest, or None when there is no intact manifest under `fp`."""
        doc, _ = self.read_why(fp)
        return doc

    def read_why(self, fp: str) -> tuple[dict[str, Any] | None, str | None]:
        """(manifest, None), or (None, why it is not usable); why is None when absent."""
        try:
            with open(os.path.join(self.layout.entry(fp), MANIFEST), encoding="utf-8") as f:
                text = f.read()
                st = os.fstat(f.fileno())
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as e:
            return None, f"its manifest cannot be read ({e})"
        try:
            if len(text) < CHECKED_MIN:
                doc = json.loads(text)
            else:  # hundreds of thousands of objects that live on: no collection over them
                with teardown.collection_paused():
                    doc = json.loads(text)
        except ValueError:
            return None, "its manifest is not valid JSON"
        ids = doc.pop(IDS, None) if isinstance(doc, dict) else None
        if isinstance(ids, dict):
            self._ids[fp] = ids
        else:
            self._ids.pop(fp, None)
        if not isinstance(doc, dict) or doc.get("fingerprint") != fp:
            return None, "its manifest belongs to another fingerprint"
        if "manifest_digest" not in doc:
            return None, "it was written by an older hfbuild, without a manifest checksum"
        if not self._checked_before(fp, st) and doc.get("manifest_digest") != manifest_digest(doc):
            return None, "its manifest was edited after it was written"
        self._check_done(fp, st)
        try:
            if len(text) < CHECKED_MIN:
                listform.expand(doc)  # the rows of a list or pack written compactly
            else:
                with teardown.collection_paused():
                    listform.expand(doc)
        except ValueError as e:
            return None, f"its list of shards cannot be read ({e})"
        files = doc.get("files")
        if not isinstance(files, dict) or not all(safe_rel(k) for k in files):
            return None, "its manifest lists unsafe file paths"
        return doc, None

    # A large manifest (a stage's list of thousands of shards: megabytes of JSON) whose
    # checksum was found right is not checked again while its file has the stat data it had
    # then (`checked.json` in the store's cache directory): writing the file moves its mtime
    # and ctime, replacing it its inode, and none is recorded within `RACY_NS` of a change.
    # Re-encoding such a manifest to check it cost a no-op over 5,000 files ~30 ms.

    def _checked_before(self, fp: str, st: os.stat_result) -> bool:
        if st.st_size < CHECKED_MIN:
            return False
        if self._checked is None:
            self._checked = _read_checked(self.layout.checked_path())
        return self._checked.get(fp) == _stat_key(st)

    def _check_done(self, fp: str, st: os.stat_result) -> None:
        """`fp`'s manifest, whose stat data is `st`, passed its checksum: remembered when
        it is large and its last change lies outside the racy window."""
        if st.st_size < CHECKED_MIN or self._checked_before(fp, st):
            return
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) <= RACY_NS:
            return
        # Again from the file, as another process may have added its own since.
        checked = _read_checked(self.layout.checked_path())
        checked = dict(list(checked.items())[-(CHECKED_KEEP - 1) :]) if checked else {}
        checked[fp] = _stat_key(st)
        self._checked = checked
        with contextlib.suppress(OSError, HfbuildError):  # a cache: costs time only
            sharing.write_json_atomic(self.layout.checked_path(create=True), checked, durable=False)

    def ids(self, fp: str) -> dict[str, Any]:
        """`fp`'s identity record (its manifest's `ids`, read with it): `own`, relative path
        -> [size, mtime ns, ctime ns, inode] (and a digest of the bytes for a file that is
        not Arrow data); for a list of shards, `listed`, the digest of its shards' and
        bases' identities. {} if none."""
        ids = self._ids.get(fp)
        if ids is None:
            self.read_why(fp)
            ids = self._ids.get(fp)
        if ids is None:  # an entry of the hfbuild that kept them in ids.json
            try:
                path = os.path.join(self.layout.entry_of(fp), LEGACY_IDS)
                with open(path, encoding="utf-8") as f:
                    legacy = json.load(f)
            except (OSError, ValueError):
                legacy = None
            ids = self._ids[fp] = legacy if isinstance(legacy, dict) else {}
        return ids

    def sealed(self, fp: str, ids: dict[str, Any]) -> None:
        """Remember `ids` as the record of `fp`'s manifest, as this process just wrote it."""
        self._ids[fp] = ids

    def write_ids(self, fp: str, ids: dict[str, Any]) -> None:
        """Record `ids` as `fp`'s, in its manifest (rewritten whole, atomically: a reader
        sees the old record or the new one). An entry this user cannot write keeps its old
        record (it is then hashed in full again when next checked: slower, never wrong)."""
        self._ids[fp] = ids
        path = os.path.join(self.layout.entry_of(fp), MANIFEST)
        with contextlib.suppress(OSError, ValueError):
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            if not isinstance(doc, dict) or doc.get("fingerprint") != fp:
                return
            doc[IDS] = ids
            sharing.write_json_atomic(path, doc, durable=False, indent=indent(doc))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.layout.entry_of(fp), LEGACY_IDS))

    def stamp(self, fp: str) -> list[int] | None:
        """The entry's manifest file as [mtime in ns, size] (None when absent): a stamp
        that changes when the entry is published again, without reading the manifest."""
        if not FP.match(fp):
            return None
        entry = self.layout.entry_of(fp)
        try:
            st = os.stat(f"{entry}/{MANIFEST}" if POSIX else os.path.join(entry, MANIFEST))
        except OSError:
            return None
        return [st.st_mtime_ns, st.st_size]

    def references(self, fp: str, doc: dict[str, Any] | None = None) -> list[str]:
        """The entries `fp`'s entry needs: the shards a stage result made of shards lists,
        in order (a packed shard's pack, once for its consecutive rows), and the base an
        indices entry selects rows of ([] for others)."""
        doc = (doc if doc is not None else self.read(fp)) or {}
        rows = doc.get("shards")
        keys: list[str] = []
        for r in rows if isinstance(rows, list) else []:
            if not (isinstance(r, list) and len(r) >= 2):
                continue
            pack = row_pack(r)
            key = pack[0] if pack is not None else str(r[1])
            if not keys or keys[-1] != key:  # a pack's rows are consecutive
                keys.append(key)
        ind = doc.get("indices")
        if isinstance(ind, dict):
            keys.append(str(ind.get("base")))
        return [k for k in keys if FP.match(k)]


CHECKED_MIN = 256 * 1024  # bytes: a smaller manifest is checked again each time (< 3 ms)
CHECKED_KEEP = 256  # manifests remembered as checked (the latest)
RACY_NS = 2_000_000_000  # as the code cache's racy-git margin


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read_checked(path: str) -> dict[str, list[int]]:
    """The manifests remembered as checked: fingerprint -> their file's `_stat_key`."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {
        k: v
        for k, v in doc.items()
        if FP.match(k) and isinstance(v, list) and len(v) == 5 and all(type(x) is int for x in v)
    }


def indent(doc: dict[str, Any]) -> int | None:
    """How a manifest is written: indented for people, but a stage's list of shards or a
    pack's rows (thousands of rows, as rows or compact: `listform.py`) on one line, by
    json's C encoder (its indenting encoder is pure Python). The manifest's checksum is of
    its content, not its layout."""
    return None if "shards" in doc or isinstance(doc.get("pack"), (list, dict)) else 1


def flat(files: dict[str, int], own: dict[str, Any]) -> tuple[int, ...] | None:
    """The identities an entry's own record holds for `files`, as a check stats them
    ((mtime ns, ctime ns, inode) each, in order; None when it lacks one, or records another
    size)."""
    out: list[int] = []
    for rel, size in files.items():
        r = own.get(rel)
        if not (isinstance(r, list) and len(r) >= 4 and r[0] == size):
            return None
        out += r[1:4]
    return tuple(out)


def identity(st: os.stat_result) -> list[Any]:
    """A file's identity as an entry's record holds it: [size, mtime ns, ctime ns, inode]."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def file_digest(path: str) -> str:
    """A digest of a (small, JSON) file's bytes."""
    import xxhash

    with open(path, "rb") as f:
        return str(xxhash.xxh3_128_hexdigest(f.read()))


def listed_files(doc: dict[str, Any]) -> list[tuple[str, dict[str, int]]]:
    """The entries whose files a list of shards' check stats, with those files, in its
    order: each shard listed with its files (a packed shard's pack, once for its
    consecutive rows), and the base an indices shard's row names."""
    rows = doc.get("shards")
    out: list[tuple[str, dict[str, int]]] = []
    safe: object = object()  # the files dict found safe last (a pack's rows share one)
    for row in rows if isinstance(rows, list) else []:
        if not (isinstance(row, list) and len(row) >= 4 and FP.match(str(row[1]))):
            continue
        files, base = row[3], row_base(row)
        ok = files is safe or (isinstance(files, dict) and all(safe_rel(k) for k in files))
        if not ok or (row_indexed(row) and base is None):
            continue
        safe = files
        owner = row_owner(row)
        if out and owner == out[-1][0] and base is None:
            continue  # the next row of the same pack: its files are stat'ed once
        out.append((owner, files))
        if base is not None:
            out.append(base)
    return out


def row_pack(row: list[Any]) -> tuple[str, int, int] | None:
    """The pack a packed shard's row in a stage's list names, and the shard's rows in it
    ([from, to)): `[split, key, label, the pack's files, {..., "pack": key, "span": [from,
    to]}]`; None for a shard that is an entry of its own (or a malformed pack row, which is
    then checked as a missing entry)."""
    facts = row[4] if len(row) >= 5 else None
    if not isinstance(facts, dict):
        return None
    pack, span = facts.get("pack"), facts.get("span")
    if not (isinstance(pack, str) and FP.match(pack) and isinstance(span, list)):
        return None
    if not (len(span) == 2 and all(isinstance(v, int) and v >= 0 for v in span)):
        return None
    if span[0] > span[1]:
        return None
    return pack, span[0], span[1]


def row_owner(row: list[Any]) -> str:
    """The entry holding a listed shard's files: its pack, else the shard's own entry."""
    pack = row_pack(row)
    return pack[0] if pack is not None else str(row[1])


def row_indexed(row: list[Any]) -> bool:
    """Whether a row of a stage's shard list is an indices shard's (its facts name a base)."""
    return len(row) >= 5 and isinstance(row[4], dict) and "base" in row[4]


def without_empty(rows: list[list[Any]]) -> list[list[Any]]:
    """A split's shard rows without the empty ones that hold no rows of a base (a map of no
    rows gives its input's columns, not the function's: datasets' map over the whole input
    takes its features from the rows it has), when a shard with rows is listed; else all."""

    def empty(row: list[Any]) -> bool:
        facts = row[4] if len(row) >= 5 and isinstance(row[4], dict) else {}
        return facts.get("rows") == 0 and "base" not in facts and not row_indexed(row)

    kept = [r for r in rows if not empty(r)]
    return kept or rows[:1]


def row_base(row: list[Any]) -> tuple[str, dict[str, int]] | None:
    """The base an indices shard's row in a stage's list names, with its files' sizes
    (`[split, key, label, files, {..., "base": key, "base_files": {...}}]`), else None
    (also for an indices shard whose base is listed without sizes: it is checked in full)."""
    extra = row[4] if len(row) >= 5 else None
    if not isinstance(extra, dict):
        return None
    base, files = extra.get("base"), extra.get("base_files")
    if not isinstance(base, str) or not FP.match(base) or not isinstance(files, dict):
        return None
    if not all(safe_rel(k) and isinstance(v, int) for k, v in files.items()):
        return None
    return base, files
