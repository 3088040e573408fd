"""Pipelines: named stages forming a DAG, and their fingerprints.

Owns: the `Pipeline` (its stages defined and looked up as `stages.StageTable` does; its
manifests as `keying.Keying` computes them, or takes them from the no-import record), the
`Place` and `Ledger` it hands the modules below, its shape for the record, its remote, and
answering whether the store holds a stage's current result. Keeping the stage's ref and
hfbuild.lock entry in step with it is `ledger`'s job, building is `build`'s, the doit task dicts
are `tasks`'. `datasets` is imported only when a result is loaded.

Must never: decide freshness from anything but the store holding the current fingerprint, or
build anything.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from hfbuild.core.errors import DamagedEntryError, NotBuiltError
from hfbuild.keys.absentdata import LockedData
from hfbuild.keys.manifests import Manifests
from hfbuild.keys.place import Place
from hfbuild.pipeline import record as records
from hfbuild.pipeline.keying import Keying
from hfbuild.pipeline.ledger import Ledger
from hfbuild.pipeline.record import Session
from hfbuild.pipeline.stages import StageTable
from hfbuild.pipeline.witness import Witness
from hfbuild.source import refs
from hfbuild.source.datafiles import StatCache
from hfbuild.source.gitrepo import Mode, find_root
from hfbuild.store.lockfile import LOCK_NAME, Pin, pins
from hfbuild.store.remotereach import remote_disabled, remote_url
from hfbuild.store.store import Store

if TYPE_CHECKING:
    from hfbuild.store.remote import Remote


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
        # Its manifests, from the code or from the no-import record (record.py), which a
        # pipeline a dodo file defines answers from once doit or a command works on it.
        self.keying = Keying(self.place, self.ledger)
        self.origin = _caller_file()

    def remote_url(self) -> str | None:
        """The configured remote cache's URL, unless HFBUILD_NO_REMOTE=1 or `remote=False`
        opts out (nothing imported: `remote` imports its file system)."""
        if remote_disabled() or self._remote_arg is False:
            return None
        return remote_url(self.root, self._remote_arg or None) or None

    def remote(self) -> Remote | None:
        """The configured remote cache, unless HFBUILD_NO_REMOTE=1 or `remote=False` opts out."""
        url = self.remote_url()
        if not url:
            return None
        # Imported here: a no-op never asks the remote (~3 ms of its imports otherwise).
        from hfbuild.store.remote import Remote

        return Remote(url, self.pins, self.lock_name)

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
        a stage whose input's result none of them knows is pending (`Manifest.pending`).
        (`keying.Keying`, which also answers from the no-import record.)"""
        return self.keying.manifests(fresh=fresh, mode=mode, absent=absent, lock=lock)

    def rekey(self, built: str | None = None) -> None:
        """Key the memoized manifests' pending stages (and those built from them) again by
        their inputs' results as the store has them now, and stage `built` by what its
        builds recorded reading (`manifests.rekey_pending`): after a build, without a new
        snapshot. A new snapshot lists the project (argpaths, git), which a concurrent
        build's watch would take for a read of its own (watch.py)."""
        self.keying.rekey(built)

    # -- the no-import record -------------------------------------------------------------------

    def use_record(self, session: Session) -> bool:
        """Answer from `session`'s record when its facts hold (and leave one when they do not),
        if this pipeline is the one its dodo file defines and uses the default store."""
        if not self._records_to(session):
            return False
        session.shape = self.shape
        self.keying.use(session)
        return True

    def witness_builds(self, who: str) -> None:
        """This process may build (`doit run`, `hfbuild build`): a fresh process imports
        dodo.py beside it (`witness.py`), so that what it builds is recorded confirmed."""
        if self.keying.witness is not None or self.keying.only or self.origin is None:
            return
        own, origin = self.keying.record, self.origin

        def session() -> Session | None:  # made when the side check starts: none on a no-op
            if own is not None:
                return own
            made = records.session(origin, who)  # only for the facts: no answers from it
            if made is None or not self._records_to(made):
                return None
            made.shape = self.shape
            return made

        self.keying.witness = Witness(
            session, own=own is not None, final=lambda fresh: self.manifests(fresh=fresh)
        )

    def _records_to(self, session: Session) -> bool:
        """Whether `session` is the record of this pipeline: its dodo file defines it, in the
        default store."""
        if self.origin is None or os.path.realpath(self.origin) != session.dodo:
            return False
        return os.path.realpath(self.store.root) == os.path.realpath(session.store.root)

    def leave_record(self) -> bool:
        """Before anything is built or pulled: answers come from the code from now on (and
        a build's side check has ended). True when they came from the record until now."""
        return self.keying.leave()

    @property
    def recording(self) -> bool:
        """Whether answers may come from a no-import record (`use_record`)."""
        return self.keying.record is not None

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
        self.keying.use(session, only=True)

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
