"""A Ray task's load shards built by one `load_dataset` call, each stored as its own shard.

A coalesced task (`ray_executor.coalesce`) of load shards holds many data files; loading each
by itself costs datasets' per-call overhead (builder, locks, thread pools: tens of ms a file),
which the local executor avoids by loading a split's missing files together
(`shardone.load_together`). A worker does the same, and then writes each file's rows as the
shard entry it is everywhere else: keys, entries and what travels do not change.

Owns: `build_together`: the load shards of one task, keyed by the worker (their data files in
the task's scratch), loaded by one call when they may be (`shardone.together`: parquet, every
row), cut by their files' row counts (a footer's), each row range written as a shard entry of
its own in the node's store (`builder.PartWriter`: the content hash a load of that file alone
gives) and published under its key.

Must never: publish a shard whose build read files its key does not hold (such a call leaves
every shard to be built by itself, which keys what it read), or a range whose rows are not its
file's.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hfbuild.core.errors import BuildError

if TYPE_CHECKING:
    from hfbuild.core.spec import StageSpec
    from hfbuild.keys.manifest import Manifest, Shard
    from hfbuild.keys.place import Place


def build_together(
    place: Place, spec: StageSpec, shards: Sequence[tuple[Manifest, Shard, str]], scratch: str
) -> int:
    """Build the load shards `shards` ((manifest, shard, data file) each, keyed, of `spec`
    with its features decided) that the node's store lacks by one call, each published
    under its key; how many were built (0 when they may not be loaded together: another
    builder than parquet, fewer than two, more than one split, a failing load, rows other
    than the footers say, or files read that the keys do not hold; each is then built by
    itself, which names the file a failure is about)."""
    from hfbuild.builds import builder, shardone
    from hfbuild.keys.fullkey import observing
    from hfbuild.source import liveness

    store = place.store
    todo = [(m, s, p) for m, s, p in shards if not store.has(s.key)]
    if len(todo) < 2 or not shardone.together(spec):
        return 0
    split = todo[0][1].split
    if any(s.split != split for _, s, _ in todo):
        return 0
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
        return 0
    if isinstance(out, dict):
        out = out[split]
    if sum(counts) != len(out) or not set(read) <= set(first.observed):
        return 0
    liveness.check_built(place.root, first.doc)  # the code that ran is the code hashed
    parts = builder.PartWriter(out)
    each = (time.perf_counter() - t0) / len(todo)
    start = 0
    for (_, s, _), n in zip(todo, counts, strict=True):
        with store.lock(s.key):
            if not store.has(s.key):
                path = store.new_build_dir(s.key)
                info = parts.write(start, n, os.path.join(path, "data"), s.key[:64])
                store.publish(
                    path, s.key, shardone.shard_doc(spec, s, info, out, each), durable=False
                )
        start += n
    return len(todo)
