"""The Ray worker's side of a unit of work.

Owns: `run_unit`, the Ray task: in the shipped tree (its working directory, first on its
path), with a node-local store ($HFBUILD_STORE on the worker, else `<tmp>/hfbuild-ray-<uid>`),
it pulls the unit's inputs from the remote (checked against the committed lock's pins the
driver sent; a refused input comes back as {"refused": ...} for the driver to build the unit
itself), recomputes the unit's key (a shard's: `manifest.shard_key` from the stage's code in
the tree, its input, the observed files' shipped copies) and refuses to build under another
one, builds with the local build's code (`local.build_here`, `shardunits.build_one`) and
pushes the result to the remote, first writer wins. A user error comes back as {"error": ...};
a build that listed a project folder the tree does not hold with its names (`Place.listed`:
a first build of code that lists it, before any record of the listing) as {"unlisted":
[its listing paths]}, with nothing published, for the driver to send it again with them.
`run_shards`, the Ray task of several shards of one stage: what they share set up once
(`_Task`), then each shard as above, its result yielded (a generator task) once it is
published; a user error ends the task at its shard, named by the shard's file; an unshipped
listing ends it too, every shard from that one on answered {"unlisted": ...}.

Must never: publish under a key it did not recompute or a listing its tree does not hold,
run project code the tree does not hold, or read the driver's files.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from hfbuild.core.errors import BuildError, HfbuildError, UnshippedListingError
from hfbuild.core.spec import Report, stored_rows
from hfbuild.keys.manifest import Shard, ShardIn
from hfbuild.source import hub

if TYPE_CHECKING:
    from hfbuild.keys.manifest import Manifest
    from hfbuild.keys.place import Place
    from hfbuild.store.remote import Remote
    from hfbuild.store.store import Store


class _Key(NamedTuple):
    """An input as the worker knows it: only its key."""

    fingerprint: str


def worker_store() -> str:
    """The node-local store a worker builds in and caches inputs in."""
    explicit = os.environ.get("HFBUILD_STORE")
    if explicit:
        return explicit
    return os.path.join(tempfile.gettempdir(), f"hfbuild-ray-{os.getuid()}")


def run_unit(job: dict[str, Any], spec_bytes: bytes, data: bytes | None = None) -> dict[str, Any]:
    """The Ray task of one unit (a whole stage, or one shard): build it from the shipped tree
    (the task's working directory) and `data` (a load shard's data file), and publish it to
    the remote. A user error comes back as {"error": message}."""
    root = os.getcwd()
    try:
        task = _Task(root, job, spec_bytes)
        if "shard" in job:  # one shard by itself (`run_shards` takes several)
            return _run_shard(task, job, data)
        return _run_unit(task, job)
    except UnshippedListingError as e:  # the driver ships those folders and sends it again
        return {"unlisted": e.paths}
    except HfbuildError as e:
        return {"error": _driver_paths(e, root, job)}


def run_shards(
    job: dict[str, Any],
    spec_bytes: bytes,
    shards: list[dict[str, Any]],
    datas: list[bytes | None],
) -> Iterator[dict[str, Any]]:
    """The Ray task of one or more shards of a stage (`job` is what they share; each of
    `shards` its own part, each of `datas` a load shard's data file): one result per shard,
    in order, yielded as soon as the shard is published, so the driver counts and pulls it
    while the next one builds. A user error ends the task with {"error": message} for the
    shard it came from, named by its file; the shards after it are not built."""
    root = os.getcwd()
    try:
        task = _Task(root, job, spec_bytes)
    except HfbuildError as e:
        yield {"error": _driver_paths(e, root, job)}
        return
    for n, (part, data) in enumerate(zip(shards, datas, strict=True)):
        label = str(part["shard"]["label"])
        try:
            yield _run_shard(task, {**job, **part}, data)
        except UnshippedListingError as e:
            # The shards after it share its tree, and would list the same folders: all are
            # sent again with them, none built here.
            for _ in shards[n:]:
                yield {"unlisted": e.paths}
            return
        except HfbuildError as e:
            yield {"error": _name_shard(_driver_paths(e, root, job), str(job["stage"]), label)}
            return


def _driver_paths(e: Exception, root: str, job: Mapping[str, Any]) -> str:
    """An error's message with the shipped tree's paths given as the driver's."""
    return str(e).replace(root, str(job["driver_root"]))


def _name_shard(message: str, stage: str, label: str) -> str:
    """A shard's error naming its file (a transform's own failure names its stage only)."""
    if label in message.split("\n", 1)[0]:
        return message
    head = f"stage {stage!r}"
    if head in message:
        return message.replace(head, f"{head} (shard {label})", 1)
    return f"{head} (shard {label}): {message}"


class _Task:
    """What every unit of one task shares: the shipped tree on the import path (the driver's
    directories off it), the spec unpickled from it, the node's store, the remote with the
    pins the driver sent, and a `Place` over them."""

    def __init__(self, root: str, job: Mapping[str, Any], spec_bytes: bytes) -> None:
        from ray import cloudpickle

        from hfbuild.keys.place import Place
        from hfbuild.source.datafiles import StatCache
        from hfbuild.store.lockfile import LOCK_NAME, Pin
        from hfbuild.store.remote import Remote
        from hfbuild.store.store import Store

        # Ray puts the driver's working directory on a worker's path (for clusters whose
        # nodes share a file system): the project's code must come from the shipped tree.
        driver = os.path.realpath(str(job["driver_root"]))
        sys.path[:] = [
            p
            for p in sys.path
            if not (os.path.realpath(p or ".") + os.sep).startswith(driver + os.sep)
        ]
        for rel in reversed(job["paths"]):
            p = os.path.normpath(os.path.join(root, rel))
            if p in sys.path:
                sys.path.remove(p)
            sys.path.insert(0, p)
        self.root = root
        self.spec = cloudpickle.loads(spec_bytes)
        self.store = Store(worker_store())
        pins = {str(k): Pin(str(h), str(s), bool(sh)) for k, (h, s, sh) in job["pins"].items()}
        self.remote = Remote(str(job["remote"]), lambda: pins)
        stat_cache = StatCache(os.path.join(self.store.root, "statcache.json"))
        lock = os.path.join(root, LOCK_NAME)
        spec = self.spec
        listed = frozenset(str(p) for p in job["listed"])  # the folders shipped with names
        self.place = Place(
            root, self.store, stat_cache, lock, LOCK_NAME, lambda: None, {spec.name: spec}, listed
        )

    def take_inputs(self, job: Mapping[str, Any]) -> str | None:
        """Have the unit's inputs in the node's store; a refusal's message, else None."""
        from hfbuild.store.remotereach import RefusedEntryError

        name = str(job["stage"])
        for dep, fp in job["inputs"].items():
            try:
                _take_input(self.store, self.remote, fp, dep)
            except RefusedEntryError as e:
                return str(e)
            if not self.store.has(fp):
                raise BuildError(
                    f"stage {name!r}: its input {dep!r} ({fp}) is not on the remote "
                    f"{self.remote.url}."
                )
        return None


def _run_unit(task: _Task, job: dict[str, Any]) -> dict[str, Any]:
    from hfbuild.builds.local import build_here
    from hfbuild.keys.manifests import stage_manifest
    from hfbuild.source.gitstate import Snapshot

    refused = task.take_inputs(job)
    if refused is not None:
        return {"refused": refused}
    spec, store, name = task.spec, task.store, str(job["stage"])
    inputs: dict[str, str] = job["inputs"]
    done = cast("Mapping[str, Manifest]", {d: _Key(fp) for d, fp in inputs.items()})
    # Its key holds its inputs' results as the entries pulled above record them (inputid.py).
    m = stage_manifest(
        spec, Snapshot(task.root), done, task.place.stat_cache, lookup=store.intact_manifest
    )
    if m.static_fingerprint != job["static"]:
        raise _other_key(f"stage {name!r}", m.static_fingerprint, job["static"], job["doc"], m.doc)
    t0 = time.perf_counter()
    with store.lock(m.static_fingerprint):
        if store.has(m.fingerprint):  # a retried task whose first attempt built it here
            doc = store.read_manifest(m.fingerprint) or {}
            report = Report(name, m.fingerprint, "built", stored_rows(doc), 0.0)
        else:
            report = build_here(task.place, spec, m, done)
    fp = report.fingerprint
    task.remote.push(store, fp, name)
    return {
        "fingerprint": fp,
        "rows": report.rows,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _take_input(store: Store, remote: Remote, fp: str, dep: str) -> None:
    """Have input `fp` in the node's store: pulled from the remote, checked against the
    committed lock's pins the driver sent (`input_pins`); one already held is compared with
    its pin too (pulled before the lock pinned it, or built here by another run). One this
    node built but did not publish (the remote was down, another node published first) is
    replaced by the remote's (`Remote.adopt`): what this task builds must rest on the
    published entry, or its entry (a selection of that input's rows) contradicts the remote.
    An input used from the node's store is marked used, as the driver's store marks what it
    uses, for `hfbuild gc` on the node (`raynodes`)."""
    from hfbuild.store.remotereach import RefusedEntryError

    held = store.intact_manifest(fp)
    if held is None:
        remote.pull(store, fp, dep)
        return
    if remote.adopt(store, fp, dep):
        return
    pin = remote.pins().get(fp)
    if pin is not None and held.get("content_hash") != pin.content_hash:
        raise RefusedEntryError(
            f"the node's store holds input {fp} ({dep}) with content hash "
            f"{held.get('content_hash')}, but the committed lock records {pin.content_hash}; "
            f"not used."
        )
    store.touch(fp)  # used: `hfbuild gc --keep-days` keeps it on this node


def _shard_lookup(place: Place, key: str, doc: Mapping[str, Any]) -> Any:
    """The input shard `key`'s result as the transform shard's key holds it (inputid.py):
    the content hash of the shard this worker pulled (checked on pull), with the form of
    its stage's result as the driver's manifest says it (a form is of the whole list,
    which the worker does not pull; as the `with_indices` digest, the driver's)."""
    from hfbuild.keys import shards

    marker = doc.get("inputs")
    form = marker.get(shards.INPUT_MARKER) if isinstance(marker, dict) else None
    stored = place.store.intact_manifest(key)

    def lookup(fp: str) -> Mapping[str, Any] | None:
        if fp != key or stored is None:
            return None
        if not isinstance(form, str):  # the driver keyed it by the shard's key (no form)
            return {"content_hash": stored.get("content_hash")}
        h = stored.get("content_hash")
        return {"content_hash": h, "form": form, "shard_hashes": {key: h}}

    return lookup


class _ShardedInput(NamedTuple):
    """A transform shard's input as the worker knows it: one shard of a sharded stage, by
    key (so the transform's manifest is computed as the driver computes it)."""

    fingerprint: str
    shards: tuple[Any, ...]
    shard_list: list[Any]


def _run_shard(task: _Task, job: dict[str, Any], data: bytes | None) -> dict[str, Any]:
    """One shard: its input taken from the remote (a refusal comes back as {"refused": ...}),
    its key recomputed from what the task received (the code key from the stage's code in
    the tree, a load shard's input from the blob id of the data file's bytes sent with it,
    the observed files' ids from their shipped copies; the digest of the keys before it, for
    `with_indices`, as sent), refused when it is not the driver's, then built and published
    to the remote."""
    refused = task.take_inputs(job)
    if refused is not None:
        return {"refused": refused}
    with tempfile.TemporaryDirectory(prefix="hfbuild-ray-data-") as d:
        return _run_shard_in(task, job, data, d)


def _run_shard_in(
    task: _Task, job: dict[str, Any], data: bytes | None, scratch: str
) -> dict[str, Any]:
    import dataclasses

    from hfbuild.builds import shardunits
    from hfbuild.keys import shards
    from hfbuild.keys.fullkey import identify
    from hfbuild.keys.manifests import stage_manifest
    from hfbuild.source.gitstate import Snapshot

    root, spec, place, remote = task.root, task.spec, task.place, task.remote
    sh: dict[str, Any] = job["shard"]
    name = str(job["stage"])
    label = str(sh["label"])
    snap = Snapshot(root)
    if spec.kind == "load":
        # The data file is written outside the tree, under its own name (a load's code key
        # leaves its files out, and the shard's input is the id of the bytes).
        if data is None:
            raise BuildError(f"stage {name!r}, shard {label}: its data file was not sent.")
        path = os.path.join(scratch, os.path.basename(label))
        with open(path, "wb") as f:
            f.write(data)
        one = dataclasses.replace(spec, options={**spec.options, "data_files": [path]})
        m = stage_manifest(one, snap, {}, place.stat_cache, lookup=place.store.intact_manifest)
        got = str(m.doc["data"]["files"][0][1])
        if hub.is_hub(label):  # keyed by the Hub's id of its bytes, not the git blob id
            got = hub.content_id(data, str(sh["input"]))
        content = ""
        decider = str(sh.get("decider") or "")
        code = shards.load_shard_code(m.doc, decider)
        if decider:  # the first data file's features, read by the driver (its id is keyed)
            import datasets

            features = datasets.Features.from_dict(sh["features"])
            spec = dataclasses.replace(spec, options={**spec.options, "features": features})
        mine, theirs = shards.load_code_doc(m.doc), shards.load_code_doc(job["doc"])
    else:
        key = str(sh["input"])
        stand_in = _ShardedInput(
            key,
            (ShardIn(str(sh["split"]), key, label),),
            [Shard(str(sh["split"]), key, label, 0, key)],
        )
        done = cast("Mapping[str, Manifest]", {spec.inputs[0]: stand_in})
        m = stage_manifest(
            spec, snap, done, place.stat_cache, lookup=_shard_lookup(place, key, job["doc"])
        )
        got, code = key, m.static_fingerprint
        content = m.shards[0].content if m.shards else ""
        mine, theirs = dict(m.doc), job["doc"]
    observed = identify([str(p) for p, _ in sh["observed"]], snap, place.stat_cache)
    ins = ShardIn(str(sh["split"]), got, label, str(sh["before"]), content)
    m = dataclasses.replace(m, shards=(ins,), shard_code=code, observed=observed)
    s = m.shard_list[0]
    if s.key != sh["key"]:
        why = f"its data file {label} is {got}, not {sh['input']}" if got != sh["input"] else ""
        raise _other_key(f"stage {name!r}, shard {label}", s.key, sh["key"], theirs, mine, why)
    t0 = time.perf_counter()
    fp, rows, read = shardunits.build_one(place, spec, m, s, int(sh["offset"]))
    remote.push(place.store, fp, f"{name} {label}")
    return {
        "fingerprint": fp,
        "rows": rows,
        "observed": [p for p, _ in read],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _other_key(
    what: str, mine: str, theirs: str, driver_doc: Any, worker_doc: Any, why: str = ""
) -> BuildError:
    """The refusal of a unit whose key the worker computed from what it received is not the
    driver's: what differs (`why`, else the manifests' first differences), and what to do."""
    from hfbuild.keys.diff import diff

    changes = why or "; ".join(c.describe() for c in diff(driver_doc, worker_doc)[:5])
    return BuildError(
        f"{what}: the Ray worker computed the key {mine} from the tree it received, not the "
        f"driver's {theirs} ({changes or 'same parts'}), on node {_node()}. Nothing was "
        f"published. The worker's environment differs from the driver's (packages, Python, "
        f"or a secret variable, which never travels: set it in every node's environment): "
        f"run the cluster from the same environment."
    )


def _node() -> str:
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
