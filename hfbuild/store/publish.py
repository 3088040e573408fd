"""Writing store entries: build locks, build directories, atomic publish, removal.

Owns: `Publisher`: the per-fingerprint build lock (an OS-level `filelock`: a killed holder
releases it); a fresh build directory in `tmp/` (a killed build's leftovers of the same
fingerprint removed); sealing a build (its manifest listing every data file and its size, the
checksum, and its identity record: each file's identity after the last chmod, and for a list of
shards its shards' and bases' recorded identities) and publishing it with one atomic rename
(under the entry's lock; a shard's, `publish_first`, without it: the rename lands only where no
entry is, and only then is the lock taken); an intact entry published meanwhile is kept, a
damaged one moved aside (`quarantine`); leftovers handed to `trash.py` (`discard`); removing an
entry (an atomic rename away, then a slow delete).

Must never: make an entry visible before its complete manifest is, merge into an existing entry,
import `datasets`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from hfbuild.core.errors import StoreError
from hfbuild.store import listform, sharing, trash
from hfbuild.store.check import Checks
from hfbuild.store.entry import Manifests, file_digest, flat, identity, indent
from hfbuild.store.equal import Equal
from hfbuild.store.paths import (
    DATA,
    IDS,
    MANIFEST,
    Layout,
    check_fp,
    manifest_digest,
    permission_hint,
    tree_size,
)


class Publisher:
    """Writes the entries of one store, keeping `checks` told what it published."""

    def __init__(self, layout: Layout, manifests: Manifests, checks: Checks) -> None:
        self.layout = layout
        self.manifests = manifests
        self.checks = checks
        self.equal = Equal(layout, manifests, checks)

    @contextlib.contextmanager
    def lock(self, fp: str, timeout: float = -1) -> Iterator[None]:
        """Exclusive lock for building `fp`. An OS-level lock: a killed holder releases it."""
        self.layout.ensure()
        lock = sharing.file_lock(self.layout.lock_path(check_fp(fp)), timeout=timeout)
        with permission_hint(self.layout.root):
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def new_build_dir(self, fp: str) -> str:
        """A fresh build directory for `fp`. Call with the lock held: any other directory of
        the same fingerprint in tmp/ is then a leftover of a killed build, and is removed."""
        self.layout.ensure()
        tmp = self.layout.tmp
        for n in os.listdir(tmp):
            # Entries moved aside (corrupt-/removed-) stay for inspection until gc.
            if n.startswith(fp + ".") and not n.startswith((f"{fp}.corrupt-", f"{fp}.removed-")):
                shutil.rmtree(os.path.join(tmp, n), ignore_errors=True)
        try:
            path = tempfile.mkdtemp(dir=tmp, prefix=f"{fp}.")
            os.chmod(path, sharing.dir_mode(tmp))
            return path
        except OSError as e:
            raise StoreError(f"cannot write in {self.layout.root}/tmp ({e.strerror}).") from e

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
        doc, ids = self.seal(build_dir, fp, manifest, durable)
        final = self.layout.entry(fp)
        try:
            if os.path.exists(final):
                there = self.checks.intact_manifest(fp)
                if there is not None:
                    self.discard(build_dir)
                    return there
                self.quarantine(fp)  # a corrupt leftover: move it aside, never merge
            os.rename(build_dir, final)
        except OSError as e:
            raise self._unpublished(build_dir, fp, e) from e
        self.checks.published(fp, ids)
        self.equal.note(fp, doc)
        return doc

    def publish_first(self, build_dir: str, fp: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """`publish` (not durable) without the entry's lock, for an entry that is the same
        whoever builds it (a shard, which two stages or pipelines may share): the rename
        puts a directory only where there is none (Linux renames a directory over an
        empty one only), so of two racing builders one wins and the other finds its entry.
        Only when something is in the way is the lock taken, and `publish` decides (an
        intact entry is kept, a damaged one moved aside). No lock file is made for the
        entry: a sharded build makes one file fewer per shard."""
        doc, ids = self.seal(build_dir, fp, manifest, False)
        final = self.layout.entry(fp)
        try:
            os.rename(build_dir, final)
            self.checks.published(fp, ids)
            self.equal.note(fp, doc)
            return doc
        except OSError as e:
            if not os.path.lexists(final):
                raise self._unpublished(build_dir, fp, e) from e
        with self.lock(fp):
            return self.publish(build_dir, fp, doc, durable=False)

    def seal(
        self, build_dir: str, fp: str, manifest: dict[str, Any], durable: bool
    ) -> tuple[dict[str, Any], tuple[int, ...]]:
        """Write `build_dir`'s manifest (every data file and its size, the checksum, and the
        identity record: each data file's identity, and for a list of shards its shards'
        and their bases' as recorded), and make the directory where it goes; (the manifest,
        the identities)."""
        data = os.path.join(build_dir, DATA)
        files: dict[str, int] = {}
        own: dict[str, list[Any]] = {}
        try:
            # Modes first: a chmod changes a file's ctime, and the identities recorded below
            # are the ones the published entry keeps (renaming the directory into place
            # changes no file inside it).
            sharing.share_tree(build_dir)  # what datasets wrote, in a group-shared store
            self.equal.link(data, fp, manifest)  # before its identities are taken
            for dirpath, _, names in os.walk(data):
                for n in names:
                    full = os.path.join(dirpath, n)
                    rel = os.path.relpath(full, data).replace(os.sep, "/")
                    st = os.stat(full)
                    files[rel] = st.st_size
                    own[rel] = identity(st)
                    if not n.endswith(".arrow"):  # metadata: not in the content hash
                        own[rel].append(file_digest(full))
        except OSError as e:
            raise self._unpublished(build_dir, fp, e) from e
        # Rows, whichever form `manifest` holds them in (a Ray worker's sent back: as read).
        doc = listform.expand({**manifest, "fingerprint": fp, "files": dict(sorted(files.items()))})
        doc.pop("manifest_digest", None)
        written = listform.compact(doc)  # as the file holds it, and its checksum of that
        doc["manifest_digest"] = written["manifest_digest"] = manifest_digest(written)
        ids: dict[str, Any] = {"own": dict(sorted(own.items()))}
        if isinstance(doc.get("shards"), list):
            listed = self.checks.listed_digest(doc)
            if listed is not None:  # else: the list's first check checks them, and records
                ids["listed"] = listed
        try:
            sharing.write_json_atomic(
                os.path.join(build_dir, MANIFEST),
                {**written, IDS: ids},
                durable=durable,
                indent=indent(written),
            )
            sharing.makedirs(os.path.dirname(self.layout.entry(fp)))
        except OSError as e:
            raise self._unpublished(build_dir, fp, e) from e
        self.manifests.sealed(fp, ids)
        return doc, flat(doc["files"], ids["own"]) or ()

    def _unpublished(self, build_dir: str, fp: str, e: OSError) -> StoreError:
        shutil.rmtree(build_dir, ignore_errors=True)
        hint = " The disk is full." if e.errno == errno.ENOSPC else ""
        return StoreError(f"could not publish {fp} in {self.layout.root}: {e.strerror}.{hint}")

    def discard(self, path: str) -> None:
        """Remove `path`, a leftover of a build in this store's tmp/, by the time the
        process exits (`trash.py`: removals after the build's file creations)."""
        size = tree_size(path) if os.path.isdir(path) else os.lstat(path).st_size
        trash.defer(path, self.layout.tmp, size)

    def prepare_discard(self) -> None:
        """Make this process's trash now, before forking workers that `discard` into it."""
        self.layout.ensure()
        trash.prepare(self.layout.tmp)

    def quarantine(self, fp: str) -> str | None:
        """Move a broken entry out of the way (to tmp/, where gc removes it)."""
        src = self.layout.entry(fp)
        if not os.path.exists(src):
            return None
        dst = os.path.join(self.layout.tmp, f"{fp}.corrupt-{time.time_ns()}")
        os.rename(src, dst)
        return dst

    def remove(self, fp: str) -> bool:
        src = self.layout.entry(fp)
        if not os.path.exists(src):
            return False
        dst = os.path.join(self.layout.tmp, f"{fp}.removed-{time.time_ns()}")
        os.rename(src, dst)  # atomic disappearance, then a slow delete
        shutil.rmtree(dst, ignore_errors=True)
        return True
