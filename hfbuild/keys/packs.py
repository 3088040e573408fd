"""A pack's key: the entry holding the rows of shards a load built together.

Owns: `pack_key`, the key of a pack (one stored entry whose one Arrow file holds the rows of
several shards, each a row range of it, listed in its manifest's `pack`: shard key, from,
to, content hash, label). A pack holds exactly the shards whose keys it is keyed by, in
order, so two builds of the same shards make the same pack (the first to publish it wins,
as for a shard), and a shard key keeps naming one content wherever its rows are stored.

Must never: key anything but a pack, import `datasets` or anything above the keys.
"""

from __future__ import annotations

from collections.abc import Sequence

from hfbuild.core import canonical


def pack_key(shard_keys: Sequence[str]) -> str:
    """The key of the pack holding the shards `shard_keys`, in that order."""
    return canonical.digest(canonical.dumps({"pack": list(shard_keys)}).encode())
