"""The no-import record (issue #20): what a full check computed, with every fact it rested on,
so that the next check answers from it without importing dodo.py or a transform module.

A full check (`hfbuild status`, `explain`, `graph`, `verify [--staged]`, `build`, or doit's
up-to-date checks) imports dodo.py and the modules its stages' functions live in, and computes
every stage's manifest. When it computed them without a failed stage or a warning, it leaves an
entry: the manifests as they were, the pipeline's shape (stage names, kinds, inputs, store,
lock, remote, task name) and the facts. The next check in the same context whose facts all
hold takes the manifests from the entry; everything after (the store's answer, the lock, the
refs, what is printed) is the ordinary code's.

The facts (`hfbuild/source/recordfacts.py`) are compared by stat data: every file and
directory of the project, `sys.path`, hfbuild's own files, git's state, the store's key
directories, data outside the project, a digest of the environment.

An entry is used only once *confirmed*: a second full check under the same facts computed the
same manifests. One that computed others is *volatile* (arguments from the clock, from random,
from the network) and every check in that context takes the full path while dodo.py is the same
file. The facts are captured before the check imports anything (doit: before it computes the
manifests) and again at exit; an entry is written only when nothing but the lock changed in
between, and never by a process that built or pulled anything.

`verify --staged` and a check after `git add` derive their manifests from the confirmed
work-tree entry (`staged_as_worktree`) when its facts hold but the index file's stat data and
the index holds what the work tree does; its context is matched with the environment taken
without what git and the pre-commit framework set for a hook (`hook_env_digest`). A full check
that missed walks the tree once: the walk `holds` took is `begin`'s facts.

Owns: the record file (`Store.record_path`, in the default store: the CLI finds it before it
knows anything dodo.py says), its entries per context (who asks, snapshot mode, interpreter,
working directory, `sys.path`, environment digest), the facts, confirmation and volatility.
`HFBUILD_RECORD=0` turns it off.
Must never: answer when one fact differs or the entry is unconfirmed or volatile; hold an
environment value; import a user module or `datasets`; put anything in a key.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import xxhash

from hfbuild.keys.manifests import Manifests
from hfbuild.keys.recordmanifests import (
    dump_manifests,
    load_manifests,
    outside_data,
    staged_as_worktree,
)
from hfbuild.source.gitrepo import find_root, state_paths
from hfbuild.source.recordfacts import (
    Tree,
    capture,
    env_digest,
    for_mode,
    holds,
    hook_env_digest,
    same_facts,
    walk,
)
from hfbuild.store import sharing
from hfbuild.store.paths import default_root
from hfbuild.store.store import Store

FORMAT = 2
KEEP = 8  # contexts kept per dodo file
# CPU seconds from a process's start to its manifests above which a build's side check pays
# (`Session.heavy`): a light pipeline's full check (interpreter, doit or the CLI, hfbuild,
# dodo.py and its modules, keys) costs about 0.3-0.6 s here; an import of pandas and
# scikit-learn alone about 2 s (bench/bench_noimport.py).
HEAVY = 1.0


class NeedsImport(Exception):
    """A pipeline built from the record was asked for what only dodo.py can answer: the
    command runs again on the imported pipeline (never seen by a user)."""


# True while `project.load_pipeline` imports a dodo file: the command's session is attached
# after, so the `pipe.tasks()` it starts is not doit's.
cli_loading = False


def enabled() -> bool:
    return os.environ.get("HFBUILD_RECORD", "").strip() not in {"0", "false", "no"}


def _read_doc(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return {}
    return doc


def _read_cost(path: str) -> float:
    """The CPU seconds the last full check of this dodo file cost (`Session.heavy`)."""
    cost = _read_doc(path).get("cost")
    return float(cost) if isinstance(cost, (int, float)) else 0.0


def _read(path: str) -> list[dict[str, Any]]:
    entries = _read_doc(path).get("entries")
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


class Session:
    """The record of one dodo file for one process: answers per snapshot mode, and the entry
    this process leaves at exit when it took the full path."""

    def __init__(self, dodo: str, who: str) -> None:
        self.dodo = os.path.realpath(dodo)
        directory = os.path.dirname(self.dodo)
        self.root = find_root(directory) or directory
        self.store = Store(default_root(self.root))
        rel = os.path.relpath(self.dodo, self.root).replace(os.sep, "/")
        self.path = self.store.record_path(str(xxhash.xxh3_128_hexdigest(rel.encode())))
        self.who = who
        self.entries = _read(self.path)
        self.base = {
            "format": FORMAT,
            "who": who,
            "dodo": self.dodo,
            "exe": [os.path.realpath(sys.executable), sys.prefix],  # python = python3
            "python": sys.version,
            "cwd": os.getcwd(),
            "path": list(sys.path),
            "env": env_digest(),
        }
        self._answers: dict[str, Manifests | None] = {}
        self.shape: Callable[[], dict[str, Any]] | None = None
        self.start: dict[str, dict[str, Any] | None] = {}
        self.pending: dict[str, dict[str, Any]] = {}
        self.dropped = False
        self._registered = False
        self._walked: dict[str, Tree] = {}  # lock -> the tree `answer` walked, for `begin`
        self.sources: dict[str, dict[str, Any]] = {}  # mode -> the entry that answered it
        self.hook_env = hook_env_digest(self.root)
        self.cost = 0.0  # CPU seconds of this process's full check (`computed`), for `heavy`
        self.seen_cost = _read_cost(self.path)  # the last full check's, any process's

    @property
    def lock(self) -> str:
        """The lock file: the pipeline's once it is known, else the default name."""
        name = self.shape()["lock"] if self.shape is not None else "hfbuild.lock"
        return os.path.join(self.root, name)

    def _lock_of(self, entry: dict[str, Any]) -> str:
        return os.path.join(self.root, (entry.get("pipeline") or {}).get("lock", "hfbuild.lock"))

    def context(self, mode: str) -> dict[str, Any]:
        return {**self.base, "mode": mode}

    def entry(self, mode: str) -> dict[str, Any] | None:
        ctx = self.context(mode)
        return next((e for e in self.entries if e.get("context") == ctx), None)

    def answer(self, mode: str) -> Manifests | None:
        """The recorded manifests of `mode` when its entry is confirmed and every fact holds
        (checked once per process), else None."""
        if self.dropped:
            return None
        if mode not in self._answers:
            e = self.entry(mode)
            got = None
            try:
                if e is not None and self._usable(e):
                    lock = self._lock_of(e)
                    if holds(
                        e["facts"], mode, self.root, self.store, lock, lambda: self._tree(lock)
                    ):
                        got = load_manifests(e["manifests"])
                        self.sources[mode] = e
                if got is None:
                    got = self._derived(mode)
            except (KeyError, TypeError, ValueError, AttributeError):
                got = None  # an entry not of this shape (edited by hand): the full path
            self._answers[mode] = got
        return self._answers[mode]

    def _usable(self, e: dict[str, Any]) -> bool:
        return e.get("state") == "confirmed" and (
            self.shape is None or self.shape() == e.get("pipeline")
        )

    def _derived(self, mode: str) -> Manifests | None:
        """`mode`'s manifests derived from the confirmed work-tree entry of this context (but
        for the variables a commit's hook runs with) when every fact of it holds but the index
        file's stat data, and what is staged is what the work tree holds (`staged_as_worktree`):
        the usual commit (`doit run`, `git add -A`, `git commit`) is answered without dodo.py."""
        if mode not in ("index", "worktree") or self.hook_env is None:
            return None
        ctx = {**self.context("worktree"), "env": None}
        w = next(
            (
                e
                for e in self.entries
                if isinstance(e.get("context"), dict)
                and {**e["context"], "env": None} == ctx
                and e.get("hook_env") == self.hook_env
                and self._usable(e)
            ),
            None,
        )
        if w is None:
            return None
        index = {p for p in state_paths(self.root) if os.path.basename(p) == "index"}
        facts = {**w["facts"], "files": {p: v for p, v in w["facts"]["files"].items()}}
        for p in index:
            facts["files"].pop(p, None)
        lock = self._lock_of(w)
        if not holds(facts, "worktree", self.root, self.store, lock, lambda: self._tree(lock)):
            return None
        got = staged_as_worktree(load_manifests(w["manifests"]), mode, self.root, self.store)
        if got is not None:
            self.sources[mode] = w
        return got

    def _tree(self, lock: str) -> Tree:
        """The project's walk for `lock`, taken once until `begin` takes it as its facts."""
        if lock not in self._walked:
            self._walked[lock] = walk(self.root, self.store, lock)
        return self._walked[lock]

    def begin(self, *modes: str) -> None:
        """Capture the facts before a full computation of `modes` (once per mode)."""
        todo = [m for m in modes if m not in self.start]
        if self.dropped or not todo:
            return
        lock = self.lock
        facts = capture(self.root, self.store, lock, tree=self._walked.pop(lock, None))
        self._walked.clear()
        for mode in todo:
            self.start[mode] = for_mode(facts, mode, self.root)

    def computed(self, mode: str, ms: Manifests, *, clean: bool) -> None:
        """A full computation of `mode` gave `ms`; `clean`: without a warning or a stand-in."""
        if not self.cost:  # what this full check cost, noted at exit even if this one builds
            self.cost = time.process_time()
            if not self._registered:
                self._registered = True
                atexit.register(self.finish)
        if self.dropped or mode in self.pending:
            return
        doc = dump_manifests(ms) if clean else None
        if doc is None or self.start.get(mode) is None or self.shape is None:
            self.start[mode] = None
            return
        self.pending[mode] = doc
        if not self._registered:
            self._registered = True
            atexit.register(self.finish)

    def drop(self) -> None:
        """Something was built or pulled: this process neither answers nor records."""
        self.dropped = True
        self._answers.clear()

    def finish(self) -> None:
        """At exit: write an entry per mode computed in full, when the facts at exit are the
        facts before (but the lock, which the check itself may rewrite)."""
        with contextlib.suppress(OSError, ValueError, TypeError):
            if self.dropped or not self.pending or self.shape is None:
                if self.cost:  # no entry, but what a full check of this dodo file costs
                    self._save(_read(self.path))
                return
            self._write()

    def _write(self) -> None:
        assert self.shape is not None
        shape = self.shape()
        entries = _read(self.path)
        lock = os.path.join(self.root, shape.get("lock", "hfbuild.lock"))
        extra = sorted({p for doc in self.pending.values() for p in outside_data(doc, self.root)})
        now = capture(self.root, self.store, lock, extra)
        dodo_stat = _dodo_stat(self.dodo)
        for mode, doc in self.pending.items():
            start = self.start.get(mode)
            end = for_mode(now, mode, self.root)
            if start is None or end is None:
                continue
            # The CLI's first capture precedes dodo.py's import, so it lacks the modules loaded
            # from elsewhere and the data outside (files and their directories): what both
            # hold, the same (but the lock).
            both = {
                **start,
                "files": {p: start["files"][p] for p in start["files"] if p in end["files"]},
                "dirs": {p: v for p, v in start["dirs"].items() if p in end["dirs"]},
            }
            trimmed = {
                **end,
                "files": {p: end["files"][p] for p in both["files"]},
                "dirs": {p: end["dirs"][p] for p in both["dirs"]},
            }
            if not same_facts(both, trimmed, ignore=[lock]):
                continue
            ctx = self.context(mode)
            old = next((e for e in entries if e.get("context") == ctx), None)
            state = "new"
            if _still_volatile(old, dodo_stat):
                state = "volatile"
            if old is not None and same_facts(old.get("facts"), end) and state != "volatile":
                same = old.get("manifests") == doc and old.get("pipeline") == shape
                state = "confirmed" if same else "volatile"
            entry = _entry(ctx, end, doc, shape, state, dodo_stat, self.hook_env, self.cost)
            entries = [entry] + [e for e in entries if e.get("context") != ctx]
        self._save(entries)

    def _save(self, entries: list[dict[str, Any]]) -> None:
        sharing.makedirs(os.path.dirname(self.path))
        sharing.write_json_atomic(
            self.path,
            {"format": FORMAT, "entries": entries[:KEEP], "cost": self.cost or self.seen_cost},
            durable=False,
            indent=None,
        )

    def volatile(self) -> bool:
        """Whether an entry of this dodo file is volatile while dodo.py is this file: another
        import would compute other manifests again (`witness.py` starts no side check)."""
        dodo_stat = _dodo_stat(self.dodo)
        return any(_still_volatile(e, dodo_stat) for e in self.entries)

    def heavy(self) -> bool:
        """Whether the last full check of this dodo file (any process's, or this one's) cost
        `HEAVY` CPU seconds or more: only then does a build start a side check (`witness.py`);
        a light pipeline's next check imports again, as cheap as the side check would be."""
        return max(self.cost, self.seen_cost) >= HEAVY

    def witnessed(
        self,
        facts: dict[str, Any],
        doc: dict[str, Any],
        contexts: list[tuple[dict[str, Any], str | None]],
        *,
        confirmed: bool,
        cost: float,
    ) -> None:
        """Entries a build's side check decided (`witness.py`): the work-tree manifests `doc`
        computed after the build under `facts`, for each (context, hook environment) in
        `contexts`, confirmed when a fresh import computed what no build changes the same,
        else volatile (an entry already volatile for this dodo.py stays so)."""
        assert self.shape is not None
        shape = self.shape()
        with contextlib.suppress(OSError, ValueError, TypeError):
            entries = _read(self.path)
            dodo_stat = _dodo_stat(self.dodo)
            for ctx, hook_env in contexts:
                old = next((e for e in entries if e.get("context") == ctx), None)
                state = (
                    "confirmed" if confirmed and not _still_volatile(old, dodo_stat) else "volatile"
                )
                entry = _entry(ctx, facts, doc, shape, state, dodo_stat, hook_env, cost)
                entries = [entry] + [e for e in entries if e.get("context") != ctx]
            self._save(entries)


def _dodo_stat(dodo: str) -> list[int] | None:
    try:
        st = os.stat(dodo)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _still_volatile(old: dict[str, Any] | None, dodo_stat: list[int] | None) -> bool:
    """Whether `old` is a volatile entry recorded while dodo.py was this file."""
    return (
        old is not None and old.get("state") == "volatile" and old.get("volatile_dodo") == dodo_stat
    )


def _entry(
    ctx: dict[str, Any],
    facts: dict[str, Any],
    doc: dict[str, Any],
    shape: dict[str, Any],
    state: str,
    dodo_stat: list[int] | None,
    hook_env: str | None,
    cost: float,
) -> dict[str, Any]:
    return {
        "cost": round(cost, 3),
        "context": ctx,
        "facts": facts,
        "manifests": doc,
        "pipeline": shape,
        "state": state,
        "volatile_dodo": dodo_stat if state == "volatile" else None,
        "hook_env": hook_env,
    }


def session(dodo: str, who: str) -> Session | None:
    """The record session of `dodo` for this process, or None (turned off, or no dodo)."""
    if not enabled() or not os.path.isfile(dodo):
        return None
    return Session(dodo, who)
