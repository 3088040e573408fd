"""What `status` and `explain` report: each stage's state, and why it is stale.

Owns: comparing every stage's current manifest with the one it was last built with (the store
entry `refs/<stage>` points at, else the hfbuild.lock entry) and returning plain values.
Must never: print, exit, or import datasets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from hfbuild.core.spec import stored_rows
from hfbuild.keys import shards
from hfbuild.keys.diff import Change, diff
from hfbuild.keys.fullkey import observed_changes
from hfbuild.keys.manifest import Manifest
from hfbuild.pipeline.pipeline import Pipeline
from hfbuild.source import envvars
from hfbuild.store import lockfile


class StageState(NamedTuple):
    stage: str
    fingerprint: str
    # "up to date" | "stale" | "dirty" | "failed" (reason: why it has no key, or the error its
    # last build failed with) | "blocked" (reason: the input, built from a failed stage)
    state: str
    reason: str | None
    dirty_files: list[str]
    rows: Any
    observed: list[str] = []  # files its key includes because builds read them at run time


class Explanation(NamedTuple):
    stage: str
    fingerprint: str
    up_to_date: bool
    previous: str | None  # the fingerprint compared against
    changes: list[Change]
    line_stats: dict[str, tuple[int, int]]  # file path -> (added, removed)
    result_path: str | None  # an up-to-date stage: where its result is (see result_kind)
    dirty_files: list[str]
    shards: list[str] = []  # a sharded stage: which shards are new, which files are gone
    # How the result is stored: "data" (`result_path` is a `save_to_disk` directory),
    # "indices" (`result_path` holds indices over the rows of the entry `result_base`) or
    # "shards" (`result_path` is the entry listing `result_shards` shards, no data of its own).
    result_kind: str | None = None
    result_base: str | None = None
    result_shards: int = 0
    notes: list[str] = []  # what the key leaves out by design (a copy of the environment)
    failed: str | None = None  # the error the last build of its key failed with (first line)
    blocked: str | None = None  # which input failed (or is itself blocked), it not built
    # An up-to-date stage whose inputs were rebuilt since with the same result ("input clean
    # was rebuilt (code file prep/text.py changed) and gave identical data: nothing to do").
    cut_off: list[str] = []
    pending: str | None = None  # the input being built before the stage's key is known


def _previous(
    pipe: Pipeline, name: str
) -> tuple[str, Mapping[str, Any], Mapping[str, str], Any, Any] | None:
    """(fingerprint, manifest, input names, files read at run time, names of directories
    listed) of the stage's last build, if anything knows it."""
    fp = pipe.store.get_ref(name)
    if fp is not None:
        stored = pipe.store.read_manifest(fp)
        if stored is not None and isinstance(stored.get("manifest"), dict):
            doc = stored["manifest"]
            return (
                fp,
                doc,
                stored.get("inputs") or {},
                stored.get("observed"),
                stored.get("listings"),
            )
    try:
        e = lockfile.read_cached(pipe.lock_path).get(name)
    except lockfile.ConflictedLockError:  # `status` reports the conflict itself
        return None
    if isinstance(e, dict) and isinstance(e.get("manifest"), dict):
        fp = str(e.get("fingerprint"))
        return fp, e["manifest"], e.get("inputs") or {}, e.get("observed"), None
    return None


def _own_changes(prev: Any, m: Manifest) -> list[Change]:
    """What changed in a pending stage's own definition (code, packages, arguments) since
    its last build `prev` (`_previous`); its inputs' side is the pending input's, told apart
    (its manifest's inputs hold a placeholder until then: compared as they were, they read
    as a format change)."""
    was = {**prev[1], "inputs": m.doc["inputs"]} if "inputs" in m.doc else prev[1]
    return diff(was, m.doc, prev[2], prev[2])


