"""Where a pipeline's manifests come from: one snapshot of the code, or the no-import record.

Owns: `Keying`, one per `Pipeline`: every stage's manifest computed from one git snapshot (its
inputs' results from the store, else the committed lock; a given lock first), memoized for the
work tree until a fresh computation is asked for; answering from a no-import record session
(`record.py`) while its facts hold, and leaving one before anything is built or pulled; keying
the memoized manifests again after a build on the same snapshot (`rekey`). It is given the
pipeline's `Place` and `Ledger`, never the pipeline.

Must never: decide freshness, build, answer from a record after it was left, or take a new
snapshot to key stages again while the memoized one is at hand.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from hfbuild.keys.absentdata import LockedData
from hfbuild.keys.fullkey import resolve
from hfbuild.keys.inputid import first, from_lock
from hfbuild.keys.manifests import Manifests, rekey_pending, stage_manifest
from hfbuild.keys.manifests import compute as compute_manifests
from hfbuild.keys.place import Place
from hfbuild.pipeline.ledger import Ledger
from hfbuild.pipeline.record import NeedsImport, Session
from hfbuild.pipeline.witness import Witness
from hfbuild.source import caches
from hfbuild.source.gitrepo import Mode
from hfbuild.source.gitstate import Snapshot


class Keying:
    """A pipeline's manifests (`Pipeline.manifests`): computed from a snapshot, memoized, or
    taken from the record session it answers from (`record`, None when it answers from code)."""

    def __init__(self, place: Place, ledger: Ledger) -> None:
        self.place = place
        self.ledger = ledger
        self._cache: Manifests | None = None
        self._snap: Snapshot | None = None  # the memoized manifests' (for `rekey`)
        # The no-import record this pipeline answers from; `only`: made from the record,
        # without dodo.py, so an answer it cannot give raises `NeedsImport`.
        self.record: Session | None = None
        self.only = False
        self.witness: Witness | None = None  # a building process's side check (witness.py)

    def manifests(
        self,
        *,
        fresh: bool = False,
        mode: Mode = "worktree",
        absent: LockedData | None = None,
        lock: Mapping[str, Any] | None = None,
    ) -> Manifests:
        """What `Pipeline.manifests` says."""
        if absent is not None or lock is not None:
            fresh = True
        cache = self._cache
        if (
            mode == "worktree"
            and cache is not None
            and not fresh
            and len(cache) == len(self.place.stages)
        ):
            return cache  # (a stage defined since is not in it: computed again)
        rec = self.record
        if rec is not None:
            got = rec.answer(mode)
            if got is not None:
                if mode == "worktree" and absent is None:
                    self._cache, self._snap = got, None
                return got
            if self.only:
                raise NeedsImport(mode)
            rec.begin(mode)
            start = rec.start.get(mode)
            if self.witness is not None and mode == "worktree" and start is not None:
                self.witness.launch(start)  # its import beside this process's
            with warnings.catch_warnings(record=True) as caught:
                out = self._compute(mode, absent, lock)
            for w in caught:  # shown as they would have been; a check that warned: no record
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
            rec.computed(mode, out, clean=not caught and not (absent and absent.unchecked))
        else:
            out = self._compute(mode, absent, lock)
        if mode == "worktree" and absent is None and lock is None:
            self._cache = out
        return out

    def rekey(self, built: str | None = None) -> None:
        """What `Pipeline.rekey` says."""
        old, snap = self._cache, self._snap
        again = {built} if built is not None else set()
        if old is None or not (again or any(m.pending for m in old.ok.values())):
            return
        if snap is None:  # answered from the no-import record: no snapshot at hand
            self.manifests(fresh=True)
            return
        place = self.place
        lookup = first(self.ledger.lookup(), from_lock(self.ledger.committed))
        self._cache = rekey_pending(
            place.stages.values(),
            old,
            lookup,
            lambda spec, m: resolve(
                m, spec.name, place.store, place.lock_path, snap, place.stat_cache
            ),
            again,
        )

    def _compute(
        self, mode: Mode, absent: LockedData | None, lock: Mapping[str, Any] | None = None
    ) -> Manifests:
        place = self.place
        snap = Snapshot(place.root, mode, caches.for_store(place.store))
        if mode == "worktree" and absent is None and lock is None:
            self._snap = snap
        # An input's result from the store, else from the committed lock (what a clone that
        # has pulled only some stages, or CI, knows); given a `lock`, from it first.
        lookup = first(self.ledger.lookup(), from_lock(self.ledger.committed))
        if lock is not None:
            lookup = first(from_lock(lambda: lock), lookup)
        # The key includes what the stage's builds read at run time (fullkey.py), so that the
        # stages after it take that key as their input.
        out = compute_manifests(
            place.stages.values(),
            lambda spec, done: resolve(
                stage_manifest(spec, snap, done, place.stat_cache, absent, lookup=lookup),
                spec.name,
                place.store,
                place.lock_path,
                snap,
                place.stat_cache,
            ),
        )
        place.stat_cache.save()
        caches.for_store(place.store).save()
        return out

    def use(self, session: Session, *, only: bool = False) -> None:
        """Answer from `session`'s record from now on (`only`: from nothing else)."""
        self.record, self.only = session, only

    def leave(self) -> bool:
        """Before anything is built or pulled: answers come from the code from now on (the
        memo the record gave is dropped), once a build's side check has ended (`witness.py`:
        none of its reads in a build's window). True when they came from the record until now."""
        if self.witness is not None:
            self.witness.settle()
        if self.record is None:
            return False
        if self.only:
            raise NeedsImport("build")
        self.record.drop()
        self.record = None
        self._cache = None
        return True
