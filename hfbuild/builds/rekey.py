"""A result written under another key, without running its transform again.

Owns: copying a built result's files (a shard's or unit's entry, a pack's) with its key
replaced by another where datasets writes it: an Arrow stream's schema message (its
`fingerprint` metadata) and the JSON files `save_to_disk` writes (`state.json`'s
`_fingerprint`); every other byte, the rows' above all, copied as it is. The bytes a build
under the new key writes. For results whose key changed during their build only by files
the build read after their keys were made (`shardone.rekeyed` / `keyed_as` for a sharded
stage's shards, `batchunits` for a batched stage's units, `raymaps` for a Ray task's map
shards): they were computed from the files as they are, so the new key holds what they
read.

Must never: write a file whose layout it does not know (it refuses: the caller builds the
result again), change a byte of an Arrow stream after its schema message, or print.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hfbuild.builds.packbuild import Pack

_STREAM = b"\xff\xff\xff\xff"  # an Arrow IPC stream's first message starts with it


def files_of(root: str) -> list[str]:
    """Every file under `root`, by its path relative to it (`/`-separated), sorted."""
    out: list[str] = []
    for d, _, names in os.walk(root):
        rel = os.path.relpath(d, root)
        out.extend(n if rel == os.curdir else f"{rel}/{n}".replace(os.sep, "/") for n in names)
    return sorted(out)


def copy(src: str, dest: str, rels: Iterable[str], old: str, new: str) -> bool:
    """Files `rels` of `src` written at the same places in `dest`, `old` replaced by `new`
    (keys of one length) in each Arrow stream's schema message and in every other file;
    False, some files written, when a `.arrow` file is not an Arrow stream or the keys'
    lengths differ (the caller discards `dest`)."""
    if len(old) != len(new):
        return False
    a, b = old.encode(), new.encode()
    for rel in rels:
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(os.path.join(src, rel), "rb") as f, open(target, "wb") as out:
            if not rel.endswith(".arrow"):
                out.write(f.read().replace(a, b))  # state.json: its `_fingerprint`
                continue
            head = f.read(8)
            if head[:4] != _STREAM:
                return False
            out.write(head + f.read(int.from_bytes(head[4:8], "little")).replace(a, b))
            shutil.copyfileobj(f, out, 1 << 20)
    return True


def rewritten(
    store: Any, data: str, files: Iterable[str], old: str, new: str, tmp: str, prefix: str
) -> str | None:
    """A new directory of `tmp` (named from `prefix`) whose `data/` holds files `files` of
    `data` under `new` (`copy`): an entry's directory to publish under `new`; None, the
    directory discarded, when a file cannot be rewritten."""
    dest = tempfile.mkdtemp(dir=tmp, prefix=prefix)
    if copy(data, os.path.join(dest, "data"), files, old, new):
        return dest
    store.discard(dest)
    return None


Docs = dict[str, tuple[str, dict[str, Any]]]


def results(
    store: Any,
    docs: Mapping[str, tuple[str, dict[str, Any]]],
    packs: Sequence[tuple[Pack, list[str]]],
    new: Mapping[str, str],
    tmp: str,
) -> tuple[Docs, list[tuple[Pack, list[str]]]]:
    """Results built now, unpublished, written under new keys in `tmp`: `docs` by key ->
    (the directory of a result that is an entry of its own, else "", its document), `packs`
    with their results' keys in order, `new` each key's new key. (The results under their
    new keys, the packs under theirs); the old directories discarded. A result without a
    new key or whose files cannot be rewritten is left out (to be built again), as are the
    documents of results not built now (no directory and in no pack: the store's)."""
    out: Docs = {}
    kept: list[tuple[Pack, list[str]]] = []
    for key, (path, doc) in docs.items():
        if path and key in new:
            data = os.path.join(path, "data")
            dest = rewritten(store, data, files_of(data), key, new[key], tmp, "unit-")
            if dest is not None:
                out[new[key]] = (dest, doc)
        if path:
            store.discard(path)
    for pack, keys in packs:
        data = os.path.join(pack.path, "data")
        if all(k in new for k in keys):
            dest = rewritten(store, data, files_of(data), keys[0], new[keys[0]], tmp, "pack-")
            if dest is not None:
                kept.append((pack._replace(path=dest), [new[k] for k in keys]))
                out.update((new[k], ("", docs[k][1])) for k in keys)
        store.discard(pack.path)
    return out, kept