def explain(pipe: Pipeline, name: str, *, line_stats: bool = True) -> Explanation:
    """What changed since the stage was last built; `line_stats` adds each changed file's
    diff line counts (a blob diff per file, which `status` does not show)."""
    pipe[name]  # a clear error for an unknown stage
    manifests = pipe.manifests()
    m = manifests[name]
    fp = m.fingerprint
    built = pipe.store.has(fp)
    dirty = [f"{f.path} ({f.status})" for f in m.dirty]
    notes = _notes(m)
    if built:
        cut = _cut_off(pipe, name, manifests)
        return _built(pipe, name, fp, dirty)._replace(notes=notes, cut_off=cut)
    failure = failed_build(pipe, manifests, name, {})
    why: dict[str, str | None] = {"failed": None, "blocked": None}
    if failure is not None:
        why[failure[0]] = failure[1]
    prev = _previous(pipe, name)
    if m.pending and failure is None:  # its key holds its input's result, not built yet
        if prev is None:
            return Explanation(name, fp, False, None, [], {}, None, dirty, pending=m.pending[0])
        own = _own_changes(prev, m)
        return Explanation(name, fp, False, prev[0], own, {}, None, dirty, pending=m.pending[0])
    if prev is None:
        ex = Explanation(name, fp, False, None, [], {}, None, dirty, _shards(pipe, m, None))
        return ex._replace(failed=why["failed"], blocked=why["blocked"])
    old_fp, old_doc, old_inputs, old_observed, old_listed = prev
    inputs = {i: manifests[i].fingerprint for i in pipe[name].spec.inputs}
    from hfbuild.source.gitstate import Snapshot

    snap = Snapshot(pipe.root)
    changes = [*revisions(pipe, name, m), *diff(old_doc, m.doc, old_inputs, inputs)]
    changes += observed_changes(old_observed, snap, pipe.stat_cache, old_listed)
    shard_lines = _shards(pipe, m, old_fp)
    if not changes and not shard_lines and old_fp == fp:
        changes = [Change("kind", "result", "in the store", "missing (removed or corrupt)")]
    stats = {}
    for c in changes if line_stats else []:
        if c.part == "file" and c.old and c.new:
            s = snap.line_stats(c.old, c.path, c.new)
            if s is not None:
                stats[c.path] = s
    ex = Explanation(name, fp, False, old_fp, changes, stats, None, dirty, shard_lines)
    return ex._replace(notes=notes, failed=why["failed"], blocked=why["blocked"])


def revisions(pipe: Pipeline, name: str, m: Manifest) -> list[Change]:
    """A Hub load's revisions that resolve to another commit than the lock records (a moved
    branch): `revision main of org/name now resolves to 4d3c...: was 9a1b...`."""
    if not m.hub:
        return []
    try:
        e = lockfile.read_cached(pipe.lock_path).get(name)
    except lockfile.LockError:
        return []
    locked = e.get("hub") if isinstance(e, dict) else None
    old = {
        (p.get("repo"), p.get("revision")): p.get("commit")
        for p in (locked if isinstance(locked, list) else [])
        if isinstance(p, dict)
    }
    out = []
    for p in m.hub:
        was = old.get((p["repo"], p["revision"]))
        if was is not None and was != p["commit"]:
            out.append(Change("revision", f"{p['revision']} of {p['repo']}", was, p["commit"]))
    return out


Failure = tuple[str, str, str]  # ("failed" | "blocked", reason, the stage that failed)


def failed_build(
    pipe: Pipeline, manifests: Any, name: str, memo: dict[str, Failure | None]
) -> Failure | None:
    """Why stage `name`, which the store lacks, cannot be built as things are: its own key's
    last build failed (the store's record, first line of the error), or a stage it is built
    from did. None when neither (or when it is in the store). `memo` is per call of
    `status`."""
    if name in memo:
        return memo[name]
    memo[name] = None
    if manifests.error(name) is not None:
        return None  # no key: `stage_states` reports why
    fp = manifests[name].fingerprint
    if pipe.store.has(fp):
        return None
    error = pipe.store.read_failure(fp)
    if error is not None:
        line = error.strip().splitlines()[0] if error.strip() else "(no message)"
        memo[name] = ("failed", f"its last build failed: {line}", name)
        return memo[name]
    for dep in pipe[name].spec.inputs:
        got = failed_build(pipe, manifests, dep, memo)
        if got is not None:
            root = got[2]
            reason = (
                f"input {dep!r} failed"
                if root == dep
                else f"input {dep!r} is blocked: stage {root!r} failed"
            )
            memo[name] = ("blocked", reason, root)
            return memo[name]
    return None


def _cut_off(pipe: Pipeline, name: str, manifests: Mapping[str, Manifest]) -> list[str]:
    """For an up-to-date stage: each input whose key is not the one its result was built
    from, yet gave the same result (its key holds its inputs' results, inputid.py), with
    the first change that rebuilt it."""
    doc = pipe.store.read_manifest(manifests[name].fingerprint) or {}
    was = doc.get("inputs")
    out = []
    for i in pipe[name].spec.inputs:
        old = was.get(i) if isinstance(was, dict) else None
        now = manifests[i]
        if not isinstance(old, str) or old == now.fingerprint:
            continue
        prior = (pipe.store.read_manifest(old) or {}).get("manifest")
        changes = diff(prior, now.doc) if isinstance(prior, dict) else []
        why = _short_change(changes[0]) if changes else "its code, data or what it read changed"
        out.append(f"input {i} was rebuilt ({why}) and gave identical data: nothing to do")
    return out


def _short_change(c: Change) -> str:
    """`code file prep/text.py changed`: a change without its ids."""
    text = c.describe()
    return text.split(":", 1)[0] if c.part in ("file", "data") else text


