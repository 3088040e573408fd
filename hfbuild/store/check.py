"""Whether a store entry may be served: the checks of its files, shards and base.

Owns: `Checks`, the verdict on an entry for one process. An entry is served while its manifest
is intact (`entry.py`), every data file it lists is present with its size, and the
files have the identities (size, mtime and ctime in ns, inode) its record holds: one stat per
file, no data read. When they differ, the entry is hashed in full (`content.py`): equal, the
identities it has now are recorded; different, it is damaged (remembered with the identities it
had, so it is hashed once per process). A stage result made of shards is served only while
each shard it lists (and the base an indices shard's row names) is intact: one digest of all
their identities, else each checked by itself. An indices entry (`indexed.py`) is served only
while its base is intact and holds the rows it was built over. What this process knows of
each entry's identities (`files_intact`, `published`).

Must never: write an entry's content or manifest but its identity record, unpickle or execute
anything it reads, import `datasets` outside the full check of an entry whose files'
identities changed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from hfbuild.store.entry import (
    Manifests,
    file_digest,
    flat,
    identity,
    listed_files,
    row_base,
    row_indexed,
    row_owner,
)
from hfbuild.store.paths import FP, Layout, join, safe_rel


class Checks:
    """The checks of one store's entries. `load` loads an entry's Dataset (for the full
    check of one whose files' identities changed)."""

    def __init__(self, layout: Layout, manifests: Manifests, load: Callable[[str], Any]) -> None:
        self.layout = layout
        self.manifests = manifests
        self._load = load
        # fingerprint -> the identities recorded for its files, (mtime ns, ctime ns, inode)
        # of each in its manifest's order, as its record or a list's holds them, or as
        # published or re-recorded by this process: a reference, not a verdict.
        self._known: dict[str, tuple[int, ...]] = {}
        # fingerprint -> (its files' identities then, why it is damaged): one full hash per
        # damage per process, however often it is checked.
        self._damaged: dict[str, tuple[list[list[Any] | None], str]] = {}

    def check(self, fp: str) -> str | None:
        """Why the entry for `fp` cannot be used (None when it is intact or absent). Cheap:
        the manifest and the presence and size of every data file; no data is read."""
        doc, why = self.manifests.read_why(fp)
        if doc is None:
            if why is None and os.path.isdir(self.layout.entry(fp)):
                return "it has no manifest"
            return why
        return self._check_files(fp, doc)

    def intact_manifest(self, fp: str) -> dict[str, Any] | None:
        """The manifest of the complete, intact entry for `fp` (see `check`), else None;
        the manifest is read once."""
        doc, _ = self.manifests.read_why(fp)
        return doc if doc is not None and self._check_files(fp, doc) is None else None

    def published(self, fp: str, ids: tuple[int, ...]) -> None:
        """`fp` was just published with files of these identities: known, not damaged."""
        self._known[fp] = ids
        self._damaged.pop(fp, None)

    def knows(self, fp: str) -> bool:
        """Whether this process knows the identities recorded for `fp`'s files."""
        return fp in self._known

    def renewed(self, fp: str, ids: tuple[int, ...]) -> None:
        """`fp`'s files have these identities now, recorded (a link renewed their ctimes)."""
        self._known[fp] = ids

    def _check_files(self, fp: str, doc: dict[str, Any]) -> str | None:
        why = self._check_shards(fp, doc) or self.check_base(doc)
        if why is not None:
            return why
        files = doc["files"]
        if not files:  # a list of shards: its rows are its files, checked above
            self._known[fp] = ()
            return None
        own = self.manifests.ids(fp).get("own")
        rec = flat(files, own) if isinstance(own, dict) else None
        bad, now = _stat_files(self.layout.data_of(fp), files)
        if bad is not None:
            rel, size, actual = bad
            if actual is None:
                return f"{rel} is missing"
            return f"{rel} is {actual} bytes, not {size} (truncated or overwritten)"
        if rec is not None and now == rec:
            self._known[fp] = rec
            return None
        return self._confirm(fp, doc, own if isinstance(own, dict) else {})

    def _check_shards(self, fp: str, doc: dict[str, Any], *, remember: bool = False) -> str | None:
        """A stage result made of shards is served only while every shard is intact: each
        shard's files are present with the sizes the list records, and have the identities
        the list's record holds (one digest of them all: one stat per file and one
        small read); a shard listed without sizes is checked in
        full. The same holds for the files of the base an indices shard's row names
        (`row_base`). When the identities differ, each shard and base is checked by itself
        (`_verified`: its own record, else its rows hashed in full), and the list records
        the identities they have then. With `remember`, each one's identities are then
        known to this process (`files_intact`). The digest chains Python's hash of tuples of
        ints (deterministic, no hash seed; another Python may chain otherwise: the list's
        shards are then checked by their own records once, and the digest recorded again)."""
        rows = doc.get("shards")
        if not isinstance(rows, list):
            return None
        acc = 0  # the digest of every listed file's identity, in order (`listed_digest`)
        ident: list[int] | None = [] if remember else None
        spans: list[tuple[str, dict[str, int], int]] = []  # (shard or base, files, end)
        safe: object = object()  # the files dict found safe last (a pack's rows share one)
        for row in rows:
            key = str(row[1]) if isinstance(row, list) and len(row) >= 2 else ""
            if not FP.match(key):
                return "its list of shards is malformed"
            files: Any = row[3] if len(row) >= 4 else None
            base = row_base(row)
            ok = files is safe or (isinstance(files, dict) and all(safe_rel(k) for k in files))
            if ok:
                safe = files
            if not ok or (row_indexed(row) and base is None):
                why = self.check(key) if self.manifests.read(key) is not None else "is missing"
                if why is not None:
                    return f"its shard {key} {why}" if why == "is missing" else f"{key}: {why}"
                continue
            holder = row_owner(row)
            if spans and spans[-1][0] == holder and base is None:
                continue  # the next row of the same pack: its files were stat'ed
            for owner, listed in [(holder, files), *([base] if base is not None else [])]:
                data = self.layout.data_of(owner)
                for rel, size in listed.items():
                    try:
                        st = os.stat(join(data, rel))
                    except OSError:
                        return f"its shard {owner} is missing {rel}"
                    if st.st_size != size:
                        return f"its shard {owner} has {rel} of {st.st_size} bytes, not {size}"
                    acc = hash((acc, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
                    if ident is not None:
                        ident += (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                spans.append((owner, listed, len(ident) if ident is not None else 0))
        if not spans:
            return None
        if self.manifests.ids(fp).get("listed") == acc:
            start = 0
            for owner, _, end in spans if remember else []:
                self._known[owner] = tuple((ident or [])[start:end])
                start = end
            return None
        for owner, listed, _ in spans:
            known = self._known.get(owner)
            if known is not None and _stat_files(self.layout.data_of(owner), listed)[1] == known:
                continue
            why = self._verified(owner)
            if why is not None:
                what = (
                    "shard"
                    if any(r[1] == owner for r in rows)
                    else "shards' pack"
                    if any(row_owner(r) == owner for r in rows)
                    else "shards' base"
                )
                return f"its {what} {owner} is damaged ({why})"
        digest = self.listed_digest(doc)
        if digest is not None:
            self.manifests.write_ids(fp, {"own": {}, "listed": digest})
        return None

    def listed_digest(self, doc: dict[str, Any]) -> int | None:
        """The digest of the identities recorded for every file a list of shards' check
        stats, in its order (None while one of them has no record)."""
        ident: list[int] = []
        for owner, files in listed_files(doc):
            rec = self._known.get(owner)
            if rec is None:
                own = self.manifests.ids(owner).get("own")
                rec = flat(files, own) if isinstance(own, dict) else None
            if rec is None:
                return None
            ident += rec
        acc = 0
        for k in range(0, len(ident), 3):
            acc = hash((acc, ident[k], ident[k + 1], ident[k + 2]))
        return acc

    def _verified(self, fp: str) -> str | None:
        """Why the entry `fp` cannot be used (None: intact, and `_known[fp]` holds the
        identities recorded for its files): its own check, which hashes it in full when its
        files' identities are not the ones its own record holds."""
        why = self.check(fp)
        if why is None and fp not in self._known:
            return "it is missing"
        return why

    def _confirm(self, fp: str, doc: dict[str, Any], old: dict[str, Any]) -> str | None:
        """The full check of an entry whose files' identities are not those recorded (or
        none are recorded: an entry written by an older hfbuild, or copied or restored
        elsewhere, where inodes and ctimes differ): its rows hashed (`content.py`) against
        its content hash, and its other (JSON) files' bytes against the digests recorded
        with them. Equal: the identities they have now are recorded, and it is served; else
        it is damaged (remembered with the identities it had, so it is hashed once)."""
        data = self.layout.data_of(fp)
        files = doc["files"]
        before = _identities(data, files)
        seen = self._damaged.get(fp)
        if seen is not None and seen[0] == before:
            return seen[1]
        digests: dict[str, str] = {}
        why = _full_check(data, doc, old, digests, lambda: self._load(fp))
        if why is None and _identities(data, files) != before:
            why = "its files changed while they were checked"
        if why is not None:
            self._damaged[fp] = (before, why)
            return why
        rec: dict[str, list[Any]] = {}
        for rel, ident in zip(files, before, strict=True):
            assert ident is not None  # present: the sizes were checked, and unchanged since
            rec[rel] = [*ident, digests[rel]] if rel in digests else ident
        self.manifests.write_ids(fp, {"own": rec})
        self._known[fp] = flat(files, rec) or ()
        return None

    def check_base(self, doc: dict[str, Any]) -> str | None:
        """An indices entry (`indexed.py`) is served only while its base is intact and still
        holds the rows it was built over (the content hash it recorded)."""
        ind = doc.get("indices")
        if ind is None:
            return None
        base = ind.get("base") if isinstance(ind, dict) else None
        parts = ind.get("parts") if isinstance(ind, dict) else None
        if not isinstance(base, str) or not FP.match(base) or not isinstance(parts, list):
            return "its indices part is malformed"
        based = self.intact_manifest(base)
        if based is None:
            return f"its base {base} (the entry holding its rows) is missing or damaged"
        if based.get("indices") is not None:
            return f"its base {base} is itself an indices entry"
        if based.get("content_hash") != ind.get("base_hash"):
            return f"its base {base} holds other rows than it was built over"
        return None

    def files_intact(self, fp: str, files: dict[str, int]) -> bool:
        """Whether the entry `fp` has these data files with these sizes and the identities
        recorded for them (one stat each, as `check` makes of a listed shard; the entry's
        manifest is not read while they are the ones this process knows, from a list
        naming it that it checked, see `check_list`). Otherwise it is checked as `check`
        checks it: its own record, else a full hash."""
        if not FP.match(fp) or not all(safe_rel(rel) for rel in files):
            return False
        bad, now = _stat_files(self.layout.data_of(fp), files)
        if bad is not None:
            return False
        if self._known.get(fp) == now:
            return True
        return self._verified(fp) is None

    def check_list(self, fp: str, doc: dict[str, Any]) -> str | None:
        """`check` of the list of shards `doc` (the manifest of `fp`, already read) without
        reading it again: afterwards the identities of the shards it names are known."""
        return self._check_shards(fp, doc, remember=True)


def _full_check(
    data: str,
    doc: dict[str, Any],
    old: dict[str, Any],
    digests: dict[str, str],
    load: Callable[[], Any],
) -> str | None:
    """Why the entry whose files are at `data` is damaged, hashed in full: its JSON files'
    digests (into `digests`) against `old`'s, its rows (`load`ed) against its content hash."""
    for rel in doc["files"]:
        if rel.endswith(".arrow"):  # rows: the content hash below
            continue
        digests[rel] = file_digest(join(data, rel))
        r = old.get(rel)
        if isinstance(r, list) and len(r) >= 5 and r[4] != digests[rel]:
            return f"its {rel} was changed after it was stored"
    want = doc.get("content_hash")
    if not isinstance(want, str):
        return "it records no content hash to check its data against"
    from hfbuild.store.content import dataset_hash

    try:
        got = dataset_hash(load())
    except Exception as e:
        return f"its data cannot be read ({type(e).__name__}: {e})"
    if got != want:
        return "its data was changed after it was stored: its rows no longer have its content hash"
    return None


def _stat_files(
    data: str, files: dict[str, int]
) -> tuple[tuple[str, int, int | None] | None, tuple[int, ...]]:
    """(the first of `files` (relative path -> size, each `safe_rel`) under `data` that is
    missing (actual None) or of another size, as (path, size, actual), else None; the
    identities of the files, (mtime ns, ctime ns, inode) each, in order). One stat each."""
    ident: list[int] = []
    for rel, size in files.items():
        try:
            st = os.stat(join(data, rel))
        except OSError:
            return (rel, size, None), ()
        if st.st_size != size:
            return (rel, size, st.st_size), ()
        ident += (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    return None, tuple(ident)


def _identities(data: str, files: dict[str, int]) -> list[list[Any] | None]:
    """Each of `files`' identity now (None: missing), in order."""
    out: list[list[Any] | None] = []
    for rel in files:
        try:
            out.append(identity(os.stat(join(data, rel))))
        except OSError:
            out.append(None)
    return out
