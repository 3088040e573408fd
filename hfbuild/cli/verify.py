"""The checks behind `hfbuild verify`: the pre-commit hook, CI, and reproducibility.

Owns: comparing the fingerprints of what is staged (`staged=True`) or checked out with the
hfbuild.lock recorded alongside (with absent data files standing in from the lock, see
absentdata.py), requiring the store to hold staged results, and rebuilding
every stage into a scratch store to compare output content hashes with the lock.
Must never: import datasets unless rebuilding, write the lock, or, when rebuilding, pull from a
remote or read the user's store for the rebuild (both hold the very results being checked);
only after the comparison, a locked result the user's store holds as pulled from a remote is
looked at, and moved aside when the rebuild contradicts it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, NamedTuple

from hfbuild.builds.stage import build
from hfbuild.core.errors import HfbuildError, UnmergedError
from hfbuild.keys.absentdata import LockedData, Unchecked
from hfbuild.keys.diff import diff, versions_only
from hfbuild.keys.fingerprint import data_file_ids
from hfbuild.keys.fullkey import observed_changes
from hfbuild.keys.manifest import Manifest
from hfbuild.keys.manifests import Manifests
from hfbuild.pipeline.pipeline import Pipeline
from hfbuild.source.datafiles import NOT_IN_GIT
from hfbuild.source.gitrepo import Mode
from hfbuild.source.gitstate import Snapshot
from hfbuild.store import lockfile
from hfbuild.store.entry import row_owner, row_pack


class Problem(NamedTuple):
    stage: str | None
    message: str


def _fix(pipe: Pipeline) -> str:
    return f"`doit run {pipe.name} && git add {pipe.lock_name}`"


def _cause(
    pipe: Pipeline,
    entry: dict[str, Any],
    m: Manifest,
    manifests: Mapping[str, Manifest],
    name: str,
    mode: Mode = "worktree",
) -> str:
    inputs = {i: manifests[i].fingerprint for i in pipe[name].spec.inputs}
    changes = diff(entry.get("manifest") or {}, m.doc, entry.get("inputs") or {}, inputs)
    if not changes:  # the same code and data: a file it read at run time, then
        snap = Snapshot(pipe.root, mode)
        changes = observed_changes(entry.get("observed"), snap, pipe.stat_cache)
    return changes[0].describe() if changes else "its manifest changed"


def check_lock(
    pipe: Pipeline,
    *,
    staged: bool = False,
    strict: bool = False,
    unchecked: list[Unchecked] | None = None,
) -> list[Problem]:
    """Problems with the lock: stages whose recorded fingerprint is not the one the staged
    (or checked-out) code and data give, and, for `staged`, results the store lacks. Given
    `unchecked` (checked-out code only), a load stage whose data files are absent takes its
    data identity from the lock and is appended there; everything else is still checked."""
    where = "staged" if staged else "committed"
    if staged:
        try:
            text = Snapshot(pipe.root, "index").read_index_text(pipe.lock_name)
        except UnmergedError:
            return [
                Problem(None, str(lockfile.ConflictedLockError(f"the staged {pipe.lock_name}")))
            ]
    else:
        try:
            with open(pipe.lock_path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            text = None
    problems: list[Problem] = []
    try:
        recorded = lockfile.loads(text, f"the {where} {pipe.lock_name}") if text else {}
    except HfbuildError as e:
        return [Problem(None, str(e))]
    absent = LockedData(recorded, pipe.lock_name) if unchecked is not None and not staged else None
    # Each stage's key holds its inputs' results as the lock records them (inputid.py).
    mode: Mode = "index" if staged else "worktree"
    manifests = pipe.manifests(fresh=True, mode=mode, absent=absent, lock=recorded)
    if absent is not None and unchecked is not None:
        unchecked.extend(absent.unchecked)
    worktree = pipe.manifests(fresh=True) if staged else manifests
    fix = _fix(pipe)
    to_stage = _data_to_stage(pipe, recorded, manifests, worktree) if staged else {}
    if to_stage:
        # `doit run` builds from the work tree, so while it holds data the index does not,
        # rebuilding cannot make the staged lock agree: the data has to be staged first.
        fix = f"stage the data files named above, then {fix}"
    for name, m in manifests.items():
        fp = m.fingerprint
        entry = recorded.get(name)
        hint = ""
        if staged and worktree[name].fingerprint != fp:
            files = [c.path for c in diff(m.doc, worktree[name].doc) if c.part == "file"]
            if files:
                hint = (
                    f" (the work tree differs from what is staged in {', '.join(files)}: stage "
                    f"those changes, or `git stash --keep-index`, before building)"
                )
        if strict and not staged and m.dirty:
            problems.append(Problem(name, f"stage {name!r} {_uncommitted(m)}"))
        if not isinstance(entry, dict):
            problems.append(
                Problem(
                    name,
                    f"stage {name!r} is not in the {where} {pipe.lock_name}. Fix: {fix}{hint}.",
                )
            )
        elif m.pending:
            # Its key holds its input's result, which the lock does not record for the
            # input's current key: the input's own problem, above, says why.
            problems.append(
                Problem(
                    name,
                    f"stage {name!r} cannot be checked: its input {m.pending[0]!r} was not "
                    f"built from the {where} code, and its key holds its input's result. "
                    f"Fix: {fix}{hint}.",
                )
            )
        elif entry.get("fingerprint") != fp and _same_result_elsewhere(pipe, entry, m):
            continue
        elif entry.get("fingerprint") != fp:
            cause = _cause(pipe, entry, m, manifests, name, "index" if staged else "worktree")
            problems.append(
                Problem(
                    name,
                    f"stage {name!r} was not built from the {where} code: {cause}. "
                    f"Fix: {fix}{hint}.",
                )
            )
        elif staged and not pipe.store.has(fp):
            problems.append(
                Problem(
                    name,
                    f"stage {name!r}: the store holds no result for the staged code (fingerprint "
                    f"{fp}). Fix: `doit run {pipe.name}`{hint}.",
                )
            )
    for name in sorted(recorded.keys() - manifests.keys()):
        problems.append(
            Problem(
                name,
                f"{pipe.lock_name} lists stage {name!r}, which the pipeline no longer defines. "
                f"Fix: {fix}.",
            )
        )
    if to_stage:
        problems.insert(0, Problem(None, _stage_data_message(pipe, to_stage)))
    return problems


def _same_result_elsewhere(pipe: Pipeline, entry: Mapping[str, Any], m: Manifest) -> bool:
    """A lock entry written on a machine with other package versions (nothing else in the
    stage's manifest differs, its inputs' results the same: `diff.versions_only`) holds
    when this store has the stage's result under this machine's key with the content hash
    the entry records: both sides' builds gave the same data (a mixed-version team)."""
    if m.dirty or versions_only(entry.get("manifest") or {}, m.doc) is None:
        return False
    doc = pipe.store.intact_manifest(m.fingerprint)
    want = entry.get("content_hash")
    return doc is not None and isinstance(want, str) and doc.get("content_hash") == want