def _notes(m: Manifest) -> list[str]:
    """What the stage's key leaves out by design, as its builds showed."""
    if (envvars.observed_entry(envvars.COPIED), envvars.COPIED_ID) in m.observed:
        return [
            "its builds copied or iterated the whole environment (dict(os.environ), "
            "os.environ.copy(), a loop over it): the variables read from that copy are not "
            "in its key; read each by name (os.environ[name], os.environ.get) to key it"
        ]
    return []


def _built(pipe: Pipeline, name: str, fp: str, dirty: list[str]) -> Explanation:
    """An up-to-date stage, with where and how its result is stored: only an ordinary
    entry's `data/` is a directory `datasets.load_from_disk` reads."""
    store = pipe.store
    doc = store.read_manifest(fp) or {}
    ind, listed = doc.get("indices"), doc.get("shards")
    ex = Explanation(name, fp, True, fp, [], {}, store.data_path(fp), dirty, result_kind="data")
    if isinstance(ind, dict) and isinstance(ind.get("base"), str):
        base = store.entry(ind["base"])
        return ex._replace(result_kind="indices", result_base=base)
    if isinstance(listed, list):
        return ex._replace(
            result_kind="shards", result_path=store.entry(fp), result_shards=len(listed)
        )
    return ex


def _shards(pipe: Pipeline, m: Manifest, old_fp: str | None) -> list[str]:
    if m.shards is None:
        return []
    old = (pipe.store.read_manifest(old_fp) or {}).get("shards") if old_fp else None

    def present(key: str) -> bool:  # a packed shard by its row of the last list
        return pipe.store.has_shard(key, old_fp)

    return shards.changes(m.shard_list, present, old, _old_inputs(pipe, old))


def _old_inputs(pipe: Pipeline, old: Any) -> dict[str, tuple[str, str | None]]:
    """label -> (input key, digest of the keys before it, None if not recorded) of each
    shard its last build listed: from the listing, else from the shard's own manifest."""
    out: dict[str, tuple[str, str | None]] = {}
    for row in old if isinstance(old, list) else []:
        if not (isinstance(row, list) and len(row) >= 3):
            continue
        facts: Any = row[4] if len(row) >= 5 and isinstance(row[4], dict) else {}
        if "input" not in facts:
            doc = pipe.store.read_manifest(str(row[1])) or {}
            facts = doc.get("shard") if isinstance(doc.get("shard"), dict) else {}
        was = facts.get("content") or facts.get("input")  # what its key held of its input
        if isinstance(was, str):
            before = facts.get("before")
            out[str(row[2])] = (was, before if isinstance(before, str) else None)
    return out


def stage_states(pipe: Pipeline) -> list[StageState]:
    out = []
    manifests = pipe.manifests()
    memo: dict[str, Failure | None] = {}
    for name in manifests:
        err = manifests.error(name)
        if err is not None:
            out.append(StageState(name, "", "failed", str(err), [], None))
            continue
        m = manifests[name]
        fp = m.fingerprint
        dirty = [f"{f.path} ({f.status})" for f in m.dirty]
        if pipe.store.has(fp):
            rows = stored_rows(pipe.store.read_manifest(fp) or {})
            state, reason = (
                ("dirty", "built from uncommitted changes") if dirty else ("up to date", None)
            )
            out.append(StageState(name, fp, state, reason, dirty, rows, _observed(m)))
            continue
        damaged = pipe.store.check(fp)  # None: absent (the check `has` made is remembered)
        if damaged is not None:
            reason = f"its stored result {fp} is damaged ({damaged})"
            out.append(StageState(name, fp, "stale", reason, dirty, None, _observed(m)))
            continue
        failure = failed_build(pipe, manifests, name, memo)
        if failure is not None:
            out.append(StageState(name, fp, failure[0], failure[1], dirty, None, _observed(m)))
            continue
        if m.pending:  # its key waits for its input's result (inputid.py)
            waits = f"input {m.pending[0]!r} is being rebuilt (may be cut off)"
            # Its own change (code, packages, arguments), if any, first: it rebuilds the stage
            # whatever its input's result turns out to be.
            prev = _previous(pipe, name)
            own = [c.describe() for c in _own_changes(prev, m)[:1]] if prev else []
            reason = "; ".join([*own, waits])
            out.append(StageState(name, fp, "stale", reason, dirty, None, _observed(m)))
            continue
        ex = explain(pipe, name, line_stats=False)
        if ex.previous is None:
            reason = "; ".join(["never built", *ex.shards])
        elif ex.shards:
            moved = [c.describe() for c in ex.changes if c.part == "revision"]
            reason = "; ".join([*moved, *ex.shards])
        elif ex.changes:
            reason = ex.changes[0].describe()
        else:
            reason = "not in the store"
        out.append(StageState(name, fp, "stale", reason, dirty, None, _observed(m)))
    return out


def _observed(m: Manifest) -> list[str]:
    return [p for p, _ in m.observed]
