"""Pipelines: named stages forming a DAG, and their fingerprints.

Owns: the `Pipeline` and `Stage` API (defining stages, looking them up), computing every
stage's manifest from one git snapshot, answering whether the store holds a stage's current
result. Keeping the stage's ref and hfbuild.lock entry in step with it is `ledger`'s job,
building is `build`'s, the doit task dicts are `tasks`'. `datasets` is imported only when a
result is loaded.

Must never: decide freshness from anything but the store holding the current fingerprint, or
build anything.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

from hfbuild import caches, lockfile, record, refs
from hfbuild.absentdata import LockedData
from hfbuild.datafiles import StatCache
from hfbuild.errors import DamagedEntryError, NotBuiltError, StageError
from hfbuild.fingerprint import Manifest
from hfbuild.fullkey import resolve
from hfbuild.gitrepo import Mode, find_root, head_text
from hfbuild.gitstate import Snapshot
from hfbuild.hub import repo_pattern as hub_patterns
from hfbuild.inputid import first, from_lock
from hfbuild.ledger import Ledger
from hfbuild.lockfile import LOCK_NAME, Pin, pins
from hfbuild.manifests import Manifests, stage_manifest
from hfbuild.manifests import compute as compute_manifests
from hfbuild.manifests import rekey as rekey_manifest
from hfbuild.record import NeedsImport, Session
from hfbuild.remote import Remote, remote_disabled, remote_url
from hfbuild.spec import LOAD_BUILDERS, StageSpec
from hfbuild.store import Store

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# datasets' packaged builder per data file extension (`_EXTENSION_TO_MODULE`, those hfbuild
# loads).
_EXTENSIONS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".arrow": "arrow",
}


def _builder_of(data_files: Any) -> str | None:
    """The one builder every pattern's extension names, or None."""
    pats = (
        [p for v in data_files.values() for p in ([v] if isinstance(v, str) else v)]
        if isinstance(data_files, Mapping)
        else [data_files]
        if isinstance(data_files, str)
        else list(data_files)
    )
    found = {_EXTENSIONS.get(os.path.splitext(str(p))[1].lower()) for p in pats}
    return found.pop() if len(found) == 1 else None


class Stage:
    """A handle on one stage of a pipeline; pass it as another stage's input."""

    def __init__(self, pipeline: Pipeline, name: str) -> None:
        self.pipeline = pipeline
        self.name = name

    @property
    def spec(self) -> StageSpec:
        return self.pipeline._specs[self.name]

    @property
    def fingerprint(self) -> str:
        """The current fingerprint, computed from the work tree; nothing is built."""
        return self.pipeline.manifests(fresh=True)[self.name].fingerprint

    @property
    def manifest(self) -> Manifest:
        return self.pipeline.manifests(fresh=True)[self.name]

    def result(self) -> Any:
        return self.pipeline.result(self.name)

    def __repr__(self) -> str:
        return f"<hfbuild stage {self.name!r} ({self.spec.kind})>"


def _fn_or_ref(fn: Callable[..., Any] | str, stage: str) -> tuple[Any, str | None]:
    """(function, None) for a function, (None, reference) for a `module:qualname` string."""
    if isinstance(fn, str):
        return None, refs.check(fn, stage)
    return fn, None


def _caller_file(depth: int = 2) -> str | None:
    frame = sys._getframe(depth)
    f = frame.f_globals.get("__file__")
    return str(f) if f else None


