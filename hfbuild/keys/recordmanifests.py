"""The manifests of the no-import record (issue #20; the record itself is
`hfbuild/pipeline/record.py`): as JSON and back, and derived for the index.

`verify --staged` and a check after `git add` derive their manifests from the confirmed
work-tree entry (`staged_as_worktree`) when its facts hold but the index file's stat data and
the index holds what the work tree does; its context is matched with the environment taken
without what git and the pre-commit framework set for a hook (`recordfacts.hook_env_digest`).

Owns: the manifests' JSON form (`dump_manifests`: none when a stage failed, for a Hub load of
a branch or tag (a commit id never moves), or when the JSON does not carry the key whole;
`load_manifests`), the data files outside the project a recorded pipeline loads
(`outside_data`), the staged derivation, what of them no build changes (`static_parts`, which
a build's side check compares: `pipeline/witness.py`).
Must never: derive when the index may hold other than the work tree (a file not staged, a
load shard's file staged with another id, a directory an argument names, a symlink, a hook's
variable read); import a user module or `datasets`; compute a key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from hfbuild.keys.argpaths import named_files
from hfbuild.keys.fingerprint import data_file_ids
from hfbuild.keys.fullkey import is_listing, listing_at, listing_dir, listing_id
from hfbuild.keys.manifest import Manifest, ShardIn
from hfbuild.keys.manifests import Manifests
from hfbuild.source import hub
from hfbuild.source.envvars import observed_name
from hfbuild.source.gitrepo import FileId, staged_entries, unstaged
from hfbuild.source.gitstate import Snapshot
from hfbuild.source.recordfacts import HOOK_VARS, outside_record
from hfbuild.store.store import Store


def _status(wt: str, staged: tuple[str, int, str | None] | None) -> str | None:
    """A project file's status once the index holds its work-tree id `wt` (None: not staged,
    so git-ignored, as nothing untracked is left); "" when the derivation cannot say."""
    if staged is None:
        return None
    blob, filemode, head = staged
    if blob != wt or filemode == 0o120000:  # a symlink counts by its target: not derived
        return ""
    return "clean" if head == blob else "staged"


def staged_as_worktree(ms: Manifests, mode: str, root: str, store: Store) -> Manifests | None:
    """The manifests `mode` computes, from `ms` (computed over the work tree) when the index
    holds what the work tree does: nothing modified, deleted or untracked (`unstaged`), every
    closure file staged with its id, every listing a build read the same in the index, no
    variable of a commit's hook read; else None. In index mode nothing is dirty; in work-tree
    mode a file is "staged" when HEAD holds other content, else clean. A sharded load's
    shards are derived when each one's file is staged with the id its key holds (a
    transform's shards are keyed by its input's, the same in both modes); a directory an
    argument names and a symlink are not derived."""
    pending = unstaged(root)
    if pending is None or any(not outside_record(root, store, p) for p in pending):
        return None
    names: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {}
    for name in ms:
        m = ms.ok[name]
        doc = m.doc
        if any(
            isinstance(e, list) and len(e) == 3 and isinstance(e[2], dict)
            for e in doc.get("paths") or []
        ):
            return None
        if any(isinstance(e, list) and e and e[0] in HOOK_VARS for e in doc.get("env") or []):
            return None
        code = [(str(p), str(i)) for p, i in (doc.get("code") or {}).get("files") or []]
        data = [*data_file_ids(doc).items(), *named_files(doc)]
        if m.shards is not None and doc.get("kind") == "load":
            # Each shard's key holds its file's content id: staged with it, or not derived.
            data += [(s.label, s.input) for s in m.shard_list]
        data = [(p, i) for p, i in data if not p.startswith("<outside>/")]
        names[name] = (code, data)
    rels = sorted({p for code, data in names.values() for p, _ in [*code, *data]})
    staged = staged_entries(root, rels)
    snap: Snapshot | None = None
    out: dict[str, Manifest] = {}
    for name in ms:
        m = ms.ok[name]
        code, data = names[name]
        dirty: list[FileId] = []
        for p, i in code:
            st = _status(i, staged.get(p))
            if not st:  # a closure file not staged: index mode refuses it
                return None
            if st == "staged":
                dirty.append(FileId(p, i, "staged"))
        for p, i in data:
            st = _status(i, staged.get(p))
            if st == "":
                return None
            if st == "staged":
                dirty.append(FileId(p, i, "staged", "data"))
        for path, ident in m.observed:
            var = observed_name(path)
            if var is not None:
                if var in HOOK_VARS:
                    return None
            elif is_listing(path):
                snap = snap or Snapshot(root, "index")
                if listing_id(listing_at(listing_dir(path), snap)) != ident:
                    return None
        if mode == "index":
            dirty = []
        out[name] = dataclasses.replace(m, dirty=tuple(sorted(dirty, key=lambda f: f.path)))
    return Manifests(list(ms), out, {})


# -- manifests as JSON --------------------------------------------------------------------------


def dump_manifests(ms: Manifests) -> dict[str, Any] | None:
    """The manifests as JSON; None when one stage failed (its error is the full path's)."""
    if ms.failed:
        return None
    if any(not hub.is_commit(p["revision"]) for name in ms for p in ms.ok[name].hub):
        # A Hub load's branch or tag moves with no file of the project's changing (offline,
        # the cache's refs/; online, the Hub): such a pipeline's manifests are computed in
        # full. A commit id never moves: its files' paths are the record's outside data.
        return None
    stages: dict[str, Any] = {}
    for name in ms:
        m = ms.ok[name]
        stages[name] = {
            "doc": m.doc,
            "dirty": [[f.path, f.id, f.status, f.kind] for f in m.dirty],
            "incomplete": list(m.incomplete),
            "data_files": m.data_files,
            "observed": [list(p) for p in m.observed],
            "shards": None if m.shards is None else [list(s) for s in m.shards],
            "shard_code": m.shard_code,
            "outside": list(m.outside),
            "pending": list(m.pending),  # inputs not built yet (inputid.py)
            "hub": [dict(p) for p in m.hub],  # a Hub load's commits (hub.Pin), for its lock
            "fingerprint": m.fingerprint,
        }
    try:
        text = json.dumps({"names": list(ms), "stages": stages}, sort_keys=True)
    except (TypeError, ValueError):
        return None
    doc: dict[str, Any] = json.loads(text)
    again = load_manifests(doc)
    if any(again.ok[n].fingerprint != ms.ok[n].fingerprint for n in ms):
        return None  # the JSON does not carry the key whole: never answer from it
    return doc


def static_parts(doc: dict[str, Any]) -> dict[str, Any]:
    """What of dumped manifests (`dump_manifests`) no build can change: each stage's document
    without its inputs' results, its dirty files and data files, and a load's shards (its
    files'); not what its builds read at run time nor its key. Two imports of one tree that
    give other static parts have a volatile pipeline (an argument from the clock)."""
    out: dict[str, Any] = {}
    for name in doc["names"]:
        s = doc["stages"][name]
        part = {k: s[k] for k in ("dirty", "incomplete", "data_files", "outside")}
        part["doc"] = {k: v for k, v in s["doc"].items() if k != "inputs"}
        if s["doc"].get("kind") == "load":
            part["shards"], part["shard_code"] = s["shards"], s["shard_code"]
        out[name] = part
    return {"names": list(doc["names"]), "stages": out}


def load_manifests(doc: dict[str, Any]) -> Manifests:
    ok: dict[str, Manifest] = {}
    for name in doc["names"]:
        s = doc["stages"][name]
        ok[name] = Manifest(
            doc=s["doc"],
            dirty=tuple(FileId(p, i, st, k) for p, i, st, k in s["dirty"]),
            incomplete=tuple(s["incomplete"]),
            data_files=s["data_files"],
            observed=tuple((str(p), str(i)) for p, i in s["observed"]),
            shards=None if s["shards"] is None else tuple(ShardIn(*x) for x in s["shards"]),
            shard_code=s["shard_code"],
            outside=tuple(s["outside"]),
            pending=tuple(s.get("pending") or ()),
            hub=tuple(s.get("hub") or ()),
        )
    return Manifests(list(doc["names"]), ok, {})


def outside_data(doc: dict[str, Any], root: str) -> list[str]:
    """The data files of load stages that lie outside the project (absolute paths)."""
    out: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, str):
            if os.path.isabs(x) and not x.startswith(root.rstrip(os.sep) + os.sep):
                out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for s in doc["stages"].values():
        walk(s["data_files"])
    return out
