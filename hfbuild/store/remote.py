"""The remote cache: store entries shared by fingerprint over any fsspec filesystem.

Owns: the remote layout (`<url>/objects/<fp[:2]>/<fp>/` holding the entry's data files under
a name unique to the upload, `data-<uuid>/`, and, written last, its `manifest.json` naming that
directory), uploading and downloading entries, and checking a download (its manifest's
checksum, its content hash against what the committed lock records for its key, before any
download; safe paths, sizes, then the full output content hash) before it is published into
the local store, marked as pulled. The remote's own records vouch for a key only where no
committed lock pins it (new code): whoever can write there can recompute them. An upload without
its manifest is invisible: pull never takes it. Publishing is first-writer-wins without a
lock server: the manifest is written create-only (S3's `If-None-Match: *` through s3fs's
`mode="create"`; a hard link, which fails on an existing name, for file://), and an upload
that loses the race deletes its own data directory. Entries written before the unique names
(`data/`, no `data_dir` in the manifest) are still read. An entry's references
(`Store.references`: a stage's shards, the base an indices entry selects rows of) are pushed
before it and pulled before it; one the remote lacks makes the pull fail, never serve. A
remote that cannot be reached, or for which no credentials were found, is one
`RemoteUnreachableError` saying what to check or set, remembered per URL for a minute (each
attempt costs the client's retries); `unavailable` says what a build does then (builds here,
warning once, unless HFBUILD_REMOTE_REQUIRED=1 or on the Ray executor: it stops).

Must never: unpickle or execute anything downloaded, write outside the store's build
directory, trust a path or fingerprint the remote names, or read credentials itself (fsspec's
own configuration does, e.g. FSSPEC_S3_ENDPOINT_URL or the AWS_* variables).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from hfbuild.core import config, progress
from hfbuild.core.errors import HfbuildError, StoreError
from hfbuild.store.lockfile import LOCK_NAME, Pin
from hfbuild.store.paths import MANIFEST, manifest_digest, safe_rel
from hfbuild.store.store import Store

_PROGRESS_BYTES = 4 * 1024 * 1024  # transfers above this show a progress bar


class RemoteError(HfbuildError):
    """The remote cannot be used, or one of its entries fails its checks."""


class RefusedEntryError(RemoteError):
    """One entry of the remote fails its checks (its manifest, its files, its content, or
    what the committed lock records for its key): it is not used, and nothing of it is
    published in the store."""


class RemoteUnreachableError(RemoteError):
    """The remote cannot be used at all: it cannot be reached (network, endpoint), or no
    credentials for it were found. Every entry is unavailable rather than refused; `again`
    is True when this process already met the same failure (reported once)."""

    def __init__(self, message: str, *, again: bool = False) -> None:
        super().__init__(message)
        self.again = again


class RemoteMissingError(RemoteError):
    """A `file://` remote whose directory does not exist (a wrong path, or an unmounted
    share): an error, not "the remote does not hold it"."""


def remote_url(root: str, explicit: str | None = None) -> str | None:
    """The remote: `explicit`, else $HFBUILD_REMOTE, else `[tool.hfbuild] remote` in the
    project's pyproject.toml; None when none is configured."""
    if explicit:
        return explicit
    env = os.environ.get("HFBUILD_REMOTE")
    if env:
        return env
    url = config.tool(root).get("remote")
    return str(url) if url else None


def remote_disabled() -> bool:
    """HFBUILD_NO_REMOTE=1: every build of this process works without the remote."""
    return os.environ.get("HFBUILD_NO_REMOTE", "").strip().lower() in {"1", "true", "yes"}


def remote_required() -> bool:
    """HFBUILD_REMOTE_REQUIRED=1: a build stops when the remote is unreachable, instead of
    building locally (what a CI job that must not rebuild what it should pull sets)."""
    return os.environ.get("HFBUILD_REMOTE_REQUIRED", "").strip().lower() in {"1", "true", "yes"}


