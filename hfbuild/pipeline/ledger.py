"""Keeping each stage's ref and hfbuild.lock entry in step with what the store serves.

Owns: the committed lock's stages (HEAD's; outside git, the lock on disk), one process's view
of hfbuild.lock (read once, and again only when the file's stat
signature changed or this process wrote it) and of the stored manifests it looked at (read and
checked once per up-to-date check, then reused by the doit title line; a manifest a build just
published, as recorded, taken by the next key computation), so that a no-op run over N stages
reads and parses the lock once, not N times. Every change is written at once,
merged under the lock file's file lock with what is on disk then (`lockfile.update`), so
concurrent runs and a crash mid-run lose no entry.

Must never: decide freshness from anything but an intact store entry under the current
fingerprint, trust the lock's content for anything but "nothing to write", or import datasets.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hfbuild.keys.inputid import Lookup
from hfbuild.pipeline.relock import ManifestsOf, resolve_conflict
from hfbuild.source.gitrepo import find_root, head_text
from hfbuild.store import lockfile

if TYPE_CHECKING:
    from hfbuild.keys.place import Place


class Ledger:
    """The lock and ref bookkeeping of one pipeline, for one process: its `place` and its
    manifests (`manifests_of`: `Pipeline.manifests`)."""

    def __init__(self, place: Place, manifests_of: ManifestsOf) -> None:
        self.place = place
        self._manifests = manifests_of
        self._stored: dict[str, dict[str, Any] | None] = {}  # fingerprint -> intact manifest
        self._registered = False
        self._fresh: set[str] = set()  # read for a key computation, not yet by `is_built`
        # Recorded from a manifest just published or checked here, not yet looked up.
        self._recorded: set[str] = set()

    def committed(self) -> dict[str, Any]:
        """The committed lock's (HEAD's) stages; {} without one or when it cannot be read.
        Outside git nothing is committed and files are identified by content: the lock on
        disk, which a copy of the project carries, stands for it."""
        text = head_text(self.place.lock_path)
        if text is None and find_root(self.place.root) is None:
            try:
                with open(self.place.lock_path, encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                text = None
        try:
            return lockfile.loads(text) if text else {}
        except lockfile.LockError:
            return {}

    def stored(self, fp: str) -> dict[str, Any] | None:
        """The manifest of the intact store entry `fp` (None: absent or damaged), read and
        checked once per process; `forget` makes the next call look again."""
        if fp not in self._stored:
            self._stored[fp] = self.place.store.intact_manifest(fp)
        return self._stored[fp]

    def present(self, fp: str) -> bool:
        """Whether the store holds an intact entry `fp`, as `stored` knows it (read once)."""
        return self.stored(fp) is not None

    def forget(self, fp: str) -> None:
        self._stored.pop(fp, None)

    def lookup(self) -> Lookup:
        """For one computation of the manifests: an input's result by fingerprint (its intact
        entry's manifest, what its consumers' keys hold: `inputid`), each read afresh once;
        the stage's own up-to-date check that follows takes that read instead of another."""
        seen: dict[str, dict[str, Any] | None] = {}
        # An entry `record` was given just now (a build published it, or it passed its
        # check) is taken as recorded by the next computation, not read and checked again:
        # a rebuild keys each stage after it by its input's list of 1,001 shards.
        recorded, self._recorded = self._recorded, set()

        def one(fp: str) -> dict[str, Any] | None:
            if fp not in seen:
                if fp not in recorded:
                    self.forget(fp)
                seen[fp] = self.stored(fp)
                self._fresh.add(fp)
            return seen[fp]

        return one

    def is_built(self, name: str) -> bool:
        """True when the store holds the stage's current fingerprint; then the entry is
        touched and the ref and lock entry brought up to date. Always looks at the store
        (a long-lived process may ask again after the entry was removed); what it read is
        kept for the doit title line that follows."""
        m = self._manifests()[name]
        if m.pending:  # an input is not built: its key is not known yet (inputid.py)
            return False
        fp = m.fingerprint
        if fp in self._fresh:  # read just now, for its consumers' keys
            self._fresh.discard(fp)
        else:
            self.forget(fp)
        stored = self.stored(fp)
        if stored is None:
            return False
        self.place.store.touch(fp)
        self._record(name, stored)
        return True

    def record(self, name: str, stored: Mapping[str, Any] | None = None) -> None:
        """Point refs/<name> and the lock entry at the stage's current result, as the store
        has it now (a build just published it, or a pull just fetched it). `stored` is that
        entry's manifest when the caller has it at hand, just published or found intact:
        it is then not read and checked again (a check of a sharded entry stats every
        shard's files; the entry was written from such stats, or passed the check, a moment
        ago, and recording decides nothing: the next up-to-date check checks it in full)."""
        fp = self._manifests()[name].fingerprint
        self.forget(fp)
        self._recorded.discard(fp)
        if stored is not None and stored.get("fingerprint") == fp:
            self._stored[fp] = dict(stored)
            self._recorded.add(fp)
        doc = self.stored(fp)
        if doc is not None:
            self._record(name, doc)

    def _record(self, name: str, stored: dict[str, Any]) -> None:
        place = self.place
        manifests = self._manifests()
        m = manifests[name]
        place.store.set_ref(name, m.fingerprint)
        if not self._registered:
            place.store.register_root(place.lock_path)
            self._registered = True
        spec = place.stages[name]
        e = lockfile.entry(
            m.doc,
            m.fingerprint,
            {i: manifests[i].fingerprint for i in spec.inputs},
            stored,
            [f.path for f in m.dirty],
            m.hub,
        )
        was = self._lock_view().get(name)
        if was == e or _same_result_elsewhere(was, e, m.doc):
            return
        # Merged with the file as it is now, under its file lock: nothing another process
        # wrote since we read it is lost.
        lockfile.update(
            place.lock_path,
            os.path.join(place.store.root, "locks"),
            {name: e},
            set(place.stages),
        )

    def _lock_view(self) -> dict[str, Any]:
        """The lock's stages as this process last read them, read again if the file was
        replaced or changed since (a long-lived process; `git checkout`; our own write, which
        merged what others wrote). A lock with merge conflict markers is never read as empty:
        it is rewritten (`relock`), with a warning saying so, and read again."""
        try:
            return lockfile.read_cached(self.place.lock_path)
        except lockfile.ConflictedLockError:
            resolve_conflict(self.place, self._manifests)
            return lockfile.read_cached(self.place.lock_path)


def _same_result_elsewhere(was: Any, e: Mapping[str, Any], doc: Mapping[str, Any]) -> bool:
    """Whether the lock's entry `was` records this stage's result as built on a machine with
    other package versions (Python, datasets, ...: nothing else differs, its inputs' results
    the same) giving the same content hash: it is then kept, so that a team on two versions
    does not rewrite the lock back and forth (`verify` accepts either side's key while the
    store holds that side's result with the recorded content hash)."""
    from hfbuild.keys.diff import versions_only

    return (
        isinstance(was, dict)
        and not e.get("dirty")
        and not was.get("dirty")
        and isinstance(e.get("content_hash"), str)
        and was.get("content_hash") == e.get("content_hash")
        and was.get("fingerprint") != e.get("fingerprint")
        and versions_only(was.get("manifest") or {}, doc) is not None
    )
