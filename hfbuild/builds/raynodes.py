"""Collecting the stores of a Ray cluster's nodes: `hfbuild gc` with the Ray executor.

Each node keeps what its workers pulled and built in a store of its own
(`rayworker.worker_store`), and the trees its tasks ran in (`raywarm`). `collect_nodes` runs
one Ray task on every alive node, pinned to it,
that collects that store by the local gc's rules (`Store.gc`): the fingerprints the driver's
lock files keep (the driver computes them; a node holds no lock file), what a kept entry
references, entries used within the given time, build leftovers unless their build lock is
held; and the node's trees no task used within that time nor holds now.

Owns: the node tasks of gc (`collect_nodes` on the driver, `collect_node` on each node) and
what each node removed (`NodeCollected`).

Must never: decide what a node keeps beyond the keep set it is sent and the store's and
trees' own rules, create a node's store, or import ray outside `collect_nodes`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

from hfbuild.builds import raywarm
from hfbuild.builds.rayworker import worker_store
from hfbuild.core.errors import BuildError, ConfigError


class NodeCollected(NamedTuple):
    """What gc removed on one node: its name (host and Ray node id), its store, and each
    removed path (relative to the store) with its size; `error` when its task failed."""

    node: str
    store: str
    gone: list[tuple[str, int]]
    error: str = ""


def collect_node(keep: list[str], keep_seconds: float, dry_run: bool) -> dict[str, Any]:
    """The node's task: collect its store (none there: nothing to do, nothing created) and
    the trees its tasks ran in that none used within `keep_seconds` (`raywarm.collect_trees`;
    named relative to the store, as `../hfbuild-ray-trees-<uid>/<digest>`, a task's copy of
    one as `<digest>.<n>`)."""
    from hfbuild.store.store import Store

    root = worker_store()
    gone = raywarm.collect_trees(keep_seconds, dry_run=dry_run)
    if os.path.isdir(root):
        gone = Store(root).gc(set(keep), keep_seconds, dry_run=dry_run) + gone
    return {"store": root, "gone": [[os.path.relpath(p, root), n] for p, n in gone]}


def collect_nodes(keep: set[str], keep_seconds: float, *, dry_run: bool) -> list[NodeCollected]:
    """Collect the store of every alive node of the cluster (Ray's RAY_ADDRESS, else a
    cluster running here), one task per node; a node whose task fails is reported with its
    error, the others still collected."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        try:  # workers' output stays in Ray's logs, as for a build
            ray.init(log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as e:
            where = os.environ.get("RAY_ADDRESS") or "a cluster running on this machine"
            raise ConfigError(
                f"gc cannot reach the Ray cluster ({where}): {e}. Start it, set RAY_ADDRESS "
                f"to its head, or collect this store alone with --executor local."
            ) from e
    nodes = sorted(
        (n for n in ray.nodes() if n.get("Alive")),  # type: ignore[no-untyped-call]
        key=lambda n: (str(n.get("NodeManagerHostname")), str(n["NodeID"])),
    )
    if not nodes:
        raise BuildError("the Ray cluster has no alive node: nothing to collect there.")
    # No CPU asked: a node busy building still runs its gc (which leaves running builds'
    # directories alone).
    task = ray.remote(num_cpus=0, max_retries=0)(collect_node)
    refs = [
        task.options(
            name="hfbuild:gc",
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
        ).remote(sorted(keep), keep_seconds, dry_run)
        for n in nodes
    ]
    out = []
    for n, ref in zip(nodes, refs, strict=True):
        name = f"{n.get('NodeManagerHostname')} (Ray node {str(n['NodeID'])[:12]})"
        try:
            res = ray.get(ref)
        except ray.exceptions.RayError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            out.append(NodeCollected(name, "", [], f"its gc task failed: {first}"))
            continue
        gone = [(str(p), int(size)) for p, size in res["gone"]]
        out.append(NodeCollected(name, str(res["store"]), gone))
    return out
