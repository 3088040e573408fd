"""The content-addressed store of built results.

Owns: every path under the store directory. `objects/<fp[:2]>/<fp>/` holds `data/` (a
`save_to_disk` layout) and `manifest.json`; `tmp/` holds builds in progress; `locks/` the
per-fingerprint build locks; `refs/<stage>` the last fingerprint built under each stage name;
`observed/<fp[:2]>/<fp>.json` the files builds of a static fingerprint read at run time;
`failures/<fp[:2]>/<fp>.json` the error the last build of a key failed with (until one succeeds);
`content/<hash[:2]>/<hash>` an entry holding that content hash's rows: a result equal to one
already stored is published with hard links to its Arrow files (one copy; `_link_equal`).
An entry's `data/` may instead hold only indices into another entry, its *base*
(`indexed.py`): it is intact only while its base is, and it references its base as a stage
result made of shards references its shards (gc, push and pull follow `references`).
An entry exists only once its complete manifest does: builds write into `tmp/` and publish
with one atomic rename. Modes follow sharing.py (group-shared inside a setgid store).
Each entry's manifest records, under `ids` (outside its checksum, never pushed), the identity
(size, mtime and ctime in ns, inode) of every data file its check stats (its own; for a list
of shards, its shards' and their bases'), as they were when published or last hashed in full:
an entry is served while they hold, and hashed in full (`content.py`) when they do not (a
same-size edit is damage, a touch is not). One read per entry: the manifest. Entries of the
hfbuild that kept them apart in `ids.json` are read as well.

Must never: unpickle or execute anything it reads, import `datasets` outside `load` and the
full check of an entry whose files' identities changed, or let a stage name or fingerprint
address a path outside the store.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from hfbuild import sharing, trash
from hfbuild.envvars import OBSERVED
from hfbuild.errors import StoreError

MANIFEST = "manifest.json"
DATA = "data"
IDS = "ids"  # the manifest's field of the identities of the files an entry's check stats
_LEGACY_IDS = "ids.json"  # where the hfbuild of December 2026 kept them, beside the manifest
_FP = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_PART = re.compile(r"^[A-Za-z0-9_.-]+$")
_POSIX = os.sep == "/"
_FAILURE_CHARS = 8000  # of a failed build's message kept for `status` and `explain`


def _check_fp(fp: str) -> str:
    if not _FP.match(fp):
        raise StoreError(f"not a fingerprint: {fp!r} (expected 32 lowercase hex digits)")
    return fp


def safe_rel(rel: object) -> bool:
    """A relative posix path of plain names: nothing absolute, no '..', nothing hidden."""
    return isinstance(rel, str) and _safe_rel(rel)


@functools.lru_cache(maxsize=1024)
def _safe_rel(rel: str) -> bool:
    # Memoized: a list of shards names the same few files (state.json, data-00000-of-00001.arrow)
    # thousands of times.
    return bool(rel) and all(_PART.match(p) and p not in (".", "..") for p in rel.split("/"))


def manifest_digest(doc: dict[str, Any]) -> str:
    """A checksum of a stored manifest (without this field), so an edited one is noticed."""
    import xxhash

    body = {k: v for k, v in doc.items() if k != "manifest_digest"}
    return str(xxhash.xxh3_128_hexdigest(json.dumps(body, sort_keys=True).encode()))


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise StoreError(f"not a stage name: {name!r}")
    return name


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


class Store:
    """A store directory. Cheap to create: nothing is touched until something is written."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self._objects = os.path.join(self.root, "objects")
        # fingerprint -> the identities recorded for its files, (mtime ns, ctime ns, inode)
        # of each in its manifest's order, as its ids.json or a list's holds them, or as
        # published or re-recorded by this process: a reference, not a verdict.
        self._known: dict[str, tuple[int, ...]] = {}
        # fingerprint -> (its files' identities then, why it is damaged): one full hash per
        # damage per process, however often it is checked.
        self._damaged: dict[str, tuple[list[list[Any] | None], str]] = {}
        # fingerprint -> the identity record its manifest held when this process read it
        self._ids: dict[str, dict[str, Any]] = {}

    # -- layout ------------------------------------------------------------------------------

    def entry(self, fp: str) -> str:
        _check_fp(fp)
        return os.path.join(self.root, "objects", fp[:2], fp)

    def data_path(self, fp: str) -> str:
        return os.path.join(self.entry(fp), DATA)

    def _entry_of(self, fp: str) -> str:
        """`entry` of a key its caller has matched as a fingerprint already: the same path,
        built without a check or `os.path.join` (a shard list's check builds thousands)."""
        if _POSIX:
            return f"{self._objects}/{fp[:2]}/{fp}"
        return os.path.join(self._objects, fp[:2], fp)

    def _data_of(self, fp: str) -> str:
        """`data_path` of a key its caller has matched as a fingerprint already."""
        return f"{self._entry_of(fp)}/{DATA}" if _POSIX else os.path.join(self._entry_of(fp), DATA)

    def code_cache_path(self, *, create: bool = False) -> str:
        """The code cache file (`caches.py`): import scans and work-tree blob ids. With
        `create`, the store and the file's directory are made first."""
        if create:
            self._ensure()
            sharing.makedirs(os.path.join(self.root, "cache"))
        return os.path.join(self.root, "cache", "code.json")

    def _ensure(self) -> None:
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

    # -- reading -----------------------------------------------------------------------------

    def read_manifest(self, fp: str) -> dict[str, Any] | None:
        """The entry's manifest, or None when there is no intact manifest under `fp`."""
        doc, _ = self._manifest(fp)
        return doc

    def _manifest(self, fp: str) -> tuple[dict[str, Any] | None, str | None]:
        """(manifest, None), or (None, why it is not usable); why is None when absent."""
        try:
            with open(os.path.join(self.entry(fp), MANIFEST), encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as e:
            return None, f"its manifest cannot be read ({e})"
        try:
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
        if doc.get("manifest_digest") != manifest_digest(doc):
            return None, "its manifest was edited after it was written"
        files = doc.get("files")
        if not isinstance(files, dict) or not all(safe_rel(k) for k in files):
            return None, "its manifest lists unsafe file paths"
        return doc, None

    def check(self, fp: str) -> str | None:
        """Why the entry for `fp` cannot be used (None when it is intact or absent). Cheap:
        the manifest and the presence and size of every data file; no data is read."""
        doc, why = self._manifest(fp)
        if doc is None:
            if why is None and os.path.isdir(self.entry(fp)):
                return "it has no manifest"
            return why
        return self._check_files(fp, doc)

    def intact_manifest(self, fp: str) -> dict[str, Any] | None:
        """The manifest of the complete, intact entry for `fp` (see `check`), else None;
        the manifest is read once."""
        doc, _ = self._manifest(fp)
        return doc if doc is not None and self._check_files(fp, doc) is None else None

    def _check_files(self, fp: str, doc: dict[str, Any]) -> str | None:
        why = self._check_shards(fp, doc) or self.check_base(doc)
        if why is not None:
            return why
        files = doc["files"]
        if not files:  # a list of shards: its rows are its files, checked above
            self._known[fp] = ()
            return None
        own = self._read_ids(fp).get("own")
        rec = _flat(files, own) if isinstance(own, dict) else None
        bad, now = _stat_files(self._data_of(fp), files)
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
        the list's `ids.json` records (one digest of them all: one stat per file and one
        small read); a shard listed without sizes is checked in
        full. The same holds for the files of the base an indices shard's row names
        (`_row_base`). When the identities differ, each shard and base is checked by itself
        (`_verified`: its own record, else its rows hashed in full), and the list records
        the identities they have then. With `remember`, each one's identities are then
        known to this process (`files_intact`). The digest chains Python's hash of tuples of
        ints (deterministic, no hash seed; another Python may chain otherwise: the list's
        shards are then checked by their own records once, and the digest recorded again)."""
        rows = doc.get("shards")
        if not isinstance(rows, list):
            return None
        acc = 0  # the digest of every listed file's identity, in order (`_chain`)
        ident: list[int] | None = [] if remember else None
        spans: list[tuple[str, dict[str, int], int]] = []  # (shard or base, files, end)
        for row in rows:
            key = str(row[1]) if isinstance(row, list) and len(row) >= 2 else ""
            if not _FP.match(key):
                return "its list of shards is malformed"
            files = row[3] if len(row) >= 4 else None
            base = _row_base(row)
            if (
                not isinstance(files, dict)
                or not all(safe_rel(k) for k in files)
                or (_row_indexed(row) and base is None)
            ):
                why = self.check(key) if self.read_manifest(key) is not None else "is missing"
                if why is not None:
                    return f"its shard {key} {why}" if why == "is missing" else f"{key}: {why}"
                continue
            for owner, listed in [(key, files), *([base] if base is not None else [])]:
                data = self._data_of(owner)
                for rel, size in listed.items():
                    try:
                        st = os.stat(_path(data, rel))
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
        if self._read_ids(fp).get("listed") == acc:
            start = 0
            for owner, _, end in spans if remember else []:
                self._known[owner] = tuple((ident or [])[start:end])
                start = end
            return None
        for owner, listed, _ in spans:
            known = self._known.get(owner)
            if known is not None and _stat_files(self._data_of(owner), listed)[1] == known:
                continue
            why = self._verified(owner)
            if why is not None:
                what = "shard" if any(r[1] == owner for r in rows) else "shards' base"
                return f"its {what} {owner} is damaged ({why})"
        listed_digest = self._listed_digest(doc)
        if listed_digest is not None:
            self._write_ids(fp, {"own": {}, "listed": listed_digest})
        return None

    def _listed_digest(self, doc: dict[str, Any]) -> int | None:
        """The digest of the identities recorded for every file a list of shards' check
        stats, in its order (None while one of them has no record)."""
        ident: list[int] = []
        for owner, files in _listed_files(doc):
            rec = self._known.get(owner)
            if rec is None:
                own = self._read_ids(owner).get("own")
                rec = _flat(files, own) if isinstance(own, dict) else None
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
        data = self._data_of(fp)
        files = doc["files"]
        before = _identities(data, files)
        seen = self._damaged.get(fp)
        if seen is not None and seen[0] == before:
            return seen[1]
        digests: dict[str, str] = {}
        why = self._full_check(fp, doc, old, digests)
        if why is None and _identities(data, files) != before:
            why = "its files changed while they were checked"
        if why is not None:
            self._damaged[fp] = (before, why)
            return why
        rec: dict[str, list[Any]] = {}
        for rel, ident in zip(files, before, strict=True):
            assert ident is not None  # present: the sizes were checked, and unchanged since
            rec[rel] = [*ident, digests[rel]] if rel in digests else ident
        self._write_ids(fp, {"own": rec})
        self._known[fp] = _flat(files, rec) or ()
        return None

    def _full_check(
        self, fp: str, doc: dict[str, Any], old: dict[str, Any], digests: dict[str, str]
    ) -> str | None:
        data = self._data_of(fp)
        for rel in doc["files"]:
            if rel.endswith(".arrow"):  # rows: the content hash below
                continue
            digests[rel] = _digest(_path(data, rel))
            r = old.get(rel)
            if isinstance(r, list) and len(r) >= 5 and r[4] != digests[rel]:
                return f"its {rel} was changed after it was stored"
        want = doc.get("content_hash")
        if not isinstance(want, str):
            return "it records no content hash to check its data against"
        from hfbuild.content import dataset_hash

        try:
            got = dataset_hash(self.load(fp))
        except Exception as e:
            return f"its data cannot be read ({type(e).__name__}: {e})"
        if got != want:
            return (
                "its data was changed after it was stored: its rows no longer have its content hash"
            )
        return None

    def _read_ids(self, fp: str) -> dict[str, Any]:
        """`fp`'s identity record (its manifest's `ids`, read with it): `own`, relative path
        -> [size, mtime ns, ctime ns, inode] (and a digest of the bytes for a file that is
        not Arrow data); for a list of shards, `listed`, the digest of its shards' and
        bases' identities. {} if none."""
        ids = self._ids.get(fp)
        if ids is None:
            self._manifest(fp)
            ids = self._ids.get(fp)
        if ids is None:  # an entry of the hfbuild that kept them in ids.json
            try:
                with open(os.path.join(self._entry_of(fp), _LEGACY_IDS), encoding="utf-8") as f:
                    legacy = json.load(f)
            except (OSError, ValueError):
                legacy = None
            ids = self._ids[fp] = legacy if isinstance(legacy, dict) else {}
        return ids

    def _write_ids(self, fp: str, ids: dict[str, Any]) -> None:
        """Record `ids` as `fp`'s, in its manifest (rewritten whole, atomically: a reader
        sees the old record or the new one). An entry this user cannot write keeps its old
        record (it is then hashed in full again when next checked: slower, never wrong)."""
        self._ids[fp] = ids
        path = os.path.join(self._entry_of(fp), MANIFEST)
        with contextlib.suppress(OSError, ValueError):
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            if not isinstance(doc, dict) or doc.get("fingerprint") != fp:
                return
            doc[IDS] = ids
            sharing.write_json_atomic(path, doc, durable=False, indent=_indent(doc))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._entry_of(fp), _LEGACY_IDS))

    def check_base(self, doc: dict[str, Any]) -> str | None:
        """An indices entry (`indexed.py`) is served only while its base is intact and still
        holds the rows it was built over (the content hash it recorded)."""
        ind = doc.get("indices")
        if ind is None:
            return None
        base = ind.get("base") if isinstance(ind, dict) else None
        parts = ind.get("parts") if isinstance(ind, dict) else None
        if not isinstance(base, str) or not _FP.match(base) or not isinstance(parts, list):
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
        if not _FP.match(fp) or not all(safe_rel(rel) for rel in files):
            return False
        bad, now = _stat_files(self._data_of(fp), files)
        if bad is not None:
            return False
        if self._known.get(fp) == now:
            return True
        return self._verified(fp) is None

    def check_list(self, fp: str, doc: dict[str, Any]) -> str | None:
        """`check` of the list of shards `doc` (the manifest of `fp`, already read) without
        reading it again: afterwards the identities of the shards it names are known."""
        return self._check_shards(fp, doc, remember=True)

    def manifest_stamp(self, fp: str) -> list[int] | None:
        """The entry's manifest file as [mtime in ns, size] (None when absent): a stamp
        that changes when the entry is published again, without reading the manifest."""
        if not _FP.match(fp):
            return None
        entry = self._entry_of(fp)
        try:
            st = os.stat(f"{entry}/{MANIFEST}" if _POSIX else os.path.join(entry, MANIFEST))
        except OSError:
            return None
        return [st.st_mtime_ns, st.st_size]

    def has(self, fp: str) -> bool:
        """True when a complete, intact entry for `fp` exists (see `check`)."""
        return self.intact_manifest(fp) is not None

    def references(self, fp: str, doc: dict[str, Any] | None = None) -> list[str]:
        """The entries `fp`'s entry needs: the shards a stage result made of shards lists,
        in order, and the base an indices entry selects rows of ([] for others)."""
        doc = (doc if doc is not None else self.read_manifest(fp)) or {}
        rows = doc.get("shards")
        keys = (
            [str(r[1]) for r in rows if isinstance(r, list) and len(r) >= 2]
            if isinstance(rows, list)
            else []
        )
        ind = doc.get("indices")
        if isinstance(ind, dict):
            keys.append(str(ind.get("base")))
        return [k for k in keys if _FP.match(k)]

    def load(self, fp: str) -> Any:
        """The stored Dataset or DatasetDict, memory-mapped. Nothing is unpickled:
        `load_from_disk` reads Arrow files and JSON. A result made of shards is their
        concatenation, split by split, over the memory-mapped shard files (no copy)."""
        import datasets

        doc = self.read_manifest(fp)
        if doc is not None and isinstance(doc.get("indices"), dict):
            return self.load_indices(fp, doc, self.data_path(fp))
        if doc is not None and isinstance(doc.get("shards"), list):
            return self._load_shards(doc)
        if doc is not None and isinstance(doc.get("shard"), dict):
            return self._load_shard(fp, str(doc["shard"].get("split")))
        return datasets.load_from_disk(self.data_path(fp), keep_in_memory=False)

    def load_indices(self, fp: str, doc: dict[str, Any], data: str) -> Any:
        """An indices entry (`indexed.py`) whose files are at `data` (its entry's, or a
        download's), over its base, loaded from this store."""
        from hfbuild import indexed

        ind = doc["indices"]
        base = str(ind.get("base"))
        if not _FP.match(base) or not self.has(base):
            raise StoreError(
                f"the entry {fp} selects rows of {base!r}, which the store does not hold "
                f"intact; build it again (`doit run`)."
            )
        return indexed.load(data, ind, self.load(base), fp)

    def _load_shard(self, key: str, split: str) -> Any:
        """One shard entry (a Dataset saved by hfbuild: Arrow files, no indices, no format),
        its files memory-mapped as `load_from_disk` does, without its per-call overhead."""
        import datasets
        from datasets.table import MemoryMappedTable

        base = self.data_path(key)
        with open(os.path.join(base, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
        with open(os.path.join(base, "dataset_info.json"), encoding="utf-8") as f:
            info = datasets.DatasetInfo.from_dict(json.load(f))
        names = [str(d.get("filename")) for d in state["_data_files"]]
        if not all(safe_rel(n) for n in names):
            raise StoreError(f"shard {key} lists unsafe file names; run `hfbuild verify --deep`.")
        tables = [MemoryMappedTable.from_file(os.path.join(base, n)) for n in names]
        table = tables[0] if len(tables) == 1 else datasets.table.concat_tables(tables)
        return datasets.Dataset(table, info=info, split=datasets.Split(split), fingerprint=key)

    def load_listed(self, fp: str, split: str, rows: list[list[Any]]) -> Any:
        """Some of the shard rows of one split of the list `fp` (consecutive, in its order),
        as one Dataset over their memory-mapped files, as `load` concatenates a split's:
        what a unit reading a few of a thousand input shards loads."""
        return self._concat_shards(fp, split, _without_empty(rows))

    def _load_shards(self, doc: dict[str, Any]) -> Any:
        import datasets

        by_split: dict[str, list[list[Any]]] = {}
        for row in doc["shards"]:
            by_split.setdefault(str(row[0]), []).append(row)
        by_split = {s: _without_empty(rows) for s, rows in by_split.items()}
        parts = {
            s: self._concat_shards(str(doc["fingerprint"]), s, rows) for s, rows in by_split.items()
        }
        if doc.get("dict"):
            return datasets.DatasetDict(parts)
        return next(iter(parts.values()))

    def _concat_shards(self, fp: str, split: str, rows: list[list[Any]]) -> Any:
        """One split's shards as one Dataset over their memory-mapped files. When every
        shard has the same schema (the usual case) the tables are concatenated directly,
        with the first shard's features; otherwise `concatenate_datasets` aligns them."""
        import datasets
        from datasets.table import MemoryMappedTable, concat_tables

        from hfbuild import indexed

        tables: list[Any] = []
        selected: list[tuple[int, Any]] = []  # per shard: (its table rows, positions or None)
        for row in rows:
            key = str(row[1])
            files = row[3] if len(row) >= 4 and isinstance(row[3], dict) else None
            base = _row_base(row)
            if files is None or (
                base is None and (_row_indexed(row) or indexed.INDICES_FILE in files)
            ):
                break
            owner, listed = base if base is not None else (key, files)
            names = sorted(n for n in listed if n.endswith(".arrow") and safe_rel(n))
            data = self.data_path(owner)
            mine = [MemoryMappedTable.from_file(os.path.join(data, n)) for n in names]
            tables.extend(mine)
            idx = None
            if base is not None:
                idx = indexed.read_indices(os.path.join(self.data_path(key), indexed.INDICES_FILE))
            selected.append((sum(t.num_rows for t in mine), idx))
        else:
            if tables and all(t.schema == tables[0].schema for t in tables):
                first = self.data_path(str(rows[0][1]))
                with open(os.path.join(first, "dataset_info.json"), encoding="utf-8") as f:
                    info = datasets.DatasetInfo.from_dict(json.load(f))
                table = tables[0] if len(tables) == 1 else concat_tables(tables)
                indices = None
                if any(idx is not None for _, idx in selected):
                    indices = indexed.concat_indices(selected)
                return datasets.Dataset(
                    table,
                    info=info,
                    split=datasets.Split(split),
                    indices_table=indices,
                    fingerprint=fp,
                )
        shards = [self.load(str(r[1])) for r in rows]  # each by its own manifest
        return shards[0] if len(shards) == 1 else datasets.concatenate_datasets(shards)

    # -- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, fp: str, timeout: float = -1) -> Iterator[None]:
        """Exclusive lock for building `fp`. An OS-level lock: a killed holder releases it."""
        self._ensure()
        lock = sharing.file_lock(
            os.path.join(self.root, "locks", _check_fp(fp) + ".lock"), timeout=timeout
        )
        with permission_hint(self.root):
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def new_build_dir(self, fp: str) -> str:
        """A fresh build directory for `fp`. Call with the lock held: any other directory of
        the same fingerprint in tmp/ is then a leftover of a killed build, and is removed."""
        self._ensure()
        tmp = os.path.join(self.root, "tmp")
        for n in os.listdir(tmp):
            # Entries moved aside (corrupt-/removed-) stay for inspection until gc.
            if n.startswith(fp + ".") and not n.startswith((f"{fp}.corrupt-", f"{fp}.removed-")):
                shutil.rmtree(os.path.join(tmp, n), ignore_errors=True)
        try:
            path = tempfile.mkdtemp(dir=tmp, prefix=f"{fp}.")
            os.chmod(path, sharing.dir_mode(tmp))
            return path
        except OSError as e:
            raise StoreError(f"cannot write in {self.root}/tmp ({e.strerror}).") from e

    def publish(
        self, build_dir: str, fp: str, manifest: dict[str, Any], *, durable: bool = True
    ) -> dict[str, Any]:
        """Write the manifest into `build_dir` (listing every data file and its size) and
        move the directory into place with one rename; the manifest now in the store, as
        `read_manifest` reads it (ours, or an intact entry published meanwhile without the
        lock, see `publish_first`; ours is then discarded). Call with the lock held.
        Without `durable` (a shard: its data files are not flushed either) the manifest is
        not flushed before the rename: after a power loss it may be empty, which `check`
        refuses (its checksum), so the entry is rebuilt, never served."""
        doc, ids = self._seal(build_dir, fp, manifest, durable)
        final = self.entry(fp)
        try:
            if os.path.exists(final):
                there = self.intact_manifest(fp)
                if there is not None:
                    self.discard(build_dir)
                    return there
                self.quarantine(fp)  # a corrupt leftover: move it aside, never merge
            os.rename(build_dir, final)
        except OSError as e:
            raise self._unpublished(build_dir, fp, e) from e
        self._known[fp] = ids
        self._damaged.pop(fp, None)
        self._note_content(fp, doc)
        return doc

    def publish_first(self, build_dir: str, fp: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """`publish` (not durable) without the entry's lock, for an entry that is the same
        whoever builds it (a shard, which two stages or pipelines may share): the rename
        puts a directory only where there is none (Linux renames a directory over an
        empty one only), so of two racing builders one wins and the other finds its entry.
        Only when something is in the way is the lock taken, and `publish` decides (an
        intact entry is kept, a damaged one moved aside). No lock file is made for the
        entry: a sharded build makes one file fewer per shard."""
        doc, ids = self._seal(build_dir, fp, manifest, False)
        final = self.entry(fp)
        try:
            os.rename(build_dir, final)
            self._known[fp] = ids
            self._damaged.pop(fp, None)
            self._note_content(fp, doc)
            return doc
        except OSError as e:
            if not os.path.lexists(final):
                raise self._unpublished(build_dir, fp, e) from e
        with self.lock(fp):
            return self.publish(build_dir, fp, doc, durable=False)

    def _seal(
        self, build_dir: str, fp: str, manifest: dict[str, Any], durable: bool
    ) -> tuple[dict[str, Any], tuple[int, ...]]:
        """Write `build_dir`'s manifest (every data file and its size, the checksum) and its
        `ids.json` (each data file's identity, and for a list of shards its shards' and
        their bases' as recorded), and make the directory where it goes; (the manifest,
        the identities)."""
        data = os.path.join(build_dir, DATA)
        files: dict[str, int] = {}
        own: dict[str, list[Any]] = {}
        try:
            # Modes first: a chmod changes a file's ctime, and the identities recorded below
            # are the ones the published entry keeps (renaming the directory into place
            # changes no file inside it).
            sharing.share_tree(build_dir)  # what datasets wrote, in a group-shared store
            self._link_equal(data, fp, manifest)  # before its identities are taken
            for dirpath, _, names in os.walk(data):
                for n in names:
                    full = os.path.join(dirpath, n)
                    rel = os.path.relpath(full, data).replace(os.sep, "/")
                    st = os.stat(full)
                    files[rel] = st.st_size
                    own[rel] = _identity(st)
                    if not n.endswith(".arrow"):  # metadata: not in the content hash
                        own[rel].append(_digest(full))
        except OSError as e:
            raise self._unpublished(build_dir, fp, e) from e
        doc = {**manifest, "fingerprint": fp, "files": dict(sorted(files.items()))}
        doc.pop("manifest_digest", None)
        doc["manifest_digest"] = manifest_digest(doc)
        ids: dict[str, Any] = {"own": dict(sorted(own.items()))}
        if isinstance(doc.get("shards"), list):
            listed = self._listed_digest(doc)
            if listed is not None:  # else: the list's first check checks them, and records
                ids["listed"] = listed
        try:
            sharing.write_json_atomic(
                os.path.join(build_dir, MANIFEST),
                {**doc, IDS: ids},
                durable=durable,
                indent=_indent(doc),
            )
            sharing.makedirs(os.path.dirname(self.entry(fp)))
        except OSError as e:
            raise self._unpublished(build_dir, fp, e) from e
        self._ids[fp] = ids
        return doc, _flat(doc["files"], ids["own"]) or ()

    # -- equal results, one copy (`content/<hash[:2]>/<hash>`: an entry holding that content) --

    def _content_note(self, content_hash: Any) -> str | None:
        if not isinstance(content_hash, str) or not _FP.match(content_hash):
            return None
        return os.path.join(self.root, "content", content_hash[:2], content_hash)

    def _note_content(self, fp: str, doc: dict[str, Any]) -> None:
        """Note `fp` as an entry holding its content hash's rows, for `_link_equal`; an entry
        without rows of its own (a list of shards, indices into a base) is not noted. A note
        is a hint: whoever reads it checks the entry it names."""
        path = self._content_note(doc.get("content_hash"))
        if (
            path is None
            or doc.get("indices") is not None
            or not any(r.endswith(".arrow") for r in doc.get("files") or {})
        ):
            return
        with contextlib.suppress(OSError):
            sharing.makedirs(os.path.dirname(path))
            sharing.write_text_atomic(path, fp + "\n", durable=False)

    def _link_equal(self, data: str, fp: str, manifest: dict[str, Any]) -> None:
        """Equal results are one result: where an intact entry already holds the rows of
        `manifest`'s content hash (a comment, a refactor or an upgrade rebuilt a stage under
        another key to the same data), each of the new build's Arrow files that is that
        entry's byte for byte is replaced by a hard link to it, so the store keeps one copy.
        A link changes the file's ctime: the other entry's recorded identities are renewed
        (they held before the link, so its files are what it checked). Where linking fails
        (another filesystem, another user's file), the copy stays: only space is lost. The
        linked file names the first entry's key in its schema's metadata (`_same_rows_file`):
        a result is loaded with its own `state.json`'s fingerprint, never that one."""
        note = self._content_note(manifest.get("content_hash"))
        if note is None:
            return
        try:
            with open(note, encoding="utf-8") as f:
                other = f.read().strip()
        except OSError:
            return
        if other == fp or not _FP.match(other):
            return
        there = self.intact_manifest(other)
        if there is None or there.get("content_hash") != manifest.get("content_hash"):
            return
        if there.get("files") and other not in self._known:
            return
        theirs = self._data_of(other)
        own = self._read_ids(other).get("own")
        if not isinstance(own, dict):
            return
        renewed = dict(own)
        for rel, size in there["files"].items():
            mine = _path(data, rel)
            old = _path(theirs, rel)
            if not rel.endswith(".arrow") or not isinstance(own.get(rel), list):
                continue
            try:
                if os.lstat(mine).st_size != size or not _same_rows_file(old, mine, other, fp):
                    continue
                tmp = mine + ".link"
                os.link(old, tmp)
                os.replace(tmp, mine)
                st = os.stat(old)
            except OSError:
                continue
            renewed[rel] = [*_identity(st), *own[rel][4:]]
        if renewed != own:
            self._write_ids(other, {**self._read_ids(other), "own": renewed})
            self._known[other] = _flat(there["files"], renewed) or ()

    def _unpublished(self, build_dir: str, fp: str, e: OSError) -> StoreError:
        shutil.rmtree(build_dir, ignore_errors=True)
        hint = " The disk is full." if e.errno == errno.ENOSPC else ""
        return StoreError(f"could not publish {fp} in {self.root}: {e.strerror}.{hint}")

    def discard(self, path: str) -> None:
        """Remove `path`, a leftover of a build in this store's tmp/, by the time the
        process exits (`trash.py`: removals after the build's file creations)."""
        size = tree_size(path) if os.path.isdir(path) else os.lstat(path).st_size
        trash.defer(path, os.path.join(self.root, "tmp"), size)

    def prepare_discard(self) -> None:
        """Make this process's trash now, before forking workers that `discard` into it."""
        self._ensure()
        trash.prepare(os.path.join(self.root, "tmp"))

    def quarantine(self, fp: str) -> str | None:
        """Move a broken entry out of the way (to tmp/, where gc removes it)."""
        src = self.entry(fp)
        if not os.path.exists(src):
            return None
        dst = os.path.join(self.root, "tmp", f"{fp}.corrupt-{time.time_ns()}")
        os.rename(src, dst)
        return dst

    def remove(self, fp: str) -> bool:
        src = self.entry(fp)
        if not os.path.exists(src):
            return False
        dst = os.path.join(self.root, "tmp", f"{fp}.removed-{time.time_ns()}")
        os.rename(src, dst)  # atomic disappearance, then a slow delete
        shutil.rmtree(dst, ignore_errors=True)
        return True

    # -- the lock files that use this store (gc keeps what any of them references) -----------

    def roots(self) -> list[str]:
        """Absolute paths of the lock files registered as using this store."""
        try:
            with open(os.path.join(self.root, "roots.json"), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return []
        return sorted(p for p in data if isinstance(p, str)) if isinstance(data, list) else []

    def register_root(self, lock_path: str) -> None:
        """Remember that the lock file at `lock_path` records results of this store."""
        lock_path = os.path.abspath(lock_path)
        if lock_path in self.roots():
            return
        self._ensure()
        with (
            permission_hint(self.root),
            sharing.file_lock(os.path.join(self.root, "locks", "roots.lock")),
        ):
            roots = set(self.roots()) | {lock_path}
            live = sorted(p for p in roots if os.path.exists(p) or p == lock_path)
            sharing.write_json_atomic(os.path.join(self.root, "roots.json"), live)

    def touch(self, fp: str) -> None:
        """Record that the entry was used now (its directory's mtime), for `gc --keep-days`."""
        with contextlib.suppress(OSError):
            os.utime(self.entry(fp))

    def size(self, fp: str) -> int:
        return tree_size(self.entry(fp))

    def gc(self, keep: set[str], keep_seconds: float, *, dry_run: bool) -> list[tuple[str, int]]:
        """Delete entries not in `keep` and unused for `keep_seconds`, and leftover build
        directories (never one whose build lock is held). Returns (path, bytes) of each."""
        from filelock import Timeout

        now = time.time()
        gone: list[tuple[str, int]] = []
        kept = set(keep)
        for fp in self.fingerprints():
            try:
                if now - os.stat(self.entry(fp)).st_mtime < keep_seconds:
                    kept.add(fp)
            except OSError:
                continue
        # A kept stage result keeps the shards it lists, and an indices entry its base
        # (transitively: a kept stage's indices shards keep their bases).
        todo = [fp for fp in kept if _FP.match(fp)]
        while todo:
            for ref in self.references(todo.pop()):
                if ref not in kept:
                    kept.add(ref)
                    todo.append(ref)
        removed: set[str] = set()
        for fp in self.fingerprints():
            e = self.entry(fp)
            if fp in kept or not os.path.exists(e):
                continue
            gone.append((e, tree_size(e)))
            removed.add(fp)
            if not dry_run:
                self.remove(fp)
        self._gc_content(removed, dry_run=dry_run)
        gone += self._gc_observed(kept, now - keep_seconds, dry_run=dry_run)
        # A failed build's record goes with its key, or once older than keep_seconds.
        gone += self._gc_records("failures", kept, now - keep_seconds, dry_run=dry_run)
        tmp = os.path.join(self.root, "tmp")
        names = sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []
        by_fp: dict[str, list[str]] = {}
        for n in names:
            by_fp.setdefault(n.split(".")[0], []).append(os.path.join(tmp, n))
        for fp, paths in sorted(by_fp.items()):
            held: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if _FP.match(fp):
                lock = sharing.file_lock(os.path.join(self.root, "locks", fp + ".lock"))
                try:
                    held = lock.acquire(timeout=0)
                except Timeout:
                    continue  # a build of this fingerprint is running: its directory stays
            with held:
                for p in paths:
                    gone.append((p, tree_size(p)))
                    if not dry_run:
                        shutil.rmtree(p, ignore_errors=True)
        return gone

    def _gc_content(self, removed: set[str], *, dry_run: bool) -> None:
        """Remove the content notes (`_note_content`) naming an entry that is gone or being
        removed (bookkeeping, not reported); the entries that shared its files keep them
        (hard links)."""
        top = os.path.join(self.root, "content")
        for sub in sorted(os.listdir(top)) if os.path.isdir(top) else []:
            d = os.path.join(top, sub)
            for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                path = os.path.join(d, name)
                try:
                    with open(path, encoding="utf-8") as f:
                        fp = f.read().strip()
                except OSError:
                    continue
                if _FP.match(fp) and fp not in removed and os.path.isdir(self.entry(fp)):
                    continue
                if not dry_run:
                    with contextlib.suppress(OSError):
                        os.unlink(path)

    # -- what builds read at run time, by static fingerprint (see fullkey.py) -------------------

    def _gc_observed(
        self, kept: set[str], before: float, *, dry_run: bool
    ) -> list[tuple[str, int]]:
        """Remove the run-time read records of static fingerprints no kept entry was built
        under, unless written after `before`. Losing a record costs at most a rebuild: a lock
        entry carries its stage's record too."""
        statics = set()
        for fp in kept:
            doc = self.read_manifest(fp) if _FP.match(fp) else None
            if doc is not None and isinstance(doc.get("static_fingerprint"), str):
                statics.add(doc["static_fingerprint"])
        return self._gc_records("observed", statics, before, dry_run=dry_run)

    def _gc_records(
        self, kind: str, keep: set[str], before: float, *, dry_run: bool
    ) -> list[tuple[str, int]]:
        """Remove the `<kind>/<fp[:2]>/<fp>.json` records whose fingerprint is not in `keep`,
        unless written after `before`."""
        gone: list[tuple[str, int]] = []
        top = os.path.join(self.root, kind)
        for sub in sorted(os.listdir(top)) if os.path.isdir(top) else []:
            d = os.path.join(top, sub)
            for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                path = os.path.join(d, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if name.removesuffix(".json") in keep or st.st_mtime >= before:
                    continue
                gone.append((path, st.st_size))
                if not dry_run:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
        return gone

    def record_path(self, name: str) -> str:
        """The no-import record of one dodo file (`record.py`); `name` is a digest."""
        return os.path.join(self.root, "records", _check_fp(name) + ".json")

    def key_dirs(self) -> list[str]:
        """The directories whose entries a stage's current key is chosen among (`fullkey`):
        the stored results and the observed path sets. Publishing, pulling, removing or
        recording in either renames inside one of their subdirectories."""
        return [os.path.join(self.root, "objects"), os.path.join(self.root, "observed")]

    def _observed_path(self, static_fp: str) -> str:
        _check_fp(static_fp)
        if _POSIX:
            return f"{self.root}/observed/{static_fp[:2]}/{static_fp}.json"
        return os.path.join(self.root, "observed", static_fp[:2], static_fp + ".json")

    def read_observed(self, static_fp: str) -> list[list[str]]:
        """The path sets builds of `static_fp` read at run time, newest first; [] if none."""
        try:
            with open(self._observed_path(static_fp), encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return []
        sets = doc.get("sets") if isinstance(doc, dict) else None
        if not isinstance(sets, list):
            return []
        return [
            list(s)
            for s in sets
            if isinstance(s, list) and s and all(isinstance(p, str) and safe_observed(p) for p in s)
        ]

    def add_observed(self, static_fp: str, paths: list[str]) -> None:
        """Record that a build of `static_fp` read `paths` (kept newest first, at most 16
        sets). Call with the static fingerprint's build lock held."""
        self._ensure()
        sets = [s for s in self.read_observed(static_fp) if s != paths]
        path = self._observed_path(static_fp)
        sharing.makedirs(os.path.dirname(path))
        sharing.write_json_atomic(path, {"sets": [paths, *sets][:16]})

    # -- failed builds, by the key they were to be published under ----------------------------

    def _failure_path(self, fp: str) -> str:
        return os.path.join(self.root, "failures", _check_fp(fp)[:2], fp + ".json")

    def record_failure(self, fp: str, stage: str, error: str) -> None:
        """Record that building `stage` under key `fp` failed with `error` (what `status`
        and `explain` then say instead of "never built"); a later success removes it."""
        self._ensure()
        path = self._failure_path(fp)
        sharing.makedirs(os.path.dirname(path))
        doc = {"stage": stage, "error": error[:_FAILURE_CHARS]}
        sharing.write_json_atomic(path, doc, durable=False)

    def read_failure(self, fp: str) -> str | None:
        """The error a build of `fp` last failed with, if one did and none succeeded since."""
        try:
            with open(self._failure_path(fp), encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return None
        error = doc.get("error") if isinstance(doc, dict) else None
        return error if isinstance(error, str) else None

    def clear_failure(self, fp: str) -> None:
        """Forget a failed build of `fp` (it was built or pulled since)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._failure_path(fp))

    # -- refs ----------------------------------------------------------------------------------

    def set_ref(self, stage: str, fp: str) -> None:
        if self.get_ref(stage) == fp:  # the common case (a no-op run): one small read
            return
        self._ensure()
        path = os.path.join(self.root, "refs", _check_name(stage))
        if self.get_ref(stage) == fp:
            return
        with permission_hint(self.root):
            fd, tmp = tempfile.mkstemp(dir=os.path.join(self.root, "refs"), prefix=".tmp-")
            os.fchmod(fd, sharing.file_mode(os.path.dirname(tmp)))
            with os.fdopen(fd, "w") as f:
                f.write(_check_fp(fp) + "\n")
            os.replace(tmp, path)

    def get_ref(self, stage: str) -> str | None:
        try:
            with open(os.path.join(self.root, "refs", _check_name(stage))) as f:
                fp = f.read().strip()
        except OSError:
            return None
        return fp if _FP.match(fp) else None

    def fingerprints(self) -> list[str]:
        base = os.path.join(self.root, "objects")
        out = []
        for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            for fp in sorted(os.listdir(os.path.join(base, d))):
                if _FP.match(fp):
                    out.append(fp)
        return out


def _indent(doc: dict[str, Any]) -> int | None:
    """How a manifest is written: indented for people, but a stage's list of shards
    (thousands of rows, written again on every rebuild) on one line, by json's C encoder
    (its indenting encoder is pure Python). The manifest's checksum is of its content, not
    its layout."""
    return None if isinstance(doc.get("shards"), list) else 1


def _same_rows_file(old: str, new: str, old_key: str, new_key: str) -> bool:
    """Whether the Arrow stream file `new` is `old` byte for byte, but for the key datasets
    writes into the schema's metadata (`"fingerprint"`, the entry's key: hfbuild builds with
    `new_fingerprint=key`), which only the schema message (the stream's first) may hold."""
    chunk = 1 << 20
    with open(old, "rb") as a, open(new, "rb") as b:
        head = a.read(8)
        if head[:4] != b"\xff\xff\xff\xff" or head != b.read(8):
            return False
        n = int.from_bytes(head[4:8], "little")  # the schema message's length
        if n > 64 * chunk:
            return False
        if a.read(n).replace(old_key.encode(), new_key.encode()) != b.read(n):
            return False
        while True:
            x, y = a.read(chunk), b.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def _path(data: str, rel: str) -> str:
    # A safe relative path joined as os.path.join joins its parts (on POSIX, with "/").
    return f"{data}/{rel}" if _POSIX else os.path.join(data, *rel.split("/"))


def _stat_files(
    data: str, files: dict[str, int]
) -> tuple[tuple[str, int, int | None] | None, tuple[int, ...]]:
    """(the first of `files` (relative path -> size, each `safe_rel`) under `data` that is
    missing (actual None) or of another size, as (path, size, actual), else None; the
    identities of the files, (mtime ns, ctime ns, inode) each, in order). One stat each."""
    ident: list[int] = []
    for rel, size in files.items():
        try:
            st = os.stat(_path(data, rel))
        except OSError:
            return (rel, size, None), ()
        if st.st_size != size:
            return (rel, size, st.st_size), ()
        ident += (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    return None, tuple(ident)


def _flat(files: dict[str, int], own: dict[str, Any]) -> tuple[int, ...] | None:
    """The identities an entry's own record holds for `files`, as `_stat_files` gives them
    (None when it lacks one, or records another size)."""
    out: list[int] = []
    for rel, size in files.items():
        r = own.get(rel)
        if not (isinstance(r, list) and len(r) >= 4 and r[0] == size):
            return None
        out += r[1:4]
    return tuple(out)


def _identity(st: os.stat_result) -> list[Any]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _digest(path: str) -> str:
    """A digest of a (small, JSON) file's bytes."""
    import xxhash

    with open(path, "rb") as f:
        return str(xxhash.xxh3_128_hexdigest(f.read()))


def _identities(data: str, files: dict[str, int]) -> list[list[Any] | None]:
    """Each of `files`' identity now (None: missing), in order."""
    out: list[list[Any] | None] = []
    for rel in files:
        try:
            out.append(_identity(os.stat(_path(data, rel))))
        except OSError:
            out.append(None)
    return out


def _listed_files(doc: dict[str, Any]) -> list[tuple[str, dict[str, int]]]:
    """The entries whose files a list of shards' check stats, with those files, in its
    order: each shard listed with its files, and the base an indices shard's row names."""
    rows = doc.get("shards")
    out: list[tuple[str, dict[str, int]]] = []
    for row in rows if isinstance(rows, list) else []:
        if not (isinstance(row, list) and len(row) >= 4 and _FP.match(str(row[1]))):
            continue
        files, base = row[3], _row_base(row)
        if (
            not isinstance(files, dict)
            or not all(safe_rel(k) for k in files)
            or (_row_indexed(row) and base is None)
        ):
            continue
        out.append((str(row[1]), files))
        if base is not None:
            out.append(base)
    return out


def _row_indexed(row: list[Any]) -> bool:
    """Whether a row of a stage's shard list is an indices shard's (its facts name a base)."""
    return len(row) >= 5 and isinstance(row[4], dict) and "base" in row[4]


def _without_empty(rows: list[list[Any]]) -> list[list[Any]]:
    """A split's shard rows without the empty ones that hold no rows of a base (a map of no
    rows gives its input's columns, not the function's: datasets' map over the whole input
    takes its features from the rows it has), when a shard with rows is listed; else all."""

    def empty(row: list[Any]) -> bool:
        facts = row[4] if len(row) >= 5 and isinstance(row[4], dict) else {}
        return facts.get("rows") == 0 and "base" not in facts and not _row_indexed(row)

    kept = [r for r in rows if not empty(r)]
    return kept or rows[:1]


def _row_base(row: list[Any]) -> tuple[str, dict[str, int]] | None:
    """The base an indices shard's row in a stage's list names, with its files' sizes
    (`[split, key, label, files, {..., "base": key, "base_files": {...}}]`), else None
    (also for an indices shard whose base is listed without sizes: it is checked in full)."""
    extra = row[4] if len(row) >= 5 else None
    if not isinstance(extra, dict):
        return None
    base, files = extra.get("base"), extra.get("base_files")
    if not isinstance(base, str) or not _FP.match(base) or not isinstance(files, dict):
        return None
    if not all(safe_rel(k) and isinstance(v, int) for k, v in files.items()):
        return None
    return base, files


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


def safe_observed(rel: str) -> bool:
    """A repo-relative path as recorded: not absolute, no '..', no empty part; or a variable
    read at run time (`envvars.OBSERVED`: `env://NAME`, never a path)."""
    if rel.startswith(OBSERVED):
        return "\0" not in rel and "=" not in rel
    parts = rel.split("/")
    return bool(rel) and not os.path.isabs(rel) and ".." not in parts and "" not in parts
