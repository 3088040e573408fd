"""The remote's files: its layout and the operations on single entries.

Owns: `RemoteFiles`, the fsspec filesystem of a remote URL and its layout
(`<url>/objects/<fp[:2]>/<fp>/` holding the entry's data files under a name unique to the
upload, `data-<uuid>/`, and its `manifest.json`, written last, naming that directory); reading
a manifest and its own checks (its fingerprint, its `manifest_digest`, safe file paths and
sizes); whether the remote holds an entry, and which of many keys it has anything for, by
listing their directories (`holding`); what this process saw it hold (`held`: a published
manifest is never overwritten); writing a manifest create-only (S3's
`If-None-Match: *` through s3fs's `mode="create"`; a hard link, which fails on an existing
name, for file://); deleting an upload's data or an entry (`remove`: manifest first); a
missing `file://` directory as a `RemoteMissingError`; what the committed lock pins, read
once; the progress bar of a transfer.

Must never: trust a path or fingerprint the remote names, unpickle or execute anything it
reads, overwrite a published manifest, read credentials itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hfbuild.core import progress, threads
from hfbuild.store import listform
from hfbuild.store.lockfile import LOCK_NAME, Pin
from hfbuild.store.paths import MANIFEST, manifest_digest, safe_rel
from hfbuild.store.remotereach import (
    RefusedEntryError,
    RemoteError,
    RemoteMissingError,
    reaching,
)

PROGRESS_BYTES = 4 * 1024 * 1024  # transfers above this show a progress bar

FP = r"[0-9a-f]{32}"


def check_fp(fp: str) -> str:
    """`fp`, when it is a fingerprint; else a `RemoteError`."""
    if not re.fullmatch(FP, fp):
        raise RemoteError(f"not a fingerprint: {fp!r}")
    return fp


Pins = Callable[[], Mapping[str, Pin]]

# What this process saw a remote hold: (remote URL, key) -> the content hash of its published
# manifest (read, or written by this process's push). A published manifest is never
# overwritten, so the answer stays true until `remove` (here or by another process, `hfbuild
# remote rm`: a push then takes the entry for held, and the pull of what names it refuses).
_HELD: dict[tuple[str, str], str] = {}

# `holding` lists a directory of entries when it asks for at least this many keys in it on
# average: one listing then saves a third of the requests asking for each key would make.
_LIST_RATIO = 1.5

# Names in one page of a flat listing (S3's most; `holding`).
PAGE = 1000


class RemoteFiles:
    """The files of a remote cache at `url`. `pins` gives what the committed lock records per
    store key (`lockfile.pins` of HEAD's lock, asked once)."""

    def __init__(self, url: str, pins: Pins | None = None, lock_name: str = LOCK_NAME) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self._pins_of = pins
        self._pins: Mapping[str, Pin] | None = None
        self.lock_name = lock_name
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            hint = " Install the s3 extra: pip install 'hfbuild[s3]'." if "s3" in str(e) else ""
            raise RemoteError(f"cannot open remote {self.url}: {e}.{hint}") from e

    def key(self, fp: str, rel: str = "") -> str:
        """The path of the entry for `fp` (or of `rel` in it) on the remote's filesystem."""
        path = posixpath.join(self.base, "objects", check_fp(fp)[:2], fp)
        return posixpath.join(path, rel) if rel else path

    def pins(self) -> Mapping[str, Pin]:
        """What the committed lock records per key ({} without one), read once."""
        if self._pins is None:
            self._pins = self._pins_of() if self._pins_of is not None else {}
        return self._pins

    def where(self, fp: str) -> str:
        """The entry's address on the remote, for messages."""
        return f"{self.url}/objects/{check_fp(fp)[:2]}/{fp}"

    @reaching
    def read_manifest(self, fp: str) -> dict[str, Any] | None:
        """The entry's manifest if the remote holds a complete entry for `fp`."""
        try:
            # From byte 0: one request (s3fs asks an object's size first when no range is
            # given, to split a large read).
            raw = self.fs.cat_file(self.key(fp, MANIFEST), start=0)
        except FileNotFoundError:
            self.check_root()
            return None
        except OSError as e:
            raise RemoteError(f"cannot read {self.url}: {e}") from e
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise RefusedEntryError(
                f"remote entry {fp} has a corrupt manifest ({e}); not used."
            ) from e
        if not isinstance(doc, dict) or doc.get("fingerprint") != fp:
            raise RefusedEntryError(
                f"remote entry {fp} has a manifest for another fingerprint; not used."
            )
        if doc.get("manifest_digest") != manifest_digest(doc):
            raise RefusedEntryError(
                f"remote entry {fp} on {self.url} has a manifest edited after it was written "
                f"(it does not match its manifest_digest); not used."
            )
        try:
            listform.expand(doc)  # the rows of a list or pack written compactly
        except ValueError as e:
            raise RefusedEntryError(
                f"remote entry {fp} has a malformed list of shards ({e}); not used."
            ) from e
        files = doc.get("files")
        if not isinstance(files, dict) or not all(
            safe_rel(k) and isinstance(v, int) and v >= 0 for k, v in files.items()
        ):
            raise RefusedEntryError(
                f"remote entry {fp} lists unsafe or malformed file paths; not used."
            )
        self.saw(fp, str(doc.get("content_hash")))
        return doc

    def saw(self, fp: str, content_hash: str) -> None:
        """Note that the remote holds a published entry for `fp` with `content_hash`."""
        _HELD[(self.url, fp)] = content_hash

    def held(self, fp: str) -> str | None:
        """The content hash of the remote's entry for `fp` as this process saw it published
        (`saw`), without asking the remote; None when not seen."""
        return _HELD.get((self.url, fp))

    def check_root(self) -> None:
        """A `file://` remote's directory must exist: a missing one is a wrong path or an
        unmounted share, never "the remote does not hold it"."""
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(self.fs, LocalFileSystem) and not os.path.isdir(self.base):
            raise RemoteMissingError(
                f"the remote {self.url} does not exist (no directory {self.base}): correct "
                f"its URL (--remote, HFBUILD_REMOTE or [tool.hfbuild] remote in "
                f"pyproject.toml), mount it, or create the directory."
            )

    @reaching
    def has(self, fp: str) -> bool:
        """Whether the remote holds a published manifest for `fp`."""
        try:
            return bool(self.fs.exists(self.key(fp, MANIFEST)))
        except OSError as e:
            raise RemoteError(f"cannot reach {self.url}: {e}") from e

    @reaching
    def holding(self, fps: Sequence[str]) -> set[str] | None:
        """Which of `fps` the remote has anything stored for (a published entry, or an
        upload under way or abandoned: `read_manifest` tells), by listing what the remote
        stores under the prefixes they fall in, never cached; None when listing could take
        more requests than asking for each of them: on S3, fewer keys than the listings
        its most would be (`objects/`, the next prefixes they fall in, their directories of
        entries); elsewhere, too few per directory of entries (`objects/<fp[:2]>/`). An
        entry published after its prefix was listed is not among them.

        On an object store (S3), `objects/` is listed flat first, one page of up to 1,000
        names: a remote that small answers in one request. A prefix holding more is split
        into its 16 next ones (`objects/a`, then `objects/ab/`), down to the directories of
        entries, each listed whole (with its subdirectories as names); the listings of one
        level are sent together. Elsewhere (file://) each directory of entries is listed."""
        self.check_root()
        by_dir: dict[str, list[str]] = {}
        for fp in fps:
            by_dir.setdefault(posixpath.dirname(self.key(fp)), []).append(fp)
        flat = self._flat_pages()
        if flat:  # at most: objects/, its next prefixes the keys fall in, their directories
            most = 1 + len({posixpath.basename(d)[:1] for d in by_dir}) + len(by_dir)
            if len(fps) < most:
                return None
        elif len(fps) < _LIST_RATIO * len(by_dir):
            return None
        wanted = set(fps)
        objects = posixpath.join(self.base, "objects")
        found: set[str] = set()
        listed = list(by_dir)
        if flat:
            listed, todo = [], [""]  # prefixes below objects/, flat while one page holds them
            while todo:
                split = []
                for pre, got in zip(todo, threads.each(self._page, todo), strict=True):
                    if isinstance(got, Exception):
                        raise got  # an unreachable remote as `reaching` says it
                    if got is None:
                        split.append(pre)
                    else:
                        found |= got & wanted
                more = sorted(
                    {fp[: len(p) + 1] for p in split for fp in wanted if fp.startswith(p)}
                )
                listed += [posixpath.join(objects, p) for p in more if len(p) == 2]
                todo = [p for p in more if len(p) < 2]
        for got in threads.each(self._names, listed):
            if isinstance(got, Exception):
                raise got
            found |= got & wanted
        return found

    def _flat_pages(self) -> bool:
        """Whether this remote's store lists a prefix flat by pages (S3, s3fs)."""
        protocol = getattr(self.fs, "protocol", ())
        names = protocol if isinstance(protocol, tuple) else (protocol,)
        return "s3" in names and hasattr(self.fs, "call_s3")

    def _page(self, pre: str) -> set[str] | None:
        """The fingerprints with anything stored under `objects/<pre>` (listed flat, one
        page of up to `PAGE` names); None when there are more."""
        bucket, key, _ = self.fs.split_path(posixpath.join(self.base, "objects"))
        try:
            got = self.fs.call_s3(
                "list_objects_v2", Bucket=bucket, Prefix=f"{key}/{pre}", MaxKeys=PAGE
            )
        except FileNotFoundError:
            return set()
        if got.get("IsTruncated"):
            return None
        out = set()
        for item in got.get("Contents") or []:  # <key>/<fp[:2]>/<fp>/...
            parts = str(item.get("Key", ""))[len(key) + 1 :].split("/")
            if len(parts) >= 3:
                out.add(parts[1])
        return out

    def _names(self, d: str) -> set[str]:
        """The names in directory `d`, listed now (nothing cached after)."""
        try:
            return {
                posixpath.basename(str(p).rstrip("/"))
                for p in self.fs.ls(d, detail=False, refresh=True)
            }
        except FileNotFoundError:
            return set()
        finally:
            self.fs.invalidate_cache(d)  # no later answer from this listing

    @reaching
    def remove(self, fp: str) -> bool:
        """Delete the remote's entry for `fp`: its manifest first (the entry is then
        invisible to every pull), then its data. False when there was none. Entries that
        reference it (a list naming it as a shard, a selection of its rows) are refused by a
        pull from then on, and built again, until they are removed or it is published again."""
        entry = self.key(fp)
        _HELD.pop((self.url, fp), None)
        try:
            if not self.fs.exists(entry):
                self.check_root()
                return False
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.key(fp, MANIFEST))
            self.fs.rm(entry, recursive=True)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise RemoteError(f"cannot remove {self.where(fp)}: {e}") from e
        return True

    def create(self, key: str, body: bytes) -> bool:
        """Write `body` at `key` only if nothing is there; False when something was."""
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(self.fs, LocalFileSystem):
            import uuid  # here, not at the top: a no-op never writes to a remote

            # A complete file under a unique name, then a hard link to the manifest's name:
            # link(2) fails on an existing name, so readers never see half a manifest.
            tmp = f"{key}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, key)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        try:
            # s3fs sends `If-None-Match: *`: S3 refuses the write when the key exists.
            self.fs.pipe_file(key, body, mode="create")
        except FileExistsError:
            return False
        return True

    def discard(self, fp: str, data_dir: str) -> None:
        """Delete an upload's data directory (it lost the race, or failed half-way)."""
        # Invisible without a manifest naming it: failing to delete costs space only.
        with contextlib.suppress(OSError, ValueError):
            self.fs.rm(self.key(fp, data_dir), recursive=True)


def transfer_bar(total: int, desc: str) -> Any:
    """The progress bar of a transfer of `total` bytes (none for a small one)."""
    return progress.bar(total, desc, unit="B", unit_scale=True, at_least=PROGRESS_BYTES)
