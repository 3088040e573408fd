"""Taking an entry from the remote: every check before it is published in the local store.

Owns: `RemotePulls` (a `RemoteFiles` that pulls): pull (the manifest checked by
`RemoteFiles.read_manifest`; its content hash against what the committed lock pins for the key,
before any download, since whoever can write to the remote can recompute its own records; a list
of shards: its rows' hashes must add up to its own, each shard then pulled and checked against
its row, the good shards of a refused list kept; an indices entry's base pulled first, refused
when the remote lacks it; the data checked, an indices entry through its base, then published,
marked `pulled_from`; an entry written before the unique data directories, `data/` with no
`data_dir` in its manifest, is still read); adopting the remote's entry for a key in place of a
local copy this store did not pull and whose content differs, or whose rows are the same in
other files (`adopt`: references first; not where the local copy holds what the committed lock
pins).

Must never: unpickle or execute anything downloaded, write outside the store's build
directory, publish anything of a refused entry.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
from collections.abc import Mapping
from typing import Any

from hfbuild.store.entry import row_base, row_pack
from hfbuild.store.remotefiles import FP, PROGRESS_BYTES, RemoteFiles, transfer_bar
from hfbuild.store.remotereach import RefusedEntryError, RemoteError, public_url, reaching
from hfbuild.store.store import Store

_DATA_DIR = re.compile(r"^data(-[0-9a-f]{32})?$")

# What a pulled entry's manifest does not keep of the remote's: the remote's own records.
NOT_KEPT = ("fingerprint", "files", "manifest_digest", "data_dir", "ids")


class RemotePulls(RemoteFiles):
    """A remote cache that entries are pulled from: a pulled entry whose content hash differs
    from what the committed lock pins for its key is refused; a key it does not pin is
    checked against the remote's own hashes only (its manifest's content hash, recomputed
    from the data)."""

    @reaching
    def adopt(self, store: Store, fp: str, label: str) -> bool:
        """First writer wins: a local entry this store did not pull from here (built here
        while the remote was unreachable, or before another node published first) whose
        content differs from the remote's entry for its key is replaced by the remote's, its
        references first, so that what is built on it has the published entry as its input
        or base. So is one with the same rows in other files (a shard a node built by
        itself, where the remote holds it as written out of a pack): a list of selections
        records its bases' files, and is served only where they are those files. An entry
        the committed lock pins keeps the lock's content (a remote entry contradicting it is
        forged: `pull` refuses it). True when something was replaced."""
        mine = store.read_manifest(fp)
        if mine is None or mine.get("pulled_from") == public_url(self.url):
            return False
        theirs = self.read_manifest(fp)
        if theirs is None:
            return False
        if theirs.get("content_hash") == mine.get("content_hash"):
            if theirs.get("files") == mine.get("files"):
                return False
        else:
            pin = self.pins().get(fp)
            if pin is not None and pin.content_hash == mine.get("content_hash"):
                return False
        for key in store.references(fp, mine):
            self.adopt(store, key, label)
        with store.lock(fp):
            store.quarantine(fp)
            self.pull_held(store, fp, label, theirs)
        return True

    @reaching
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

    @reaching
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
            # An indices entry: its base first (see `Store.references`); one held here as
            # this store wrote it, in other files than the remote's, replaced by the remote's.
            refs = store.references(fp, dict(doc))
            got = 0
            for key in refs:
                if store.has(key):
                    self.adopt(store, key, label)
                else:
                    got += self.pull(store, key, label)
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
            _download(self, fp, label, data_dir, files, os.path.join(tmp, "data"))
            _check_content(store, tmp, fp, doc, label)
            meta = {k: v for k, v in doc.items() if k not in NOT_KEPT}
            meta["pulled_from"] = public_url(self.url)  # `verify` names a pulled entry as such
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
            if not (isinstance(h, str) and isinstance(row[1], str) and re.fullmatch(FP, row[1])):
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
        packed = {str(row[1]): p for row in rows if (p := row_pack(row)) is not None}
        bases = {str(row[1]): b for row in rows if (b := row_base(row)) is not None}
        pulled: dict[str, dict[str, Any] | None] = {}  # pack -> its manifest here, pulled
        for key, h, shard_label in want:
            if key in packed:
                # A row range of a pack (`packs.py`): the pack is pulled once, checked
                # whole and range by range (`_check_content`), and must give this shard
                # the rows and content hash the list's row does.
                pack = packed[key][0]
                if pack not in pulled:
                    try:
                        got += self.pull(store, pack, f"{label} (pack)")
                    except RefusedEntryError as e:
                        refused.append(e)
                    pulled[pack] = store.intact_manifest(pack)
                bad = _pack_row(self, fp, label, (key, shard_label, h), packed[key], pulled[pack])
                if bad is not None:
                    refused.append(bad)
                continue
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
            if held is not None and key in bases:
                # A selection's row records its base's files: a base this store wrote in
                # other files is replaced by the remote's, or the list is not served here.
                base, base_files = bases[key]
                mine = store.read_manifest(base)
                if mine is not None and mine.get("files") != base_files:
                    self.adopt(store, base, f"{label} {shard_label} (base)")
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
            if pin is None or h != pin.content_hash or not re.fullmatch(FP, str(key)):
                bad.append(str(row[2]) if isinstance(row, list) and len(row) >= 3 else "?")
                continue
            pack = row_pack(row)
            if pack is not None:  # its pack, checked range by range as any pull of one
                if not store.has(pack[0]):
                    with contextlib.suppress(RefusedEntryError):
                        self.pull(store, pack[0], f"{label} (pack)")
            elif not store.has(str(key)):
                with contextlib.suppress(RefusedEntryError):
                    self.pull(store, str(key), f"{label} {row[2]}", expect=h)
        return bad


def _download(
    r: RemoteFiles, fp: str, label: str, data_dir: str, files: Mapping[str, int], dest: str
) -> None:
    """The data files of entry `fp` on `r` (under its `data_dir`) into `dest`, each of the
    size its manifest gives: all in one call (on an object store, one request each, sent
    together), one by one with a progress bar when they are large."""
    pairs = [
        (r.key(fp, f"{data_dir}/{rel}"), os.path.join(dest, *rel.split("/")), rel)
        for rel in sorted(files)
    ]
    for _, local, _ in pairs:
        os.makedirs(os.path.dirname(local), exist_ok=True)
    total = sum(files.values())
    if total < PROGRESS_BYTES:
        if pairs:
            r.fs.get([key for key, _, _ in pairs], [lp for _, lp, _ in pairs])
    else:
        with transfer_bar(total, f"pull {label}") as bar:
            for remote, local, rel in pairs:
                r.fs.get_file(remote, local)
                bar.update(files[rel])
    for _, local, rel in pairs:
        if os.path.getsize(local) != files[rel]:
            raise RefusedEntryError(
                f"remote entry {fp} ({label}): {rel} is {os.path.getsize(local)} "
                f"bytes, its manifest says {files[rel]}; not used."
            )


def _pack_row(
    r: RemotePulls,
    fp: str,
    label: str,
    shard: tuple[str, str, str],
    where: tuple[str, int, int],
    held: Mapping[str, Any] | None,
) -> RefusedEntryError | None:
    """Why the remote list `fp`'s row of a packed shard (its key, label and content hash)
    is not served by the pack pulled here (`held`, None when it could not be pulled): the
    pack must give that shard the same row range and content hash."""
    key, shard_label, h = shard
    pack, start, end = where
    if held is None:
        return RefusedEntryError(
            f"remote entry {fp} ({label}) needs the pack {pack} holding its shard {key} "
            f"({shard_label}), which the remote lacks; not used."
        )
    row = {str(x[0]): x for x in held.get("pack") or []}.get(key)
    if row is not None and [row[1], row[2], row[3]] == [start, end, h]:
        return None
    return RefusedEntryError(
        f"the remote {r.url} holds a forged or damaged entry {fp} ({label}): it lists shard "
        f"{key} ({shard_label}) as rows {start}-{end} of the pack {pack} with content hash "
        f"{h}, which that pack does not hold; not used. Whoever can write to the remote "
        f"should delete {r.where(fp)}."
    )


# Pulls may run on threads (`core/threads.py`): datasets' loading is not safe there (tqdm
# deletes its class's lock when its last bar closes, and a bar opened meanwhile fails), and
# hashing is work for the CPU, not waiting, so loads and hashes take turns.
_LOADING = threading.Lock()


def _content_hash(store: Store, fp: str, doc: Mapping[str, Any], label: str, data: str) -> str:
    import datasets

    from hfbuild.store.content import dataset_hash, pack_mismatch

    if isinstance(doc.get("indices"), dict):
        why = store.check_base(dict(doc))
        if why is not None:
            raise RefusedEntryError(f"remote entry {fp} ({label}): {why}; not used.")
        return dataset_hash(store.load_indices(fp, dict(doc), data))
    loaded = datasets.load_from_disk(data, keep_in_memory=False)
    got = dataset_hash(loaded)
    if isinstance(doc.get("pack"), list):  # a pack: each shard's rows, too
        why = pack_mismatch(loaded.data.table, doc["pack"])
        if why is not None:
            raise RefusedEntryError(f"remote entry {fp} ({label}): {why}; not used.")
    return got


def _check_content(store: Store, tmp: str, fp: str, doc: Mapping[str, Any], label: str) -> None:
    """Load the downloaded entry (Arrow and JSON only; an indices entry over its base, pulled
    and checked before it) and compare its content hash."""
    if isinstance(doc.get("shards"), list):
        return  # its shards were each checked against its rows when pulled (`_pull_shards`)
    data = os.path.join(tmp, "data")
    try:
        with _LOADING:
            got = _content_hash(store, fp, doc, label, data)
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