def _data_to_stage(
    pipe: Pipeline,
    recorded: Mapping[str, Any],
    staged: Manifests,
    worktree: Manifests,
) -> dict[str, str]:
    """The data files (of loads and `file_deps`) to `git add` before the commit can hold
    what hfbuild.lock is built from, all at once, by path, with what is known of each:
    untracked ones the staged pipeline reads (its data files are found in the work tree,
    but the commit would lack them: always); and, when a stage's staged lock entry
    disagrees, those modified and not staged, and those whose id differs between the lock
    entry and what is staged (the pre-commit framework hides unstaged changes from hooks,
    so only the lock tells). `git add` of a file already staged changes nothing, so the
    advice holds also when the lock is merely older than what is staged. Git-ignored data
    is never named: it is kept out of git on purpose (and `git add` refuses it)."""
    visible: dict[str, str] = {
        f.path: f.status
        for m in worktree.ok.values()
        for f in m.dirty
        if f.kind == "data" and f.status in ("modified", "untracked")
    }
    out: dict[str, str] = {p: s for p, s in visible.items() if s == "untracked"}
    differing: set[str] = set()
    for name, m in staged.ok.items():
        entry = recorded.get(name)
        if isinstance(entry, dict) and entry.get("fingerprint") == m.fingerprint:
            continue
        old = data_file_ids(entry.get("manifest") or {}) if isinstance(entry, dict) else {}
        new = data_file_ids(m.doc)
        differing |= {p for p in old.keys() | new.keys() if old.get(p) != new.get(p)}
        here = worktree.ok.get(name)
        out.update(
            {f.path: visible[f.path] for f in (here.dirty if here else ()) if f.path in visible}
        )
    candidates = sorted(p for p in differing - out.keys() if not p.startswith(NOT_IN_GIT))
    for p in Snapshot(pipe.root).stageable(candidates):
        out[p] = "differs from the lock"
    return out