class Pipeline:
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
        self._specs: dict[str, StageSpec] = {}
        self._cache: Manifests | None = None
        self._snap: Snapshot | None = None  # the memoized manifests' (for `rekey`)
        self.stat_cache = StatCache(os.path.join(self.store.root, "statcache.json"))
        # One lock file per pipeline: two pipelines in one repository need two names.
        self.lock_path = os.path.join(self.root, lock)
        self.lock_name = os.path.relpath(self.lock_path, self.root).replace(os.sep, "/")
        self._remote_arg = remote
        self.ledger = Ledger(self)
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

    def _head_stages(self) -> dict[str, Any]:
        """The committed lock's (HEAD's) stages; {} without one or when it cannot be read.
        Outside git nothing is committed and files are identified by content: the lock on
        disk, which a copy of the project carries, stands for it."""
        text = head_text(self.lock_path)
        if text is None and find_root(self.root) is None:
            try:
                with open(self.lock_path, encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                text = None
        try:
            return lockfile.loads(text) if text else {}
        except lockfile.LockError:
            return {}

    def pins(self) -> dict[str, Pin]:
        """What the committed lock (HEAD's, never the work tree's: a build rewrites that one,
        from what it pulled too) records per store key: the content hashes a pull must
        match. {} outside git, before the first commit, or when HEAD's lock cannot be read."""
        text = head_text(self.lock_path)
        try:
            return pins(lockfile.loads(text)) if text else {}
        except lockfile.LockError:
            return {}

    # -- defining stages --------------------------------------------------------------------

    def _add(self, spec: StageSpec) -> Stage:
        if not isinstance(spec.name, str) or not _NAME.match(spec.name):
            raise StageError(
                f"stage name {spec.name!r} is not valid: use letters, digits, '_' and '-', "
                f"starting with a letter or '_' (like a Python identifier)."
            )
        if spec.name in self._specs:
            raise StageError(
                f"stage {spec.name!r} is defined twice in this pipeline: give each stage its "
                f"own name."
            )
        for dep in spec.inputs:
            if dep not in self._specs:
                raise StageError(
                    f"stage {spec.name!r}: input {dep!r} is not a stage defined above it"
                )
        if spec.fn is not None and not callable(spec.fn):
            raise StageError(f"stage {spec.name!r}: {spec.fn!r} is not callable")
        self._specs[spec.name] = spec
        self._cache = None
        return Stage(self, spec.name)

    def _input(self, x: Stage | str, stage: str) -> str:
        if isinstance(x, Stage):
            if x.pipeline is not self:
                raise StageError(f"stage {stage!r}: input {x.name!r} belongs to another pipeline")
            return x.name
        if isinstance(x, str):
            return x
        raise StageError(f"stage {stage!r}: an input must be a stage or a stage name, not {x!r}")

    def load(
        self,
        name: str,
        builder: str,
        /,
        *,
        doc: str | None = None,
        revision: str | None = None,
        **load_kwargs: Any,
    ) -> Stage:
        """A stage loading data files with a `datasets` packaged builder (parquet, csv, json,
        text, arrow). `data_files` is a path or glob, a list of them, or a split dict; relative
        paths are relative to the git root; `hf://datasets/org/name@revision/...` patterns
        name files of a dataset on the Hugging Face Hub (hub.py). `builder` may instead be a
        Hub dataset, `"org/name"`, with `revision=` (default "main") and `data_files`
        relative to the repository: the builder is then the one its patterns' extension
        names (or `builder=`). The stage's name and the builder are positional, so `name=`
        is datasets' configuration name."""
        if builder not in LOAD_BUILDERS and builder.count("/") == 1:
            return self._hub_load(name, builder, revision or "main", doc, load_kwargs)
        if revision is not None:
            raise StageError(
                f"load stage {name!r}: revision= is for a Hub dataset (`pipe.load(name, "
                f"'org/name', revision=...)`); in hf:// paths write it as org/name@revision."
            )
        if builder not in LOAD_BUILDERS:
            raise StageError(
                f"load stage {name!r}: builder {builder!r} is not one of "
                f"{', '.join(sorted(LOAD_BUILDERS))}. Use an apply stage for anything else."
            )
        if "data_files" not in load_kwargs:
            raise StageError(f"load stage {name!r}: data_files= is required")
        return self._add(
            StageSpec(name, "load", options={"builder": builder, **load_kwargs}, doc=doc)
        )

    def _hub_load(
        self, name: str, repo: str, revision: str, doc: str | None, kwargs: dict[str, Any]
    ) -> Stage:
        """`pipe.load(name, "org/name", ...)`: a load of `hf://` patterns in that dataset."""
        if kwargs.get("name") is not None:
            raise StageError(
                f"load stage {name!r}: name= (a configuration of the dataset card) is not "
                f"supported yet: pass that configuration's data_files= (see the dataset's "
                f"README.md `configs:`)."
            )
        kwargs.pop("name", None)
        if "data_files" not in kwargs:
            raise StageError(
                f"load stage {name!r}: data_files= is required for a Hub dataset (patterns "
                f"relative to the repository, e.g. 'data/*.parquet')."
            )
        data_files = hub_patterns(repo, revision, kwargs.pop("data_files"))
        builder = kwargs.pop("builder", None) or _builder_of(data_files)
        if builder is None:
            raise StageError(
                f"load stage {name!r}: no builder follows from the data_files' extensions; "
                f"pass builder= (one of {', '.join(sorted(LOAD_BUILDERS))})."
            )
        return self.load(name, builder, doc=doc, data_files=data_files, **kwargs)

    def map(
        self,
        name: str,
        input: Stage | str,
        fn: Callable[..., Any] | str,
        fn_kwargs: Mapping[str, Any] | None = None,
        *,
        file_deps: Sequence[str] = (),
        doc: str | None = None,
        **options: Any,
    ) -> Stage:
        """`Dataset.map(fn, fn_kwargs=..., **options)` as a stage. `fn` is the function, or a
        `"module:qualname"` reference to it, imported only when the stage is fingerprinted
        afresh or built (so an up-to-date check can skip the module's import)."""
        return self._transform("map", name, input, fn, fn_kwargs, file_deps, doc, options)

    def filter(
        self,
        name: str,
        input: Stage | str,
        fn: Callable[..., Any] | str,
        fn_kwargs: Mapping[str, Any] | None = None,
        *,
        file_deps: Sequence[str] = (),
        doc: str | None = None,
        **options: Any,
    ) -> Stage:
        """`Dataset.filter(fn, fn_kwargs=..., **options)` as a stage; `fn` as for `map`."""
        return self._transform("filter", name, input, fn, fn_kwargs, file_deps, doc, options)

    def apply(
        self,
        name: str,
        inputs: Stage | str | Sequence[Stage | str],
        fn: Callable[..., Any] | str,
        fn_kwargs: Mapping[str, Any] | None = None,
        *,
        file_deps: Sequence[str] = (),
        doc: str | None = None,
    ) -> Stage:
        """`fn(*input_datasets, **fn_kwargs) -> Dataset | DatasetDict` as a stage: splits,
        shuffles, concatenations, joins, anything. `fn` may be a `"module:qualname"` reference,
        as for `map`."""
        many = [inputs] if isinstance(inputs, (Stage, str)) else list(inputs)
        deps = tuple(self._input(x, name) for x in many)
        fn_, ref = _fn_or_ref(fn, name)
        return self._add(
            StageSpec(
                name, "apply", deps, fn_, dict(fn_kwargs or {}), {}, tuple(file_deps), doc, ref
            )
        )

    def _transform(
        self,
        kind: str,
        name: str,
        input: Stage | str,
        fn: Callable[..., Any] | str,
        fn_kwargs: Mapping[str, Any] | None,
        file_deps: Sequence[str],
        doc: str | None,
        options: dict[str, Any],
    ) -> Stage:
        for bad in ("new_fingerprint", "cache_file_name", "function", "fn_kwargs"):
            if bad in options:
                raise StageError(f"{kind} stage {name!r}: hfbuild sets {bad} itself; drop it.")
        fn_, ref = _fn_or_ref(fn, name)
        spec = StageSpec(
            name,
            kind,
            (self._input(input, name),),
            fn_,
            dict(fn_kwargs or {}),
            options,
            tuple(file_deps),
            doc,
            ref,
        )
        return self._add(spec)

    # -- looking at stages --------------------------------------------------------------------

    def __getitem__(self, name: str) -> Stage:
        if name not in self._specs:
            known = ", ".join(self._specs) or "none"
            raise StageError(f"no stage named {name!r} (stages: {known})")
        return Stage(self, name)

    def __iter__(self) -> Iterator[Stage]:
        return (Stage(self, n) for n in self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def specs(self) -> list[StageSpec]:
        return list(self._specs.values())

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
        if mode == "worktree" and self._cache is not None and not fresh:
            return self._cache
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

    def rekey(self) -> None:
        """Key the memoized manifests' pending stages (and those built from them) again by
        their inputs' results as the store has them now (`manifests.rekey`): after a build,
        without a new snapshot. A new snapshot lists the project (argpaths, git), which a
        concurrent build's watch would take for a read of its own (watch.py)."""
        old, snap = self._cache, self._snap
        if old is None or not any(m.pending for m in old.ok.values()):
            return
        if snap is None:  # answered from the no-import record: no snapshot at hand
            self.manifests(fresh=True)
            return
        lookup = first(self.ledger.lookup(), from_lock(self._head_stages))
        ok: dict[str, Manifest] = {}
        moved: set[str] = set()
        for spec in self._specs.values():
            m = old.ok.get(spec.name)
            if m is None:
                continue
            if m.pending or any(i in moved for i in spec.inputs):
                again = rekey_manifest(spec, m, ok, lookup)
                m = resolve(again, spec.name, self.store, self.lock_path, snap, self.stat_cache)
                moved.add(spec.name)
            ok[spec.name] = m
        self._cache = Manifests(list(old), ok, old.failed)

    def _compute(
        self, mode: Mode, absent: LockedData | None, lock: Mapping[str, Any] | None = None
    ) -> Manifests:
        snap = Snapshot(self.root, mode, caches.for_store(self.store))
        if mode == "worktree" and absent is None and lock is None:
            self._snap = snap
        # An input's result from the store, else from the committed lock (what a clone that
        # has pulled only some stages, or CI, knows); given a `lock`, from it first.
        lookup = first(self.ledger.lookup(), from_lock(self._head_stages))
        if lock is not None:
            lookup = first(from_lock(lambda: lock), lookup)
        # The key includes what the stage's builds read at run time (fullkey.py), so that the
        # stages after it take that key as their input.
        out = compute_manifests(
            self._specs.values(),
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

    def _unimported_refs(self) -> bool:
        """Whether a stage names its function by a reference whose module is not imported."""
        return any(
            s.ref is not None and s.ref.partition(":")[0] not in sys.modules
            for s in self._specs.values()
        )

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
                for s in self._specs.values()
            ],
        }

    @classmethod
    def from_record(cls, session: Session, shape: dict[str, Any]) -> Pipeline:
        """The pipeline a record describes, without dodo.py: its stages have no function, so
        anything needing one raises `NeedsImport` (the command is run on dodo.py's then)."""
        pipe = cls(
            shape["store"],
            root=shape["root"],
            name=shape["name"],
            remote=shape["remote"],
            lock=shape["lock"],
        )
        for s in shape["stages"]:
            options = {"builder": s["builder"]} if s["kind"] == "load" else {}
            if s.get("data_files") is not None:  # absent from older entries
                options["data_files"] = s["data_files"]
            pipe._specs[s["name"]] = StageSpec(
                s["name"], s["kind"], tuple(s["inputs"]), None, {}, options, (), s["doc"], s["ref"]
            )
        pipe.origin = session.dodo
        pipe._record = session
        pipe._recorded_only = True
        return pipe

    def is_built(self, name: str) -> bool:
        """True when the store holds the stage's current fingerprint (doit's uptodate). Then
        the lock and the stage's ref are brought up to date too, so a run that builds nothing
        still leaves hfbuild.lock describing exactly what the store serves."""
        return self.ledger.is_built(name)

    def record(self, name: str, stored: Mapping[str, Any] | None = None) -> None:
        """Point refs/<name> and the hfbuild.lock entry at the stage's current result
        (`stored`: its manifest, when the caller just published or checked it)."""
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

    def tasks(self, basename: str | None = None) -> Iterator[dict[str, Any]]:
        """doit task dicts, one per stage; `yield from pipe.tasks()` in `task_<basename>`."""
        from hfbuild.tasks import pipeline_tasks

        if basename is None:
            caller = sys._getframe(1).f_code.co_name
            basename = caller[5:] if caller.startswith("task_") else self.name
        self.name = basename
        if self._record is None and self.origin is not None and not record.cli_loading:
            # doit imported dodo.py: the record saves only the imports of modules named by
            # reference and not imported yet. Without any, the code cache's fingerprints cost
            # about what the record's check does (the 20k-file repository: the check +40 ms).
            session = record.session(self.origin, "doit") if self._unimported_refs() else None
            if session is not None:
                self.use_record(session)
        return pipeline_tasks(self, basename)


def _as_json(x: Any) -> Any:
    """`data_files` as JSON reads it back (a tuple a list, a path its string), so a record's
    shape compares equal to the one it was written from."""
    if isinstance(x, Mapping):
        return {str(k): _as_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_as_json(v) for v in x]
    return x if x is None or isinstance(x, str) else str(x)
