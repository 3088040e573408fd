"""The remote cache: store entries shared by fingerprint over any fsspec filesystem.

Owns: `Remote`, the remote as the rest of hfbuild uses it, made of its parts: its errors,
settings and reachability (`remotereach.py`), its files, layout and manifests
(`remotefiles.py`), pulling and adopting with every check (`remotepull.py`); and pushing
(here): the entries an entry references (a stage's shards, the base an indices entry selects
rows of) first, refused when the remote holds one of them with other content; data files under
a directory unique to the upload, then the manifest naming it, create-only: publishing is
first-writer-wins without a lock server, and an upload that loses the race deletes its own
data directory. An upload without its manifest is invisible: pull never takes it.

Must never: unpickle or execute anything downloaded, overwrite a published manifest, trust a
path or fingerprint the remote names, or read credentials itself (fsspec's own configuration
does, e.g. FSSPEC_S3_ENDPOINT_URL or the AWS_* variables).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Mapping

from hfbuild.core import threads
from hfbuild.core.errors import StoreError
from hfbuild.store.paths import MANIFEST, manifest_digest
from hfbuild.store.remotefiles import transfer_bar
from hfbuild.store.remotepull import RemotePulls
from hfbuild.store.remotereach import (
    RefusedEntryError,
    RemoteError,
    RemoteMissingError,
    reaching,
)
from hfbuild.store.store import Store


class Remote(RemotePulls):
    """A remote cache at `url`. `pins` gives what the committed lock records per store key
    (`lockfile.pins` of HEAD's lock, asked once per `Remote`): a pulled entry whose content
    hash differs is refused. A key it does not pin is checked against the remote's own
    hashes only (its manifest's content hash, recomputed from the data)."""

    @reaching
    def push(self, store: Store, fp: str, label: str) -> int:
        """Upload a local entry: data files first, under a directory unique to this upload,
        then the manifest, create-only. Returns bytes sent; 0 when the remote already had the
        entry, or another upload published it first (this upload's data is then deleted).
        An entry whose references (shards, base) the remote holds with other content (they
        were built here while it was unreachable, and another node published first) is
        refused: the remote would hold a list or selection its own entries contradict."""
        return self._push(store, fp, label)[0]

    def _push(self, store: Store, fp: str, label: str) -> tuple[int, str | None]:
        """`push`; with the content hash of the remote's entry when the remote held one
        already (None when this upload published it, or the remote's manifest is unreadable)."""
        try:
            theirs = self.read_manifest(fp)
        except RefusedEntryError:
            return 0, None  # the remote holds something there: never overwritten
        except RemoteMissingError:
            theirs = None  # a file:// remote's directory: the first push makes it
        if theirs is not None:
            return 0, str(theirs.get("content_hash"))
        doc = store.read_manifest(fp)
        if doc is None or not store.has(fp):
            raise StoreError(f"{label}: the local store has no complete entry {fp} to push.")
        files: Mapping[str, int] = doc["files"]
        # A result made of shards: every shard first (each an entry of its own), its list last.
        shard_bytes = 0
        refs = store.references(fp, doc)
        # Each reference's push is a few round trips (most often: the remote has it): a few
        # at a time, errors raised in order.
        pushed = threads.each(lambda key: self._push(store, key, label), refs)
        for key, got in zip(refs, pushed, strict=True):
            if isinstance(got, Exception):
                raise got
            sent, held = got
            shard_bytes += sent
            mine = (store.read_manifest(key) or {}).get("content_hash")
            if held is not None and held != mine:
                raise RefusedEntryError(
                    f"{label}: {fp} was built over {key}, and the remote {self.url} holds "
                    f"another copy of it (content hash {held}, this store's {mine}: built here "
                    f"while the remote was unreachable, or by a non-deterministic transform, "
                    f"after another node published first); not pushed. Build again: the "
                    f"remote's copy is adopted first."
                )
        total = sum(files.values())
        data_dir = f"data-{uuid.uuid4().hex}"
        try:
            made: set[str] = set()
            with transfer_bar(total, f"push {label}") as bar:
                for rel, size in sorted(files.items()):
                    local = os.path.join(store.data_path(fp), *rel.split("/"))
                    key = self.key(fp, f"{data_dir}/{rel}")
                    parent = posixpath.dirname(key)
                    if parent not in made:  # a no-op on object stores, needed on file://
                        self.fs.makedirs(parent, exist_ok=True)
                        made.add(parent)
                    self.fs.put_file(local, key)
                    bar.update(size)
            if not files:  # a list of shards: the manifest is the entry's only file
                self.fs.makedirs(posixpath.dirname(self.key(fp, MANIFEST)), exist_ok=True)
            published = {**doc, "data_dir": data_dir}
            published["manifest_digest"] = manifest_digest(published)  # still self-checking
            body = json.dumps(published, sort_keys=True).encode()
            won = self.create(self.key(fp, MANIFEST), body)
        except OSError as e:
            self.discard(fp, data_dir)
            raise RemoteError(f"pushing {label} ({fp}) to {self.url} failed: {e}") from e
        if not won:
            self.discard(fp, data_dir)
            again = self.read_manifest(fp)
            return shard_bytes, str(again.get("content_hash")) if again else None
        return shard_bytes + total, None
