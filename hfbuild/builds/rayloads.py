"""A Ray task's load shards built by one `load_dataset` call, stored as one pack.

A coalesced task (`ray_executor.coalesce`) of load shards holds many data files; loading each
by itself costs datasets' per-call overhead (builder, locks, thread pools: tens of ms a file),
which the local executor avoids by loading a split's missing files together
(`shardone.load_together`). A worker does the same, and writes the rows as one pack whose
ranges are the files' shards, as the local executor does: keys and content hashes do not
change, and the task pushes one entry (`rayworker`).

Owns: `build_together`: the load shards of one task, keyed by the worker (their data files in
the task's scratch), loaded by one call when they may be (`shardone.together`: parquet, every
row), cut by their files' row counts (a footer's), written as one pack in the node's store
(`packbuild.write`: each row range hashed as a load of that file alone would be) and
published under its shards' keys (`packbuild.publish`).

Must never: publish a shard whose build read files its key does not hold (such a call leaves
every shard to be built by itself, which keys what it read), or a range whose rows are not its
file's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hfbuild.core.errors import BuildError
from hfbuild.keys import packs

if TYPE_CHECKING:
    from hfbuild.core.spec import StageSpec
    from hfbuild.keys.manifest import Manifest, Shard
    from hfbuild.keys.place import Place


def build_together(
    place: Place, spec: StageSpec, shards: Sequence[tuple[Manifest, Shard, str]], scratch: str
) -> dict[str, str]:
    """Build the load shards `shards` ((manifest, shard, data file) each, keyed, of `spec`
    with its features decided) that the node's store lacks by one call, written as one pack
    published under their keys; each built shard's key -> the pack's ({} when they may not
    be loaded together: another builder than parquet, fewer than two, more than one split,
    a failing load, rows other than the footers say, or files read that the keys do not
    hold; each is then built by itself, which names the file a failure is about)."""
    from hfbuild.builds import builder, packbuild, shardone
    from hfbuild.keys.fullkey import observing
    from hfbuild.source import liveness

    store = place.store
    todo = [(m, s, p) for m, s, p in shards if not store.has(s.key)]
    if len(todo) < 2 or not shardone.together(spec):
        return {}
    split = todo[0][1].split
    if any(s.split != split for _, s, _ in todo):
        return {}
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(dir=scratch, prefix="together-")
    paths = [p for _, _, p in todo]
    named = {"scratch": os.path.join(tmp, builder.SCRATCH), "tag": "together-"}
    first = todo[0][0]
    try:
        with observing(place, tmp) as seen, shardone.quiet_datasets():
            counts = [builder.parquet_rows(p) for p in paths]
            load = os.path.join(tmp, "load")
            out = builder.run_stage(
                spec, [], todo[0][1].key, load, place.root, {split: paths}, **named
            )
            read = seen.identify(first)
    except (BuildError, OSError):
        return {}
    if isinstance(out, dict):
        out = out[split]
    if sum(counts) != len(out) or not set(read) <= set(first.observed):
        return {}
    liveness.check_built(place.root, first.doc)  # the code that ran is the code hashed
    keys = [s.key for _, s, _ in todo]
    dest = store.new_build_dir(packs.pack_key(keys))
    try:
        parts = builder.PartWriter(out)
        info, hashes = packbuild.write(parts, counts, os.path.join(dest, "data"), keys[0][:64])
        each = (time.perf_counter() - t0) / len(todo)
        done: list[tuple[int, dict[str, Any]]] = []
        start = 0
        for (_, s, _), n, h in zip(todo, counts, hashes, strict=True):
            doc = shardone.shard_doc(spec, s, builder.SaveInfo(n, h, 0, None, info.form), out, each)
            doc["span"] = [start, start + n]
            start += n
            done.append((len(done), doc))
        packbuild.publish(place, spec, keys, packbuild.Pack(dest, info, done))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dict.fromkeys(keys, packs.pack_key(keys))
