"""Pipelines: named stages forming a DAG, and their fingerprints.

Owns: the `Pipeline` (its stages defined and looked up as `stages.StageTable` does), computing
every stage's manifest from one git snapshot, answering whether the store holds a stage's current
result. Keeping the stage's ref and hfbuild.lock entry in step with it is `ledger`'s job,
building is `build`'s, the doit task dicts are `tasks`'. `datasets` is imported only when a
result is loaded.

Must never: decide freshness from anything but the store holding the current fingerprint, or
build anything.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from hfbuild.core.errors import DamagedEntryError, NotBuiltError
from hfbuild.keys.absentdata import LockedData
from hfbuild.keys.fullkey import resolve
from hfbuild.keys.inputid import first, from_lock
from hfbuild.keys.manifests import Manifests, rekey_pending, stage_manifest
from hfbuild.keys.manifests import compute as compute_manifests
from hfbuild.keys.place import Place
from hfbuild.pipeline.ledger import Ledger
from hfbuild.pipeline.record import NeedsImport, Session
from hfbuild.pipeline.stages import StageTable
from hfbuild.source import caches, refs
from hfbuild.source.datafiles import StatCache
from hfbuild.source.gitrepo import Mode, find_root
from hfbuild.source.gitstate import Snapshot
from hfbuild.store.lockfile import LOCK_NAME, Pin, pins
from hfbuild.store.remote import Remote
from hfbuild.store.remotereach import remote_disabled, remote_url
from hfbuild.store.store import Store


def _caller_file(depth: int = 2) -> str | None:
    frame = sys._getframe(depth)
    f = frame.f_globals.get("__file__")
    return str(f) if f else None


class Pipeline(StageTable):
    """A set of named stages. The store is `store`, else $HFBUILD_STORE, else
    `<git root>/.hfbuild`, where the git root is that of the file creating the pipeline. The
    lock file is `<git root>/<lock>` (hfbuild.lock); a remote cache is `remote` (an fsspec
    URL; False for none), else $HFBUILD_REMOTE, else `[tool.hfbuild] remote` in pyproject.toml."""

    def __init__(
        self,
        store: str | os.PathLike[str] | None = None,
        *,
        root: str | os.PathLike[str] | None = None,
        name: str = "preprocess",
        remote: str | Literal[False] | None = None,
        lock: str = LOCK_NAME,
    ) -> None:
        if root is None:
            origin = _caller_file() or os.getcwd()
            root = find_root(origin) or (
                os.path.dirname(os.path.abspath(origin)) if os.path.isfile(origin) else origin
            )
        self.root = os.path.realpath(os.fspath(root))
        store = store or os.environ.get("HFBUILD_STORE") or os.path.join(self.root, ".hfbuild")
        self.store = Store(store if os.path.isabs(store) else os.path.join(self.root, store))
        self.name = name
        StageTable.__init__(self)
        self._cache: Manifests | None = None
        self._snap: Snapshot | None = None  # the memoized manifests' (for `rekey`)
        self.stat_cache = StatCache(os.path.join(self.store.root, "statcache.json"))
        # One lock file per pipeline: two pipelines in one repository need two names.
        self.lock_path = os.path.join(self.root, lock)
        self.lock_name = os.path.relpath(self.lock_path, self.root).replace(os.sep, "/")
        self._remote_arg = remote
        # What the ledger and the builders receive instead of the pipeline.
        self.place = Place(
            self.root,
            self.store,
            self.stat_cache,
            self.lock_path,
            self.lock_name,
            self.remote,
            self.stages,
        )
        self.ledger = Ledger(self.place, self.manifests)
        # The no-import record (record.py), for a pipeline a dodo file defines, once doit or
        # a command works on it; `_recorded_only`: made from the record, without dodo.py.
        self.origin = _caller_file()
        self._record: Session | None = None
        self._recorded_only = False

    def remote(self) -> Remote | None:
        """The configured remote cache, unless HFBUILD_NO_REMOTE=1 or `remote=False` opts out."""
        if remote_disabled() or self._remote_arg is False:
            return None
        url = remote_url(self.root, self._remote_arg or None)
        return Remote(url, self.pins, self.lock_name) if url else None

    def pins(self) -> dict[str, Pin]:
        """What the committed lock (HEAD's, never the work tree's: a build rewrites that one,
        from what it pulled too) records per store key: the content hashes a pull must
        match. {} outside git, before the first commit, or when HEAD's lock cannot be read."""
        return pins(self.ledger.committed())

    def over(self, store: str | os.PathLike[str]) -> Pipeline:
        """The same stages over another store, with no remote (`verify --rebuild`'s
        scratch twin: whatever it builds it computes itself)."""
        twin = type(self)(store, root=self.root, name=self.name, remote=False, lock=self.lock_name)
        for spec in self.specs:
            twin.define(spec)
        return twin

    def manifests(
        self,
        *,
        fresh: bool = False,
        mode: Mode = "worktree",
        absent: LockedData | None = None,
        lock: Mapping[str, Any] | None = None,
    ) -> Manifests:
        """Every stage's manifest, computed from one snapshot of the work tree (or, with
        `mode="index"`, of what is staged). Memoized until `fresh=True` is asked for. A stage
        that cannot be fingerprinted raises its error when looked up; the others are fine.
        With `absent`, a load stage whose data files are missing takes its data part from it.
        A stage's key holds its inputs' results (`inputid`): as the store has them, else as
        the committed lock records them (given a `lock`'s stages, as that lock does first);
        a stage whose input's result none of them knows is pending (`Manifest.pending`)."""
        if absent is not None or lock is not None:
            fresh = True
        cache = self._cache
        if mode == "worktree" and cache is not None and not fresh and len(cache) == len(self):
            return cache  # (a stage defined since is not in it: computed again)
        rec = self._record
        if rec is not None:
            got = rec.answer(mode)
            if got is not None:
                if mode == "worktree" and absent is None:
                    self._cache, self._snap = got, None
                return got
            if self._recorded_only:
                raise NeedsImport(mode)
            rec.begin(mode)
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
        """Key the memoized manifests' pending stages (and those built from them) again by
        their inputs' results as the store has them now, and stage `built` by what its
        builds recorded reading (`manifests.rekey_pending`): after a build, without a new
        snapshot. A new snapshot lists the project (argpaths, git), which a concurrent
        build's watch would take for a read of its own (watch.py)."""
        old, snap = self._cache, self._snap
        again = {built} if built is not None else set()
        if old is None or not (again or any(m.pending for m in old.ok.values())):
            return
        if snap is None:  # answered from the no-import record: no snapshot at hand
            self.manifests(fresh=True)
            return
        lookup = first(self.ledger.lookup(), from_lock(self.ledger.committed))
        self._cache = rekey_pending(
            self.stages.values(),
            old,
            lookup,
            lambda spec, m: resolve(
                m, spec.name, self.store, self.lock_path, snap, self.stat_cache
            ),
            again,
        )

    def _compute(
        self, mode: Mode, absent: LockedData | None, lock: Mapping[str, Any] | None = None
    ) -> Manifests:
        snap = Snapshot(self.root, mode, caches.for_store(self.store))
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
            self.stages.values(),
            lambda spec, done: resolve(
                stage_manifest(spec, snap, done, self.stat_cache, absent, lookup=lookup),
                spec.name,
                self.store,
                self.lock_path,
                snap,
                self.stat_cache,
            ),
        )
        self.stat_cache.save()
        caches.for_store(self.store).save()
        return out

    # -- the no-import record -------------------------------------------------------------------

    def use_record(self, session: Session) -> bool:
        """Answer from `session`'s record when its facts hold (and leave one when they do not),
        if this pipeline is the one its dodo file defines and uses the default store."""
        if self.origin is None or os.path.realpath(self.origin) != session.dodo:
            return False
        if os.path.realpath(self.store.root) != os.path.realpath(session.store.root):
            return False
        session.shape = self.shape
        self._record = session
        return True

    def leave_record(self) -> bool:
        """Before anything is built or pulled: answers come from the code from now on.
        True when they came from the record until now."""
        if self._record is None:
            return False
        if self._recorded_only:
            raise NeedsImport("build")
        self._record.drop()
        self._record = None
        self._cache = None
        return True

    @property
    def recording(self) -> bool:
        """Whether answers may come from a no-import record (`use_record`)."""
        return self._record is not None

    def shape(self) -> dict[str, Any]:
        """What the commands need of the pipeline besides its manifests (record.py)."""
        return {
            "root": self.root,
            "store": self.store.root,
            "lock": self.lock_name,
            "name": self.name,
            "remote": self._remote_arg,
            "stages": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "inputs": list(s.inputs),
                    "ref": s.ref,
                    "qualname": refs.qualname(s),
                    "builder": s.options.get("builder") if s.kind == "load" else None,
                    # as given, for `hfbuild graph`'s "where it came from" (None: not a load)
                    "data_files": _as_json(s.options.get("data_files"))
                    if s.kind == "load"
                    else None,
                    "doc": s.doc,
                }
                for s in self.stages.values()
            ],
        }

    def use_record_only(self, session: Session) -> None:
        """Answer from `session`'s record alone: the pipeline was made from it, without
        dodo.py (`project.recorded_pipeline`); its stages have no function, so anything
        needing one raises `NeedsImport` (the command is run on dodo.py's then)."""
        self.origin = session.dodo
        self._record = session
        self._recorded_only = True

    def is_built(self, name: str) -> bool:
        """True when the store holds the stage's current fingerprint (doit's uptodate). Then
        the lock and the stage's ref are brought up to date too, so a run that builds nothing
        still leaves hfbuild.lock describing exactly what the store serves."""
        return self.ledger.is_built(name)

    def record(self, name: str, stored: Mapping[str, Any] | None = None) -> None:
        """Point refs/<name> and the hfbuild.lock entry at the stage's current result
        (`stored`: its manifest, when the caller just published or checked it); its key is
        taken again first (`rekey`: a build that read more than its key assumed published
        under another one)."""
        fp = self.manifests()[name].fingerprint
        if stored is not None:
            moved = stored.get("fingerprint") != fp
        else:
            moved = not self.ledger.present(fp)
        if moved:
            self.rekey(name)
        self.ledger.record(name, stored)

    # -- results and building -----------------------------------------------------------------

    def result(self, name: str) -> Any:
        """The built result, memory-mapped from the store; `NotBuiltError` when the store
        does not hold it, `DamagedEntryError` (a `NotBuiltError`) when its entry is damaged."""
        m = self.manifests(fresh=True)[name]
        if m.pending:
            raise NotBuiltError(
                f"stage {name!r} is not built for the current code and data: its input "
                f"{m.pending[0]!r} is not, and its key holds its input's result. Build it with "
                f"`doit run {self.name}:{name}`."
            )
        fp = m.fingerprint
        if not self.store.has(fp):
            why = self.store.check(fp)  # the damage `has` found (remembered: not hashed again)
            if why is not None:
                raise DamagedEntryError(
                    f"stage {name!r}: the stored result {fp} is damaged ({why}), so it is not "
                    f"served. Build it with `doit run {self.name}:{name}`: the damaged entry "
                    f"is moved aside and the stage built again."
                )
            raise NotBuiltError(
                f"stage {name!r} is not built for the current code and data (fingerprint "
                f"{fp}). Build it with `doit run {self.name}:{name}`."
            )
        return self.store.load(fp)


def _as_json(x: Any) -> Any:
    """`data_files` as JSON reads it back (a tuple a list, a path its string), so a record's
    shape compares equal to the one it was written from."""
    if isinstance(x, Mapping):
        return {str(k): _as_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_as_json(v) for v in x]
    return x if x is None or isinstance(x, str) else str(x)
