"""Keeping each stage's ref and hfbuild.lock entry in step with what the store serves.

Owns: one process's view of hfbuild.lock (read at most once, then kept in step with what this
process writes) and of the stored manifests it looked at (each read and checked once), so that
a no-op run over N stages does O(N) work, not N full reads and parses of the lock. Every
change is written at once, merged under the lock file's file lock with what is on disk then
(`lockfile.update`), so concurrent runs and a crash mid-run lose no entry.

Must never: decide freshness from anything but an intact store entry under the current
fingerprint, trust the lock's content for anything but "nothing to write", or import datasets.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from hfbuild import lockfile

if TYPE_CHECKING:
    from hfbuild.pipeline import Pipeline


class Ledger:
    """The lock and ref bookkeeping of one pipeline, for one process."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self._lock: dict[str, Any] | None = None  # hfbuild.lock's stages, read once
        self._stored: dict[str, dict[str, Any] | None] = {}  # fingerprint -> intact manifest
        self._registered = False

    def stored(self, fp: str) -> dict[str, Any] | None:
        """The manifest of the intact store entry `fp` (None: absent or damaged), read and
        checked once per process; `forget` makes the next call look again."""
        if fp not in self._stored:
            self._stored[fp] = self.pipe.store.intact_manifest(fp)
        return self._stored[fp]

    def forget(self, fp: str) -> None:
        self._stored.pop(fp, None)

    def is_built(self, name: str) -> bool:
        """True when the store holds the stage's current fingerprint; then the entry is
        touched and the ref and lock entry brought up to date."""
        fp = self.pipe.manifests()[name].fingerprint
        stored = self.stored(fp)
        if stored is None:
            return False
        self.pipe.store.touch(fp)
        self._record(name, stored)
        return True

    def record(self, name: str) -> None:
        """Point refs/<name> and the lock entry at the stage's current result, as the store
        has it now (a build just published it, or a pull just fetched it)."""
        fp = self.pipe.manifests()[name].fingerprint
        self.forget(fp)
        stored = self.stored(fp)
        if stored is not None:
            self._record(name, stored)

    def _record(self, name: str, stored: dict[str, Any]) -> None:
        pipe = self.pipe
        manifests = pipe.manifests()
        m = manifests[name]
        pipe.store.set_ref(name, m.fingerprint)
        if not self._registered:
            pipe.store.register_root(pipe.lock_path)
            self._registered = True
        spec = pipe[name].spec
        e = lockfile.entry(
            m.doc,
            m.fingerprint,
            {i: manifests[i].fingerprint for i in spec.inputs},
            stored,
            [f.path for f in m.dirty],
        )
        if self._lock is None:
            self._lock = lockfile.read(pipe.lock_path)
        if self._lock.get(name) == e:
            return
        # Merged with the file as it is now, under its file lock: nothing another process
        # wrote since we read it is lost.
        lockfile.update(
            pipe.lock_path,
            os.path.join(pipe.store.root, "locks"),
            {name: e},
            {s.name for s in pipe.specs},
        )
        self._lock[name] = e
