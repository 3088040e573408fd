from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NamedTuple

from hfbuild.core.errors import HfbuildError
from hfbuild.keys.manifest import Manifest, Shard
from hfbuild.pipeline.pipeline import Pipeline
from hfbuild.store.entry import row_owner, row_pack
from hfbuild.store.remote import Remote
from hfbuild.store.remotereach import RefusedEntryError, remote_url


def _remote(pipe: Pipeline, url: str | None) -> Remote:
    resolved = remote_url(pipe.root, url)
    if not resolved:
        raise HfbuildError(
            "no remote cache configured: pass --remote URL, set HFBUILD_REMOTE, or add "
            '`remote = "s3://bucket/prefix"` under [tool.hfbuild] in pyproject.toml.'
        )
    return Remote(resolved, pipe.pins, pipe.lock_name)


def _stages(pipe: Pipeline, stages: Sequence[str]) -> list[str]:
    for s in stages:
        pipe[s]  # an unknown name is a clear error
    return list(stages) or [s.name for s in pipe]


def push(pipe: Pipeline, stages: Sequence[str], url: str | None) -> int:
    """Upload the current results of the stages (default: all) that the remote lacks."""
    remote = _remote(pipe, url)
    manifests = pipe.manifests()
    missing = 0
    for name in _stages(pipe, stages):
        fp = manifests[name].fingerprint
        if not pipe.store.has(fp):
            print(f"{name}: not built locally; nothing to push (run `doit run {pipe.name}`)")
            missing += 1
            continue
        sent = remote.push(pipe.store, fp, name)
        print(f"{name}: pushed {sent:,} bytes" if sent else f"{name}: already on the remote")
    return 1 if missing else 0


def pull(pipe: Pipeline, stages: Sequence[str], url: str | None) -> int:
    """Download the current results of the stages (default: all) that the store lacks. An
    entry the remote holds but that fails its checks is refused (named, exit 1): nothing of
    it is used."""
    remote = _remote(pipe, url)
    absent = 0
    for name in _stages(pipe, stages):
        try:
            m, got = _keyed(pipe, remote, name)
            if m is not None and pipe.store.has(m.fingerprint):
                print(f"{name}: already in the store")
                continue
            if m is not None:
                got += remote.pull(pipe.store, m.fingerprint, name)
        except RefusedEntryError as e:
            print(
                f"{name}: refused: {e} Build it with `doit run {pipe.name}:{name}`.",
                file=sys.stderr,
            )
            absent += 1
            continue
        if m is not None and pipe.store.has(m.fingerprint):
            pipe.record(name)
            print(f"{name}: pulled {got:,} bytes")
        else:
            print(f"{name}: not on the remote (build it with `doit run {pipe.name}:{name}`)")
            absent += 1
    return 1 if absent else 0


def _keyed(pipe: Pipeline, remote: Remote, name: str) -> tuple[Manifest | None, int]:
    """The stage's manifest once its key is known, and the bytes pulled to know it: a stage
    whose input's result neither the store nor the committed lock has is pending (its key
    holds that result, inputid.py), so that input is pulled first. None when an input is
    not on the remote either."""
    m = pipe.manifests()[name]
    if not m.pending:
        return m, 0
    got = 0
    for dep in pipe[name].spec.inputs:
        dm, n = _keyed(pipe, remote, dep)
        got += n
        if dm is None:
            return None, got
        if not pipe.store.has(dm.fingerprint):
            got += remote.pull(pipe.store, dm.fingerprint, dep)
            if not pipe.store.has(dm.fingerprint):
                return None, got
            pipe.record(dep)
    m = pipe.manifests(fresh=True)[name]
    return (None if m.pending else m), got


