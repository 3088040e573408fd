"""Garbage collection of a store, and the lock files whose results it keeps.

Owns: `roots.json`, the lock files registered as recording results of the store (`roots`,
`register_root`, under `locks/roots.lock`); `collect`: which entries, records and build
leftovers go (an entry not kept and unused for the given time; what a kept entry references,
transitively, is kept: a list's shards, an indices entry's base; the run-time read records of
static fingerprints no kept entry was built under, and failure records of keys not kept, unless
newer; leftover build directories in `tmp/` unless their fingerprint's build lock is held).

Must never: remove an entry a kept one references, a build directory whose build lock is held,
or anything outside the store; import `datasets`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from hfbuild.store import sharing
from hfbuild.store.entry import Manifests
from hfbuild.store.paths import FP, Layout, permission_hint, tree_size


def roots(layout: Layout) -> list[str]:
    """Absolute paths of the lock files registered as using the store."""
    try:
        with open(layout.roots_path(), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    return sorted(p for p in data if isinstance(p, str)) if isinstance(data, list) else []


def register_root(layout: Layout, lock_path: str) -> None:
    """Remember that the lock file at `lock_path` records results of the store."""
    lock_path = os.path.abspath(lock_path)
    if lock_path in roots(layout):
        return
    layout.ensure()
    with permission_hint(layout.root), sharing.file_lock(layout.lock_path("roots")):
        known = set(roots(layout)) | {lock_path}
        live = sorted(p for p in known if os.path.exists(p) or p == lock_path)
        sharing.write_json_atomic(layout.roots_path(), live)


def collect(
    layout: Layout,
    manifests: Manifests,
    remove: Callable[[str], bool],
    forget: Callable[[set[str]], None],
    keep: set[str],
    keep_seconds: float,
    *,
    dry_run: bool,
) -> list[tuple[str, int]]:
    """Delete (by `remove`) entries not in `keep` and unused for `keep_seconds`, and
    leftover build directories (never one whose build lock is held). Returns (path, bytes)
    of each."""
    from filelock import Timeout

    now = time.time()
    gone: list[tuple[str, int]] = []
    kept = set(keep)
    for fp in layout.fingerprints():
        try:
            if now - os.stat(layout.entry(fp)).st_mtime < keep_seconds:
                kept.add(fp)
        except OSError:
            continue
    # A kept stage result keeps the shards it lists, and an indices entry its base
    # (transitively: a kept stage's indices shards keep their bases).
    todo = [fp for fp in kept if FP.match(fp)]
    while todo:
        for ref in manifests.references(todo.pop()):
            if ref not in kept:
                kept.add(ref)
                todo.append(ref)
    removed: set[str] = set()
    for fp in layout.fingerprints():
        e = layout.entry(fp)
        if fp in kept or not os.path.exists(e):
            continue
        gone.append((e, tree_size(e)))
        removed.add(fp)
        if not dry_run:
            remove(fp)
    if not dry_run:
        forget(removed)  # the content notes naming them (`storeequal`)
    gone += _gc_observed(layout, manifests, kept, now - keep_seconds, dry_run=dry_run)
    # A failed build's record goes with its key, or once older than keep_seconds.
    gone += _gc_records(layout, "failures", kept, now - keep_seconds, dry_run=dry_run)
    tmp = layout.tmp
    names = sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []
    by_fp: dict[str, list[str]] = {}
    for n in names:
        by_fp.setdefault(n.split(".")[0], []).append(os.path.join(tmp, n))
    for fp, paths in sorted(by_fp.items()):
        held: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if FP.match(fp):
            lock = sharing.file_lock(layout.lock_path(fp))
            try:
                held = lock.acquire(timeout=0)
            except Timeout:
                continue  # a build of this fingerprint is running: its directory stays
        with held:
            for p in paths:
                gone.append((p, tree_size(p)))
                if not dry_run:
                    shutil.rmtree(p, ignore_errors=True)
    return gone


def _gc_observed(
    layout: Layout, manifests: Manifests, kept: set[str], before: float, *, dry_run: bool
) -> list[tuple[str, int]]:
    """Remove the run-time read records of static fingerprints no kept entry was built
    under, unless written after `before`. Losing a record costs at most a rebuild: a lock
    entry carries its stage's record too."""
    statics = set()
    for fp in kept:
        doc = manifests.read(fp) if FP.match(fp) else None
        if doc is not None and isinstance(doc.get("static_fingerprint"), str):
            statics.add(doc["static_fingerprint"])
    return _gc_records(layout, "observed", statics, before, dry_run=dry_run)


def _gc_records(
    layout: Layout, kind: str, keep: set[str], before: float, *, dry_run: bool
) -> list[tuple[str, int]]:
    """Remove the `<kind>/<fp[:2]>/<fp>.json` records whose fingerprint is not in `keep`,
    unless written after `before`."""
    gone: list[tuple[str, int]] = []
    top = os.path.join(layout.root, kind)
    for sub in sorted(os.listdir(top)) if os.path.isdir(top) else []:
        d = os.path.join(top, sub)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            path = os.path.join(d, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if name.removesuffix(".json") in keep or st.st_mtime >= before:
                continue
            gone.append((path, st.st_size))
            if not dry_run:
                with contextlib.suppress(OSError):
                    os.unlink(path)
    return gone