# A remote found unreachable is not asked again for this long (each attempt costs the
# client's retries: ~10 s for s3fs), so a build of many stages reports it once.
_DOWN_SECONDS = 60.0
_down: dict[str, tuple[float, str]] = {}  # url -> (when, message)

# What fsspec backends raise that says "the remote cannot be used at all", by class name in
# the exception's class hierarchy (botocore's classes, for s3fs, are not imported here).
_CONNECTION = {"ConnectionError", "HTTPClientError", "ClientConnectorError", "TimeoutError"}
_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


def _unusable(url: str, e: BaseException) -> RemoteUnreachableError | None:
    """The one-line error for an exception saying the remote cannot be reached or has no
    credentials; None for any other exception."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & _CREDENTIALS:
        return RemoteUnreachableError(
            f"the remote {_public(url)} needs credentials, and none were found "
            f"({type(e).__name__}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            f"AWS_PROFILE), or fsspec's own configuration (FSSPEC_S3_KEY and "
            f"FSSPEC_S3_SECRET), in the environment of every process that uses it; on a Ray "
            f"cluster, in the environment `ray start` ran in on each node."
        )
    if names & _CONNECTION:
        return RemoteUnreachableError(
            f"cannot reach the remote {_public(url)} ({type(e).__name__}: {e}): check the "
            f"network and its endpoint (FSSPEC_S3_ENDPOINT_URL or AWS_ENDPOINT_URL for an "
            f"S3-compatible server), or work without it (HFBUILD_NO_REMOTE=1)."
        )
    return None


def unavailable(e: RemoteError, label: str, *, ray: bool = False) -> str | None:
    """What a build that could not pull `label` because of `e` warns before building it
    here; None when nothing new is to be said (an unreachable remote is reported once per
    process). An unreachable remote raises instead with HFBUILD_REMOTE_REQUIRED=1, or on the
    Ray executor (`ray`), whose workers have no other way to share their inputs."""
    if not isinstance(e, RemoteUnreachableError):
        return f"{label}: {e} Building it instead."
    if ray:
        raise RemoteUnreachableError(
            f"{e} The Ray executor's workers read their inputs from it and publish their "
            f"results to it: build with the local executor (--executor local, or unset "
            f"HFBUILD_EXECUTOR) until it is back."
        ) from e
    if remote_required():
        raise RemoteUnreachableError(
            f"{e} HFBUILD_REMOTE_REQUIRED=1 is set, so {label} is not built here."
        ) from e
    if e.again:
        return None
    return f"{e} Building here instead (HFBUILD_REMOTE_REQUIRED=1 stops instead)."


_F = TypeVar("_F", bound=Callable[..., Any])


def _reaching(method: _F) -> _F:
    """A `Remote` method whose unreachable remote or missing credentials raise
    `RemoteUnreachableError`, and are remembered for the process a while (`_DOWN_SECONDS`)."""

    @functools.wraps(method)
    def wrapper(self: Remote, *args: Any, **kwargs: Any) -> Any:
        seen = _down.get(self.url)
        if seen is not None and time.monotonic() - seen[0] < _DOWN_SECONDS:
            raise RemoteUnreachableError(seen[1], again=True)
        try:
            return method(self, *args, **kwargs)
        except HfbuildError:
            raise
        except Exception as e:
            err = _unusable(self.url, e)
            if err is None:
                raise
            _down[self.url] = (time.monotonic(), str(err))
            raise err from e

    return cast(_F, wrapper)


_DATA_DIR = re.compile(r"^data(-[0-9a-f]{32})?$")


_FP = r"[0-9a-f]{32}"


def _check_fp(fp: str) -> str:
    if not re.fullmatch(_FP, fp):
        raise RemoteError(f"not a fingerprint: {fp!r}")
    return fp


Pins = Callable[[], Mapping[str, Pin]]


class Remote:
    """A remote cache at `url`. `pins` gives what the committed lock records per store key
    (`lockfile.pins` of HEAD's lock, asked once per `Remote`): a pulled entry whose content
    hash differs is refused. A key it does not pin is checked against the remote's own
    hashes only (its manifest's content hash, recomputed from the data)."""

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

    def _key(self, fp: str, rel: str = "") -> str:
        path = posixpath.join(self.base, "objects", _check_fp(fp)[:2], fp)
        return posixpath.join(path, rel) if rel else path

    def pins(self) -> Mapping[str, Pin]:
        """What the committed lock records per key ({} without one), read once."""
        if self._pins is None:
            self._pins = self._pins_of() if self._pins_of is not None else {}
        return self._pins

    def where(self, fp: str) -> str:
        """The entry's address on the remote, for messages."""
        return f"{self.url}/objects/{_check_fp(fp)[:2]}/{fp}"

    @_reaching
    def read_manifest(self, fp: str) -> dict[str, Any] | None:
        """The entry's manifest if the remote holds a complete entry for `fp`."""
        try:
            raw = self.fs.cat_file(self._key(fp, MANIFEST))
        except FileNotFoundError:
            self._check_root()
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
        files = doc.get("files")
        if not isinstance(files, dict) or not all(
            safe_rel(k) and isinstance(v, int) and v >= 0 for k, v in files.items()
        ):
            raise RefusedEntryError(
                f"remote entry {fp} lists unsafe or malformed file paths; not used."
            )
        return doc

    def _check_root(self) -> None:
        """A `file://` remote's directory must exist: a missing one is a wrong path or an
        unmounted share, never "the remote does not hold it"."""
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(self.fs, LocalFileSystem) and not os.path.isdir(self.base):
            raise RemoteMissingError(
                f"the remote {self.url} does not exist (no directory {self.base}): correct "
                f"its URL (--remote, HFBUILD_REMOTE or [tool.hfbuild] remote in "
                f"pyproject.toml), mount it, or create the directory."
            )

    @_reaching
    def has(self, fp: str) -> bool:
        try:
            return bool(self.fs.exists(self._key(fp, MANIFEST)))
        except OSError as e:
            raise RemoteError(f"cannot reach {self.url}: {e}") from e

    @_reaching
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
        for key in store.references(fp, doc):
            sent, held = self._push(store, key, label)
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
            with _progress(total, f"push {label}") as bar:
                for rel, size in sorted(files.items()):
                    local = os.path.join(store.data_path(fp), *rel.split("/"))
                    key = self._key(fp, f"{data_dir}/{rel}")
                    parent = posixpath.dirname(key)
                    if parent not in made:  # a no-op on object stores, needed on file://
                        self.fs.makedirs(parent, exist_ok=True)
                        made.add(parent)
                    self.fs.put_file(local, key)
                    bar.update(size)
            if not files:  # a list of shards: the manifest is the entry's only file
                self.fs.makedirs(posixpath.dirname(self._key(fp, MANIFEST)), exist_ok=True)
            published = {**doc, "data_dir": data_dir}
            published["manifest_digest"] = manifest_digest(published)  # still self-checking
            body = json.dumps(published, sort_keys=True).encode()
            won = self._create(self._key(fp, MANIFEST), body)
        except OSError as e:
            self._discard(fp, data_dir)
            raise RemoteError(f"pushing {label} ({fp}) to {self.url} failed: {e}") from e
        if not won:
            self._discard(fp, data_dir)
            again = self.read_manifest(fp)
            return shard_bytes, str(again.get("content_hash")) if again else None
        return shard_bytes + total, None

    @_reaching
    def remove(self, fp: str) -> bool:
        """Delete the remote's entry for `fp`: its manifest first (the entry is then
        invisible to every pull), then its data. False when there was none. Entries that
        reference it (a list naming it as a shard, a selection of its rows) are refused by a
        pull from then on, and built again, until they are removed or it is published again."""
        entry = self._key(fp)
        try:
            if not self.fs.exists(entry):
                self._check_root()
                return False
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._key(fp, MANIFEST))
            self.fs.rm(entry, recursive=True)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise RemoteError(f"cannot remove {self.where(fp)}: {e}") from e
        return True

    @_reaching
    def adopt(self, store: Store, fp: str, label: str) -> bool:
        """First writer wins: a local entry this store did not pull from here (built here
        while the remote was unreachable, or before another node published first) whose
        content differs from the remote's entry for its key is replaced by the remote's, its
        references first, so that what is built on it has the published entry as its input
        or base. An entry the committed lock pins keeps the lock's content (a remote entry
        contradicting it is forged: `pull` refuses it). True when something was replaced."""
        mine = store.read_manifest(fp)
        if mine is None or mine.get("pulled_from") == _public(self.url):
            return False
        theirs = self.read_manifest(fp)
        if theirs is None or theirs.get("content_hash") == mine.get("content_hash"):
            return False
        pin = self.pins().get(fp)
        if pin is not None and pin.content_hash == mine.get("content_hash"):
            return False
        for key in store.references(fp, mine):
            self.adopt(store, key, label)
        with store.lock(fp):
            store.quarantine(fp)
            self.pull_held(store, fp, label, theirs)
        return True

    def _create(self, key: str, body: bytes) -> bool:
        """Write `body` at `key` only if nothing is there; False when something was."""
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(self.fs, LocalFileSystem):
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

    def _discard(self, fp: str, data_dir: str) -> None:
        """Delete an upload's data directory (it lost the race, or failed half-way)."""
        # Invisible without a manifest naming it: failing to delete costs space only.
        with contextlib.suppress(OSError, ValueError):
            self.fs.rm(self._key(fp, data_dir), recursive=True)

    @_reaching
    def pull(self, store: Store, fp: str, label: str, expect: str | None = None) -> int:
        """Download a remote entry into the store, after checking it; returns bytes received,
        0 when there was nothing to pull. `expect` is the content hash a trusted list of
        shards gives the entry. A failing entry raises RefusedEntryError and leaves nothing
        of it in the store (shards of a list pulled before it, each checked, stay)."""
        doc = self.read_manifest(fp)
        if doc is None:
            return 0
        with store.lock(fp):
            return self.pull_held(store, fp, label, doc, expect)

    @_reaching
    def pull_held(
        self,
        store: Store,
        fp: str,
        label: str,
        doc: Mapping[str, Any] | None = None,
        expect: str | None = None,
    ) -> int:
        """`pull`, for a caller already holding the store's lock for `fp`."""
        if doc is None:
            doc = self.read_manifest(fp)
            if doc is None:
                return 0
        if store.has(fp):
            return 0
        rows = doc.get("shards")
        # Before anything is downloaded: the content hash the committed lock (or a list
        # that lock vouches for) records for this key.
        try:
            self._check_pinned(fp, label, doc, expect)
        except RefusedEntryError as e:
            if not isinstance(rows, list):
                raise
            # A forged list: its shards the lock vouches for are still good ones, so the
            # build that follows builds only the others.
            bad = self._salvage(store, label, rows)
            listing = ", ".join(bad[:5]) + (f", and {len(bad) - 5:,} more" if len(bad) > 5 else "")
            raise RefusedEntryError(
                f"{e} Its shards that differ from the lock: {listing or 'none'}; the others "
                f"were pulled, each checked."
            ) from None
        if isinstance(rows, list):
            # A result made of shards: its rows must add up to its (checked) content hash, so
            # each row's hash is vouched for too; each shard is then pulled and checked
            # against its row (and its own pin), its list last.
            got = self._pull_shards(store, fp, label, doc, rows)
        else:
            # An indices entry: its base first (see `Store.references`).
            refs = store.references(fp, dict(doc))
            got = sum(self.pull(store, key, label) for key in refs if not store.has(key))
            if any(not store.has(key) for key in refs):
                raise RefusedEntryError(
                    f"remote entry {fp} ({label}) needs an entry the remote lacks (the base it "
                    f"selects rows of); not used."
                )
        files: Mapping[str, int] = doc["files"]
        data_dir = doc.get("data_dir", "data")
        if not isinstance(data_dir, str) or not _DATA_DIR.match(data_dir):
            raise RefusedEntryError(f"remote entry {fp} names an unsafe data directory; not used.")
        tmp = store.new_build_dir(fp)
        try:
            total = got + sum(files.values())
            with _progress(total, f"pull {label}") as bar:
                for rel, size in sorted(files.items()):
                    local = os.path.join(tmp, "data", *rel.split("/"))
                    os.makedirs(os.path.dirname(local), exist_ok=True)
                    self.fs.get_file(self._key(fp, f"{data_dir}/{rel}"), local)
                    if os.path.getsize(local) != size:
                        raise RefusedEntryError(
                            f"remote entry {fp} ({label}): {rel} is {os.path.getsize(local)} "
                            f"bytes, its manifest says {size}; not used."
                        )
                    bar.update(size)
            _check_content(store, tmp, fp, doc, label)
            meta = {
                k: v
                for k, v in doc.items()
                if k not in ("fingerprint", "files", "manifest_digest", "data_dir", "ids")
            }
            meta["pulled_from"] = _public(self.url)  # `verify` names a pulled entry as such
            store.publish(tmp, fp, meta)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RemoteError(
                f"remote entry {fp} ({label}) could not be downloaded ({e}); not used."
            ) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return total

    def _check_pinned(
        self, fp: str, label: str, doc: Mapping[str, Any], expect: str | None
    ) -> None:
        """Refuse the entry when its content hash is not what the committed lock records for
        `fp`, or not `expect` (its row in a list of shards already vouched for)."""
        got = doc.get("content_hash")
        pin = self.pins().get(fp)
        if pin is not None and got != pin.content_hash:
            what = f"stage {pin.stage!r}'s shard" if pin.shard else f"stage {pin.stage!r}"
            source = f"the committed {self.lock_name} records {pin.content_hash} for {what}"
        elif expect is not None and got != expect:
            source = f"the list of shards that names it records {expect}"
        else:
            return
        raise RefusedEntryError(
            f"the remote {self.url} holds a forged or damaged entry {fp} ({label}): its "
            f"content hash is {got}, but {source}; not used. Whoever can write to the remote "
            f"should delete {self.where(fp)}."
        )

    def _pull_shards(
        self, store: Store, fp: str, label: str, doc: Mapping[str, Any], rows: list[Any]
    ) -> int:
        """Pull the shards a remote list names, each checked against its row's content hash;
        the rows' hashes must first add up to the list's own (`content.combined_hash`)."""
        from hfbuild.store.content import combined_hash

        want: list[tuple[str, str, str]] = []  # (key, content hash, label) per row
        hashes: list[tuple[str, str]] = []
        for row in rows:
            facts = row[4] if isinstance(row, list) and len(row) >= 5 else None
            h = facts.get("content_hash") if isinstance(facts, dict) else None
            if not (isinstance(h, str) and isinstance(row[1], str) and re.fullmatch(_FP, row[1])):
                raise RefusedEntryError(
                    f"remote entry {fp} ({label}) has a malformed list of shards; not used."
                )
            want.append((row[1], h, str(row[2])))
            hashes.append((str(row[0]), h))
        if combined_hash(hashes) != doc.get("content_hash"):
            raise RefusedEntryError(
                f"the remote {self.url} holds a forged or damaged entry {fp} ({label}): the "
                f"content hashes its list gives its shards do not add up to its own; not used. "
                f"Whoever can write to the remote should delete {self.where(fp)}."
            )
        got = 0
        refused: list[RefusedEntryError] = []
        for key, h, shard_label in want:
            # Every shard is tried, a refused one or not: those that pass their checks are
            # good ones, and the build that follows builds only the others.
            held = store.intact_manifest(key)
            if held is None:
                try:
                    got += self.pull(store, key, f"{label} {shard_label}", expect=h)
                except RefusedEntryError as e:
                    refused.append(e)
                    continue
                held = store.intact_manifest(key)
            elif held.get("content_hash") != h and self.adopt(store, key, f"{label} {shard_label}"):
                held = store.intact_manifest(key)  # this store's own copy, published by none
            if held is None:
                refused.append(
                    RefusedEntryError(
                        f"remote entry {fp} ({label}) needs its shard {key} ({shard_label}), "
                        f"which the remote lacks; not used."
                    )
                )
            elif held.get("content_hash") != h:
                refused.append(
                    RefusedEntryError(
                        f"the remote {self.url} holds a forged or damaged entry {fp} ({label}): "
                        f"it lists shard {key} ({shard_label}) with content hash {h}, but that "
                        f"shard holds {held.get('content_hash')}; not used. Whoever can write "
                        f"to the remote should delete {self.where(fp)}."
                    )
                )
        if refused:
            more = f" ({len(refused) - 1:,} more of its shards refused)" if len(refused) > 1 else ""
            raise RefusedEntryError(f"{refused[0]}{more}") from refused[0]
        return got

    def _salvage(self, store: Store, label: str, rows: list[Any]) -> list[str]:
        """Pull the shards of a refused list whose rows the committed lock vouches for (each
        checked as any pull); the labels of the other rows."""
        bad = []
        for row in rows:
            facts = row[4] if isinstance(row, list) and len(row) >= 5 else None
            h = facts.get("content_hash") if isinstance(facts, dict) else None
            key = row[1] if isinstance(row, list) and len(row) >= 3 else None
            pin = self.pins().get(key) if isinstance(key, str) else None
            if pin is None or h != pin.content_hash or not re.fullmatch(_FP, str(key)):
                bad.append(str(row[2]) if isinstance(row, list) and len(row) >= 3 else "?")
                continue
            if not store.has(str(key)):
                with contextlib.suppress(RefusedEntryError):
                    self.pull(store, str(key), f"{label} {row[2]}", expect=h)
        return bad


def _public(url: str) -> str:
    """`url` without credentials in it (`scheme://user:secret@host/...`)."""
    return re.sub(r"^([A-Za-z0-9+.-]+://)[^/@]*@", r"\1", url)


def _check_content(store: Store, tmp: str, fp: str, doc: Mapping[str, Any], label: str) -> None:
    """Load the downloaded entry (Arrow and JSON only; an indices entry over its base, pulled
    and checked before it) and compare its content hash."""
    import datasets

    from hfbuild.store.content import dataset_hash

    if isinstance(doc.get("shards"), list):
        return  # its shards were each checked against its rows when pulled (`_pull_shards`)
    data = os.path.join(tmp, "data")
    try:
        if isinstance(doc.get("indices"), dict):
            why = store.check_base(dict(doc))
            if why is not None:
                raise RefusedEntryError(f"remote entry {fp} ({label}): {why}; not used.")
            got = dataset_hash(store.load_indices(fp, dict(doc), data))
        else:
            got = dataset_hash(datasets.load_from_disk(data, keep_in_memory=False))
    except RemoteError:
        raise
    except Exception as e:
        raise RefusedEntryError(
            f"remote entry {fp} ({label}) cannot be read ({e}); not used."
        ) from e
    if got != doc.get("content_hash"):
        raise RefusedEntryError(
            f"remote entry {fp} ({label}) fails its content check (hash {got}, manifest says "
            f"{doc.get('content_hash')}); not used."
        )


def _progress(total: int, desc: str) -> Any:
    return progress.bar(total, desc, unit="B", unit_scale=True, at_least=_PROGRESS_BYTES)