def remote_rm(pipe: Pipeline, stage: str, shard: str | None, url: str | None, force: bool) -> int:
    """Remove the remote's entry for the stage's current key (or one of its shards): a bad
    entry (a forged one, or one built over a copy of its input the remote does not hold).
    A shard kept as a row range of a pack (no entry of its own) is removed with its pack,
    the entry holding its rows. The committed lock is the check: an entry whose content is
    what the lock records for its key is the good one, and stays unless `force`."""
    remote = _remote(pipe, url)
    m = pipe.manifests()[stage]
    fp, what, pack = m.fingerprint, f"stage {stage!r}", None
    if shard is not None:
        fp, pack = _shard_of(pipe, remote, stage, m, shard)
        what += f", shard {shard}"
    gone = pack if pack is not None else fp
    try:
        doc = remote.read_manifest(gone)
        theirs = str((doc or {}).get("content_hash"))
        if doc is not None and pack is not None:  # the hash its pack gives its rows
            held = [r for r in doc.get("pack") or [] if isinstance(r, list) and r[:1] == [fp]]
            theirs = str(held[0][3]) if held and len(held[0]) >= 4 else "None"
    except RefusedEntryError:  # a corrupt or edited manifest: removable
        doc, theirs = {}, "unreadable"
    if doc is None:
        print(f"{what}: the remote {remote.url} holds no entry {fp}; nothing removed.")
        return 1
    pin = remote.pins().get(fp)
    if pin is not None and pin.content_hash == theirs and not force:
        print(
            f"{what}: the remote's entry {fp} holds what the committed {pipe.lock_name} records "
            f"for it (content hash {theirs}): it is the good one, and stays. --force removes "
            f"it anyway.",
            file=sys.stderr,
        )
        return 1
    remote.remove(gone)
    if pin is None:
        why = f"the committed {pipe.lock_name} does not pin it"
    elif pin.content_hash == theirs:
        why = f"the committed {pipe.lock_name} records it (--force)"
    else:
        why = f"the committed {pipe.lock_name} records {pin.content_hash}"
    if pack is not None:
        others = len((doc or {}).get("pack") or [None]) - 1
        print(
            f"{what}: removed the pack {remote.where(pack)} holding its rows as {fp} (content "
            f"hash {theirs}; {why}), and with it the rows of {others} other shard(s): a build "
            f"makes and pushes them again."
        )
        return 0
    print(f"{what}: removed {remote.where(fp)} (content hash {theirs}; {why}).")
    return 0


def _shard_of(
    pipe: Pipeline, remote: Remote, stage: str, m: Manifest, label: str
) -> tuple[str, str | None]:
    """The key of the stage's shard (or unit) `label`, and, when the remote holds no entry
    of it, the pack the stage's list names for it (the remote's list of the current key,
    else this store's)."""
    try:
        theirs = remote.read_manifest(m.fingerprint)
    except RefusedEntryError:  # the remote's list unreadable: this store's tells
        theirs = None
    lists = [d for d in (theirs, pipe.store.read_manifest(m.fingerprint)) if d]
    if m.shards is not None:
        key = _shard(stage, m.shard_list, label).key
    else:  # a batched stage's units: the labels its list names
        rows = [r for d in lists for r in d.get("shards") or [] if isinstance(r, list)]
        key = _shard(stage, [_Named(str(r[2]), str(r[1])) for r in rows], label).key
    if remote.has(key):
        return key, None
    for d in lists:
        for r in d.get("shards") or []:
            if isinstance(r, list) and len(r) >= 5 and r[1] == key and row_pack(r) is not None:
                return key, row_owner(r)
    return key, None


class _Named(NamedTuple):
    label: str
    key: str


def _shard(stage: str, shards: Sequence[Shard | _Named], label: str) -> Shard | _Named:
    found = [s for s in shards if s.label == label]
    if not found:
        known = ", ".join(s.label for s in shards[:5]) + (", ..." if len(shards) > 5 else "")
        raise HfbuildError(
            f"stage {stage!r} has no shard {label!r}"
            + (f" (its shards: {known})." if shards else ": it is not made of shards.")
        )
    return found[0]
