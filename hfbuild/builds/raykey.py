"""How a Ray worker recomputes a shard's key from what its task received.

Owns: `keyed`, a shard's key recomputed by the worker (the code key from the stage's code in
the shipped tree, a load shard's input from the blob id of its data file's bytes, sent with
the task and written into the task's scratch under its own name (`_data_path`: flat, a
folder of its own only for a name another shard of the task took), or a Hub shard's by the
Hub's id, a transform
shard's from the input shard it pulled (`shard_lookup`: its content hash, its own entry's or
its range's in the pack it is read from, with the form the driver's manifest gives), the
observed files' ids from their shipped copies; the digest of the keys before it, for
`with_indices`, as sent) and refused, with what differs and the node
(`other_key`), when it is not the driver's. The shards of one task share what keying them
may (`memo`): a load's manifest computed whole for its first shard, each other's data part
by itself from its own bytes.

Must never: read the driver's files, or accept a key it did not compute.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from hfbuild.core.errors import BuildError
from hfbuild.keys.manifest import Observed, Shard, ShardIn
from hfbuild.source import hub

if TYPE_CHECKING:
    from hfbuild.keys.manifest import Manifest
    from hfbuild.keys.place import Place


def shard_lookup(
    place: Place, key: str, doc: Mapping[str, Any], held: Mapping[str, Any] | None = None
) -> Any:
    """The input shard `key`'s result as the transform shard's key holds it (inputid.py):
    the content hash of the shard this worker pulled (checked on pull; `held`: what the
    pack it is a row range of records of it, that pack pulled and checked range by range),
    with the form of its stage's result as the driver's manifest says it (a form is of the
    whole list, which the worker does not pull; as the `with_indices` digest, the
    driver's)."""
    from hfbuild.keys import shards

    marker = doc.get("inputs")
    form = marker.get(shards.INPUT_MARKER) if isinstance(marker, dict) else None
    stored = held if held is not None else place.store.intact_manifest(key)

    def lookup(fp: str) -> Mapping[str, Any] | None:
        if fp != key or stored is None:
            return None
        if not isinstance(form, str):  # the driver keyed it by the shard's key (no form)
            return {"content_hash": stored.get("content_hash")}
        h = stored.get("content_hash")
        return {"content_hash": h, "form": form, "shard_hashes": {key: h}}

    return lookup


class ShardedInput(NamedTuple):
    """A transform shard's input as the worker knows it: one shard of a sharded stage, by
    key (so the transform's manifest is computed as the driver computes it)."""

    fingerprint: str
    shards: tuple[Any, ...]
    shard_list: list[Any]


class Keyed(NamedTuple):
    """A shard as the worker keyed it: the spec it is built with (a load's features as the
    driver read them), its manifest with it as its only shard, the shard, a load shard's
    data file in the task's scratch ("" for a transform shard), the seconds it took."""

    spec: Any
    m: Manifest
    s: Shard
    path: str
    seconds: float


def keyed(
    root: str,
    spec: Any,
    place: Place,
    job: dict[str, Any],
    data: bytes | None,
    scratch: str,
    memo: dict[str, Any] | None = None,
    held: Mapping[str, Any] | None = None,
) -> Keyed:
    """A shard's key recomputed from what the task received (the code key from the stage's
    code in the tree, a load shard's input from the blob id of the data file's bytes sent
    with it, written into `scratch`, the observed files' ids from their shipped copies; the
    digest of the keys before it, for `with_indices`, as sent), refused when it is not the
    driver's. `memo`: what the shards of one task share, kept between calls (one tree, one
    spec): a load's manifest is computed whole for its first shard, and for each other only
    its data part (`load_data`, as `stage_manifest` computes it: a load's shard code key
    leaves its files out); the observed files' ids once. `held`: a transform shard's input
    shard's facts when the worker reads it in place from its pack (`shard_lookup`)."""
    import dataclasses

    from hfbuild.keys import shards
    from hfbuild.keys.manifests import stage_manifest
    from hfbuild.source.gitstate import Snapshot

    t_key = time.perf_counter()
    sh: dict[str, Any] = job["shard"]
    name = str(job["stage"])
    label = str(sh["label"])
    snap = Snapshot(root) if memo is None else memo.setdefault("snap", Snapshot(root))
    if spec.kind == "load":
        # The data file is written outside the tree, under its own name (a load's code key
        # leaves its files out, and the shard's input is the id of the bytes).
        if data is None:
            raise BuildError(f"stage {name!r}, shard {label}: its data file was not sent.")
        path = _data_path(scratch, str(sh["key"]), os.path.basename(label))
        with open(path, "wb") as f:
            f.write(data)
        one = dataclasses.replace(spec, options={**spec.options, "data_files": [path]})
        m = _load_manifest(one, snap, place, memo)
        got = str(m.doc["data"]["files"][0][1])
        if hub.is_hub(label):  # keyed by the Hub's id of its bytes, not the git blob id
            got = hub.content_id(data, str(sh["input"]))
        content = ""
        decider = str(sh.get("decider") or "")
        code = shards.load_shard_code(m.doc, decider)
        if decider:  # the first data file's features, of the schema the driver read of it
            features = _features(spec, str(sh["schema"]), memo)  # (its id is keyed)
            spec = dataclasses.replace(spec, options={**spec.options, "features": features})
        mine, theirs = shards.load_code_doc(m.doc), shards.load_code_doc(job["doc"])
    else:
        path = ""
        key = str(sh["input"])
        stand_in = ShardedInput(
            key,
            (ShardIn(str(sh["split"]), key, label),),
            [Shard(str(sh["split"]), key, label, 0, key)],
        )
        done = cast("Mapping[str, Manifest]", {spec.inputs[0]: stand_in})
        m = stage_manifest(
            spec, snap, done, place.stat_cache, lookup=shard_lookup(place, key, job["doc"], held)
        )
        got, code = key, m.static_fingerprint
        content = m.shards[0].content if m.shards else ""
        mine, theirs = dict(m.doc), job["doc"]
    observed = observed_ids(sh["observed"], snap, place, memo)
    ins = ShardIn(str(sh["split"]), got, label, str(sh["before"]), content)
    m = dataclasses.replace(m, shards=(ins,), shard_code=code, observed=observed)
    s = m.shard_list[0]
    if s.key != sh["key"]:
        why = f"its data file {label} is {got}, not {sh['input']}" if got != sh["input"] else ""
        raise other_key(f"stage {name!r}, shard {label}", s.key, sh["key"], theirs, mine, why)
    return Keyed(spec, m, s, path, round(time.perf_counter() - t_key, 4))


def _features(spec: Any, schema: str, memo: dict[str, Any] | None) -> Any:
    """The features of a load's shards, decided by its first data file's schema as the
    driver sent it (`shardone.schema_features`); once per task for one schema."""
    from hfbuild.builds import shardone

    known = {} if memo is None else memo.setdefault("features", {})
    if schema not in known:
        known[schema] = shardone.schema_features(spec, schema)
    return known[schema]


def _data_path(scratch: str, key: str, name: str) -> str:
    """Where a load shard's data file is written in the task's scratch, under its own name
    `name`: in the scratch itself, or, when another shard of the task took that name, in a
    folder of its own (named by its key). Not a folder per shard: removing the scratch at
    the task's end cost ~1 ms a folder (ext4), on the task's path."""
    path = os.path.join(scratch, name)
    if os.path.lexists(path):
        path = os.path.join(scratch, key, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _load_manifest(one: Any, snap: Any, place: Place, memo: dict[str, Any] | None) -> Manifest:
    """The manifest of load `one` (a stage's spec with one shard's data file): whole the
    first time (`stage_manifest`), then the first one's with this file's data part."""
    import dataclasses

    from hfbuild.keys.fingerprint import load_data
    from hfbuild.keys.manifests import stage_manifest
    from hfbuild.source.closure import Context

    first: Manifest | None = None if memo is None else memo.get("load")
    if first is None:
        m = stage_manifest(one, snap, {}, place.stat_cache, lookup=place.store.intact_manifest)
        if memo is not None:
            memo["load"] = m
        return m
    data, files, _ = load_data(one.name, one.options, Context(snap), place.stat_cache)
    return dataclasses.replace(first, doc={**first.doc, "data": data}, data_files=files)


def observed_ids(observed: Any, snap: Any, place: Place, memo: dict[str, Any] | None) -> Observed:
    """The ids of the files `observed` names, from their shipped copies (once per task for
    one set: the tree does not change while it runs)."""
    from hfbuild.keys.fullkey import identify

    paths = tuple(str(p) for p, _ in observed)
    known = {} if memo is None else memo.setdefault("observed", {})
    if paths not in known:
        known[paths] = identify(list(paths), snap, place.stat_cache)
    got: Observed = known[paths]
    return got


def other_key(
    what: str, mine: str, theirs: str, driver_doc: Any, worker_doc: Any, why: str = ""
) -> BuildError:
    """The refusal of a unit whose key the worker computed from what it received is not the
    driver's: what differs (`why`, else the manifests' first differences), and what to do."""
    from hfbuild.keys.diff import diff

    changes = why or "; ".join(c.describe() for c in diff(driver_doc, worker_doc)[:5])
    return BuildError(
        f"{what}: the Ray worker computed the key {mine} from the tree it received, not the "
        f"driver's {theirs} ({changes or 'same parts'}), on node {node()}. Nothing was "
        f"published. The worker's environment differs from the driver's (packages, Python, "
        f"or a secret variable, which never travels: set it in every node's environment): "
        f"run the cluster from the same environment."
    )


def node() -> str:
    """This worker's node, for a message: its host name, and Ray's node id when it runs
    under Ray (nodes may share a host name)."""
    import socket

    name = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            return f"{name} (Ray node {ray.get_runtime_context().get_node_id()[:12]})"
    except Exception:  # naming the node must not hide the refusal it is part of
        pass
    return name