def _stage_data_message(pipe: Pipeline, to_stage: Mapping[str, str]) -> str:
    paths = sorted(to_stage)
    listing = ", ".join(f"{p} ({to_stage[p]})" for p in paths)
    return (
        f"stages read data files whose content the commit would not hold as hfbuild.lock "
        f"records it (`doit run` builds from the work tree): {listing}. Fix: "
        f"`git add {' '.join(map(shlex.quote, paths))}`, then {_fix(pipe)} (or, to leave "
        f"them out of this commit, `git stash --keep-index --include-untracked`, then build; "
        f"data kept out of git on purpose belongs in .gitignore)."
    )


def _uncommitted(m: Manifest) -> str:
    """`has uncommitted code: a.py (modified); has uncommitted data: ...` and what to do."""
    parts = []
    for kind in ("code", "data"):
        files = [f for f in m.dirty if f.kind == kind]
        if files:
            listing = ", ".join(f"{f.path} ({f.status})" for f in files)
            parts.append(f"has uncommitted {kind}: {listing}")
    data = any(f.kind == "data" for f in m.dirty)
    tail = " (data kept out of git on purpose belongs in .gitignore)" if data else ""
    return f"{'; '.join(parts)}. Commit these files{tail}."


def _scratch_twin(pipe: Pipeline, scratch: str) -> Pipeline:
    """The same stages over an empty store at `scratch`, with no remote and no stat cache of
    the user's store: whatever it builds it computes itself."""
    return pipe.over(scratch)


