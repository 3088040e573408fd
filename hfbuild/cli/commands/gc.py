from __future__ import annotations

import json
import os
import sys
from typing import Any

from hfbuild.pipeline.pipeline import Pipeline
from hfbuild.source.gitstate import Snapshot
from hfbuild.store import lockfile


def _fingerprints(texts: list[str]) -> set[str]:
    keep: set[str] = set()
    for text in texts:
        if lockfile.conflicted(text):  # a merge in progress: both sides' results are kept
            found = lockfile.sides(text)
        else:
            try:
                found = [lockfile.loads(text)]
            except lockfile.LockError:
                continue
        for stages in found:
            keep |= {str(e.get("fingerprint")) for e in stages.values() if isinstance(e, dict)}
    return keep


def referenced(pipe: Pipeline, keep_commits: int) -> set[str]:
    """Fingerprints referenced by every lock file registered with the store (this pipeline's
    and any other pipeline's or clone's that records into it): in the work tree, and at HEAD
    and `keep_commits - 1` commits before it."""
    keep: set[str] = set()
    for lock_path in {*pipe.store.roots(), os.path.abspath(pipe.lock_path)}:
        texts = []
        if os.path.isfile(lock_path):
            with open(lock_path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        snap = Snapshot.for_path(os.path.dirname(lock_path))
        if snap.repo is not None:
            name = os.path.relpath(lock_path, snap.root).replace(os.sep, "/")
            texts += snap.text_at_commits(name, max(keep_commits, 1))
        keep |= _fingerprints(texts)
    return keep


def gc(
    pipe: Pipeline,
    *,
    keep_commits: int,
    keep_days: float,
    dry_run: bool,
    executor: str | None = None,
) -> int:
    """Delete store entries nothing references and nobody used lately, and leftovers; with
    the Ray executor, in each alive node's store too (by the same rules and keep set). Exit
    1 when a node could not be collected."""
    from hfbuild.builds.executor import executor_name, require_ray

    keep = referenced(pipe, keep_commits)
    on_ray = executor_name(pipe.root, executor) == "ray"
    if on_ray:
        require_ray()  # before anything is removed here
    gone = pipe.store.gc(keep, keep_days * 86400, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for path, size in gone:
        print(f"{verb} {os.path.relpath(path, pipe.store.root)} ({size:,} bytes)")
    total = sum(size for _, size in gone)
    print(f"{verb} {len(gone)} item(s), {total:,} bytes; kept {len(keep)} locked result(s).")
    if not on_ray:
        return 0
    from hfbuild.builds.raynodes import collect_nodes

    failed = 0
    for node in collect_nodes(keep, keep_days * 86400, dry_run=dry_run):
        if node.error:
            print(f"node {node.node}: not collected: {node.error}", file=sys.stderr)
            failed += 1
            continue
        for rel, size in node.gone:
            print(f"node {node.node}: {verb} {rel} ({size:,} bytes)")
        total = sum(size for _, size in node.gone)
        print(
            f"node {node.node}: {verb} {len(node.gone)} item(s), {total:,} bytes "
            f"from its store {node.store}."
        )
    return 1 if failed else 0


def stage_sizes(pipe: Pipeline) -> tuple[dict[str, int | None], set[str]]:
    """Each stage's bytes in the store (None: not built), and the entries they count. A
    stage's bytes are its entry's and those of the entries it references (its shards, the
    entries an indices entry's rows live in; `Store.references`, transitively) that no stage
    before it, or itself, counts: every byte is counted once. A stage that has no key (its
    manifest failed) is not built."""
    sizes: dict[str, int | None] = {}
    ms = pipe.manifests()
    keyed = {name: ms[name] for name in ms if ms.error(name) is None}
    counted = {m.fingerprint for m in keyed.values()}  # each on its own stage's row
    for name in ms:
        fp = keyed[name].fingerprint if name in keyed else None
        if fp is None or not pipe.store.has(fp):
            sizes[name] = None
            continue
        size = pipe.store.size(fp)
        todo = pipe.store.references(fp)
        while todo:
            ref = todo.pop()
            if ref not in counted:
                counted.add(ref)
                size += pipe.store.size(ref)
                todo.extend(pipe.store.references(ref))
        sizes[name] = size
    return sizes, counted


def du(pipe: Pipeline, *, as_json: bool) -> int:
    """The store's size per stage (current results, as `stage_sizes` counts them) and in all;
    `other` is what no current stage needs."""
    sizes, counted = stage_sizes(pipe)
    manifests = pipe.manifests()
    rows: list[dict[str, Any]] = [
        {
            "stage": name,
            "fingerprint": manifests[name].fingerprint,
            "built": size is not None,
            "bytes": size or 0,
        }
        for name, size in sizes.items()
    ]
    other = sum(pipe.store.size(fp) for fp in pipe.store.fingerprints() if fp not in counted)
    if as_json:
        print(json.dumps({"stages": rows, "other_bytes": other}, indent=1))
        return 0
    width = max((len(r["stage"]) for r in rows), default=5)
    for r in rows:
        shown = f"{r['bytes']:>14,}" if r["built"] else f"{'not built':>14}"
        print(f"{r['stage']:<{width}}  {shown}")
    print(f"{'other':<{width}}  {other:>14,}  (results no current stage needs)")
    total = sum(r["bytes"] for r in rows) + other
    print(f"{'total':<{width}}  {total:>14,}")
    return 0
