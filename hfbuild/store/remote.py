"""The remote cache: store entries shared by fingerprint over any fsspec filesystem.

Owns: `Remote`, the remote as the rest of hfbuild uses it, made of its parts: its errors,
settings and reachability (`remotereach.py`), its files, layout and manifests
(`remotefiles.py`), pulling and adopting with every check (`remotepull.py`); and pushing
(here): the entries an entry references (a stage's shards, the base an indices entry selects
rows of) first, refused when the remote holds one of them with other content; data files under
a directory unique to the upload, then the manifest naming it, create-only: publishing is
first-writer-wins without a lock server, and an upload that loses the race deletes its own
data directory. An upload without its manifest is invisible: pull never takes it. An entry's
files go in one call (on an object store: their requests sent together); an entry this
process has just built goes without asking first whether the remote holds it (`push_built`:
the create-only manifest decides), and a key this process saw published is not asked about
again (`RemoteFiles.held`). An entry another process pushed and sent back with its files (a
Ray worker's shard) is published in a store as a pull would publish it (`take_pushed`).

Must never: unpickle or execute anything downloaded, overwrite a published manifest, trust a
path or fingerprint the remote names, or read credentials itself (fsspec's own configuration
does, e.g. FSSPEC_S3_ENDPOINT_URL or the AWS_* variables).
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
from collections.abc import Mapping
from typing import Any, NamedTuple

from hfbuild.core import threads
from hfbuild.core.errors import StoreError
from hfbuild.store import listform
from hfbuild.store.paths import MANIFEST, manifest_digest
from hfbuild.store.remotefiles import PROGRESS_BYTES, transfer_bar
from hfbuild.store.remotepull import NOT_KEPT, RemotePulls
from hfbuild.store.remotereach import (
    RefusedEntryError,
    RemoteError,
    RemoteMissingError,
    public_url,
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
        return self._push(store, fp, label).sent

    @reaching
    def push_built(self, store: Store, fp: str, label: str) -> bool:
        """`push` of an entry this process has just built, which the remote most likely
        lacks: uploaded without asking first (the create-only manifest decides, as for any
        push). True when this upload published it."""
        return self._push(store, fp, label, fresh=True).won

    def take(self, store: Store, fp: str, label: str, sent: Any) -> None:
        """Entry `fp` into `store`: as a Ray worker that published it sent it back with its
        result (`sent_entry`; `take_pushed`), else (None) pulled."""
        if isinstance(sent, dict):
            self.take_pushed(store, fp, sent["manifest"], sent["files"])
        else:
            self.pull(store, fp, label)

    def take_pushed(
        self, store: Store, fp: str, doc: Mapping[str, Any], files: Mapping[str, bytes]
    ) -> None:
        """Publish in `store` the entry `fp` that another process (a Ray worker) pushed to
        this remote and sent back with its files (`doc` its manifest there): as a pull
        publishes it, marked pulled from here, without downloading it. Only for what the
        caller knows that process published (`push_built` said so): nothing is checked but
        that the files are the ones the manifest lists."""
        if doc.get("fingerprint") != fp or set(files) != set(doc.get("files") or {}):
            raise StoreError(f"entry {fp} was sent with another manifest than its files'.")
        with store.lock(fp):
            if store.has(fp):
                return
            tmp = store.new_build_dir(fp)
            try:
                for rel, body in files.items():
                    path = os.path.join(tmp, "data", *rel.split("/"))
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(body)
                meta = {k: v for k, v in doc.items() if k not in NOT_KEPT}
                meta["pulled_from"] = public_url(self.url)
                store.publish(tmp, fp, meta, durable=False)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.saw(fp, str(doc.get("content_hash")))

    def _push(self, store: Store, fp: str, label: str, fresh: bool = False) -> _Pushed:
        """`push`; with the content hash of the remote's entry when the remote held one
        already (None when this upload published it, or the remote's manifest is unreadable).
        `fresh`: not asked whether the remote holds it before uploading."""
        known = self.held(fp)  # seen published by this process: never overwritten
        if known is not None:
            return _Pushed(0, known, False)
        if not fresh:
            try:
                theirs = self.read_manifest(fp)
            except RefusedEntryError:
                return _Pushed(0, None, False)  # the remote holds something there: kept
            except RemoteMissingError:
                theirs = None  # a file:// remote's directory: the first push makes it
            if theirs is not None:
                return _Pushed(0, str(theirs.get("content_hash")), False)
        doc = store.read_manifest(fp)
        if doc is None or not store.has(fp):
            raise StoreError(f"{label}: the local store has no complete entry {fp} to push.")
        files: Mapping[str, int] = doc["files"]
        # A result made of shards: every shard first (each an entry of its own), its list last.
        shard_bytes = 0
        refs = store.references(fp, doc)
        # Each reference's push is a few round trips (most often: the remote has it): a few
        # at a time, errors raised in order; one this process saw published asks nothing
        # (a list's shards a Ray build took: no thread for each of thousands).
        seen: dict[str, _Pushed | Exception] = {
            key: _Pushed(0, held, False) for key in refs if (held := self.held(key)) is not None
        }
        asked = [key for key in refs if key not in seen]
        pushed = threads.each(lambda key: self._push(store, key, label), asked)
        seen.update(zip(asked, pushed, strict=True))
        for key in refs:
            got = seen[key]
            if isinstance(got, Exception):
                raise got
            shard_bytes += got.sent
            mine = (store.read_manifest(key) or {}).get("content_hash")
            if got.held is not None and got.held != mine:
                raise RefusedEntryError(
                    f"{label}: {fp} was built over {key}, and the remote {self.url} holds "
                    f"another copy of it (content hash {got.held}, this store's {mine}: built "
                    f"here while the remote was unreachable, or by a non-deterministic "
                    f"transform, after another node published first); not pushed. Build "
                    f"again: the remote's copy is adopted first."
                )
        import uuid  # here: its import (and platform's) is ~2 ms of every no-op otherwise

        total = sum(files.values())
        data_dir = f"data-{uuid.uuid4().hex}"
        try:
            self._upload(store, fp, data_dir, files, label)
            published = listform.compact({**doc, "data_dir": data_dir})  # as stored here
            published["manifest_digest"] = manifest_digest(published)  # still self-checking
            body = json.dumps(published, sort_keys=True).encode()
            won = self.create(self.key(fp, MANIFEST), body)
        except OSError as e:
            self.discard(fp, data_dir)
            raise RemoteError(f"pushing {label} ({fp}) to {self.url} failed: {e}") from e
        if not won:
            self.discard(fp, data_dir)
            try:
                again = self.read_manifest(fp)
            except RefusedEntryError:
                again = None
            return _Pushed(shard_bytes, str(again.get("content_hash")) if again else None, False)
        self.saw(fp, str(doc.get("content_hash")))
        return _Pushed(shard_bytes + total, None, True)

    def _upload(
        self, store: Store, fp: str, data_dir: str, files: Mapping[str, int], label: str
    ) -> None:
        """An entry's data files to `data_dir` of its remote directory: all in one call (on
        an object store, one request each, sent together), one by one with a progress bar
        when they are large. Directories are made only on file:// (an object store has
        none, and s3fs asks whether the bucket exists each time it is asked to make one)."""
        from fsspec.implementations.local import LocalFileSystem

        pairs = [
            (os.path.join(store.data_path(fp), *rel.split("/")), self.key(fp, f"{data_dir}/{rel}"))
            for rel in sorted(files)
        ]
        if isinstance(self.fs, LocalFileSystem):
            parents = {posixpath.dirname(r) for _, r in pairs} or {self.key(fp)}
            for parent in sorted(parents):
                self.fs.makedirs(parent, exist_ok=True)
        total = sum(files.values())
        if total < PROGRESS_BYTES:
            if pairs:
                self.fs.put([a for a, _ in pairs], [b for _, b in pairs])
            return
        with transfer_bar(total, f"push {label}") as bar:
            for (local, key), size in zip(pairs, [files[r] for r in sorted(files)], strict=True):
                self.fs.put_file(local, key)
                bar.update(size)


class _Pushed(NamedTuple):
    """What a push did: bytes sent; the content hash of the remote's entry when it held one
    already (None when this upload published it, or its manifest is unreadable); whether
    this upload published it."""

    sent: int
    held: str | None
    won: bool


def sent_entry(store: Store, fp: str, limit: int) -> dict[str, Any] | None:
    """The entry `fp` of `store` as the process that pushed it sends it to another, for
    `Remote.take_pushed`: its manifest and each data file's bytes; None when its files add
    up to more than `limit` bytes."""
    doc = store.read_manifest(fp)
    if doc is None or sum(doc["files"].values()) > limit:
        return None
    files = {}
    for rel in doc["files"]:
        with open(os.path.join(store.data_path(fp), *rel.split("/")), "rb") as f:
            files[rel] = f.read()
    return {"manifest": doc, "files": files}