def check_rebuild(pipe: Pipeline) -> list[Problem]:
    """Rebuild every stage in a scratch store and compare output content hashes with the
    lock: a stage that builds to different data is not reproducible, unless the result the
    lock records was pulled from a remote (`_pulled_cause`): then that remote's entry is
    forged or damaged. Nothing is pulled from a remote, and the rebuild reads nothing from
    the user's store, which could only hold the results being checked."""
    scratch = tempfile.mkdtemp(prefix="hfbuild-verify-")
    try:
        twin = _scratch_twin(pipe, os.path.join(scratch, "store"))
        problems = check_lock(twin)
        if problems:
            return problems
        recorded = lockfile.read(pipe.lock_path)
        differ: set[str] = set()  # stages whose rebuild differs from the lock
        for spec in pipe.specs:
            report = build(twin, spec.name, record=False)
            if report.action == "pulled":  # remote=False: a bug if it happens
                raise AssertionError(f"verify --rebuild pulled {spec.name!r}")
            rebuilt = twin.store.read_manifest(report.fingerprint) or {}
            got = rebuilt.get("content_hash")
            want = recorded[spec.name].get("content_hash")
            if got != want:
                differ.add(spec.name)
                upstream = next((d for d in spec.inputs if d in differ), None)
                if upstream is not None:
                    # Its key holds its inputs' results (`inputid`): the lock's entry was
                    # built over the input the rebuild contradicts; it is no cause of its own.
                    problems.append(
                        Problem(
                            spec.name,
                            f"stage {spec.name!r}: rebuilt over its input {upstream!r} as "
                            f"rebuilt above, it gives content hash {got}, not the {want} "
                            f"{pipe.lock_name} records; it follows from {upstream!r}: fix "
                            f"that one.",
                        )
                    )
                    continue
                forged = _pulled_cause(pipe, spec.name, recorded[spec.name], rebuilt)
                if forged is not None:
                    problems.append(Problem(spec.name, forged))
                    continue
                problems.append(
                    Problem(
                        spec.name,
                        f"stage {spec.name!r} is not reproducible: rebuilt from the same code "
                        f"and data it gave content hash {got}, but {pipe.lock_name} records "
                        f"{want}. "
                        f"Seed any randomness it uses (a seed argument; shuffle(seed=...)).",
                    )
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return problems


def _pulled_cause(
    pipe: Pipeline, name: str, entry: Mapping[str, Any], rebuilt: Mapping[str, Any]
) -> str | None:
    """When the result a lock entry records was pulled from a remote (the user's store holds
    it, with that content hash, marked as pulled), a rebuild that differs convicts the pulled
    entry, not the stage: what to say, after moving the pulled entries the rebuild
    contradicts aside (for a sharded stage, its list and the shards that differ). None when
    the recorded result was not pulled."""
    store = pipe.store
    fp = entry.get("fingerprint")
    doc = store.read_manifest(fp) if isinstance(fp, str) else None
    if doc is None or doc.get("content_hash") != entry.get("content_hash"):
        return None
    new = lockfile.shard_hashes(rebuilt)
    suspects = [
        (str(row[1]), str(row[2]))
        for row in doc.get("shards") or []
        if str(row[1]) in new
        and (store.read_manifest(str(row[1])) or {}).get("content_hash") != new[str(row[1])]
    ]
    pulled = [
        (key, label, remote)
        for key, label in suspects
        if isinstance(remote := (store.read_manifest(key) or {}).get("pulled_from"), str)
    ]
    if not pulled and not isinstance(doc.get("pulled_from"), str):
        return None
    assert isinstance(fp, str)
    remote = pulled[0][2] if pulled else str(doc.get("pulled_from"))
    for key, _, _ in pulled:
        with store.lock(key):
            store.quarantine(key)
    with store.lock(fp):
        store.quarantine(fp)
    which = (
        f" (its shards {', '.join(f'{label} ({key})' for key, label, _ in pulled)})"
        if pulled
        else ""
    )
    return (
        f"stage {name!r}: the content hash {pipe.lock_name} records ({entry.get('content_hash')}) "
        f"is that of the entry {fp}{which} pulled from the remote {remote}, and a rebuild from "
        f"the same code and data gives {rebuilt.get('content_hash')}: that remote holds a "
        f"forged or damaged entry. It was moved aside from the store. Fix: delete it on the "
        f"remote, then `HFBUILD_NO_REMOTE=1 doit run {pipe.name} && git add {pipe.lock_name}`."
    )


def check_deep(pipe: Pipeline) -> list[Problem]:
    """Read every entry in the store in full (not only the current stages': an older entry
    becomes current again when an edit is reverted) and compare its content hash with its
    manifest, and with what the committed lock records for its key; a list of shards also
    with the content hash each of its shards holds. A corrupt entry is moved aside, so it is
    rebuilt when next needed, and reported, with every entry that lists it as a shard or
    selects rows of it (transitively), in one pass: their own checks may have passed before
    its damage was found. So is a shard its list contradicts, so that the rebuild does not
    list it again. An entry pulled from a remote is named as such: that remote holds a
    forged or damaged entry."""
    from hfbuild.store.content import dataset_hash, pack_mismatch

    store = pipe.store
    names = {m.fingerprint: name for name, m in pipe.manifests().items()}
    pins = pipe.pins()
    docs: dict[str, dict[str, Any] | None] = {}
    bad: dict[str, str] = {}
    contradicted: dict[str, str] = {}  # shard -> the list whose row it contradicts
    fps = store.fingerprints()
    for fp in fps:
        doc = docs[fp] = store.read_manifest(fp)
        why = store.check(fp)
        keys: list[str] = []  # shards whose content hash is not their row's
        if why is None and doc is not None:
            try:
                if isinstance(doc.get("shards"), list):  # each shard is an entry checked here
                    got, keys = _shards_hash(pipe, doc)
                else:
                    loaded = store.load(fp)
                    got = dataset_hash(loaded)  # an indices entry: via its base
                    if isinstance(doc.get("pack"), list):  # each shard's rows, too
                        why = pack_mismatch(loaded.data.table, doc["pack"])
            except Exception as e:
                got = f"unreadable ({type(e).__name__}: {e})"
            pin = pins.get(fp)
            if why is not None:
                pass
            elif got != doc.get("content_hash"):
                why = f"its data does not match its content hash ({got})"
            elif pin is not None and got != pin.content_hash:
                why = (
                    f"its content hash {got} is not the {pin.content_hash} the committed "
                    f"{pipe.lock_name} records for it"
                )
        if why is not None:
            bad[fp] = why
            contradicted.update({key: fp for key in keys})
    grown = True
    while grown:  # an entry over a damaged one is damaged: a list's shard, an entry's base
        grown = False
        for fp in fps:
            doc = docs[fp]
            if fp in bad or fp in contradicted or doc is None:
                continue
            for ref in store.references(fp, doc):
                if ref in bad or ref in contradicted:
                    listed = isinstance(doc.get("shards"), list)
                    bad[fp] = f"its {'shard' if listed else 'base'} {ref} is damaged"
                    grown = True
                    break
    problems: list[Problem] = []
    for fp in fps:
        if fp not in bad and fp not in contradicted:
            continue
        doc = docs[fp]
        with store.lock(fp):
            moved = store.quarantine(fp)
        if fp in contradicted and fp not in bad:
            owner = contradicted[fp]
            stage = names.get(owner) or (docs.get(owner) or {}).get("stage") or "?"
            problems.append(
                Problem(
                    stage,
                    f"stage {stage!r}: its shard {fp} holds other content than its list "
                    f"{owner} records{_pulled(doc)}; moved aside to {moved}.",
                )
            )
            continue
        stage = names.get(fp) or (doc or {}).get("stage") or "?"
        problems.append(
            Problem(
                stage,
                f"stage {stage!r}: the stored result {fp} is damaged ({bad[fp]}){_pulled(doc)}; "
                f"moved aside to {moved}. Fix: `doit run {pipe.name}` rebuilds it when it is "
                f"needed.",
            )
        )
    return problems


def _pulled(doc: Mapping[str, Any] | None) -> str:
    """How a stored entry's problem reads when it was pulled from a remote."""
    remote = (doc or {}).get("pulled_from")
    if not isinstance(remote, str):
        return ""
    return f"; it was pulled from the remote {remote}, which holds a forged or damaged entry"


def _shards_hash(pipe: Pipeline, doc: dict[str, Any]) -> tuple[str, list[str]]:
    """A result made of shards: the combined hash of the content hashes its shards record,
    and the shards whose hash is not the one their row in the list records."""
    from hfbuild.store.content import combined_hash

    hashes = []
    contradicted = []
    packs: dict[str, dict[str, list[Any]]] = {}  # pack -> its rows by shard key
    for row in doc["shards"]:
        key = str(row[1])
        pack = row_pack(row)
        if pack is None:
            got = str((pipe.store.read_manifest(key) or {}).get("content_hash"))
        else:  # a row range of a pack: the hash the pack's manifest gives that range
            if pack[0] not in packs:
                rows = (pipe.store.read_manifest(pack[0]) or {}).get("pack") or []
                packs[pack[0]] = {str(r[0]): r for r in rows if isinstance(r, list)}
            r = packs[pack[0]].get(key)
            got = str(r[3]) if r is not None and [r[1], r[2]] == list(pack[1:]) else "None"
        hashes.append((str(row[0]), got))
        facts = row[4] if len(row) >= 5 and isinstance(row[4], dict) else {}
        if facts.get("content_hash") not in (None, got):
            contradicted.append(row_owner(row))
    return combined_hash(hashes), contradicted
