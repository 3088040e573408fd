"""The Ray worker's side of a unit of work. Owns: `run_unit`, the Ray task: in the shipped tree
(materialized once on the node, its working directory and first on its path for the task's
duration, the task's variables set, nothing of it left behind: `raywarm`), with a node-local
store ($HFBUILD_STORE on the worker, else `<tmp>/hfbuild-ray-<uid>`), it pulls the unit's
inputs from the remote (checked against the committed lock's pins the driver sent; a refused
input comes back as {"refused": ...} for the driver to build the unit itself), recomputes the
unit's key (a shard's: `manifest.shard_key` from the stage's code in the tree, its input, the
observed files' shipped copies) and refuses to build under another one, builds with the local
build's code (`local.build_here`, `shardunits.build_one`) and pushes the result to the remote,
first writer wins. A user error comes back as {"error": ...}; a build that listed a project
folder the tree does not hold with its names (`Place.listed`: a first build of code that lists
it, before any record of the listing) as {"unlisted": [its listing paths]}, with nothing
published, for the driver to send it again with them. `run_shards`, the Ray task of several
shards of one stage: what they share set up once (`_Task`), then each shard as above, its load
shards built by one call (`rayloads`), its map shards built together under one observation and
written straight into packs (`raymaps`); its load and map shards pushed as packs (`raypacks`:
one entry, a few requests, a pack), each pack's push on one of a few threads while the next
shards build, each shard's result yielded (a generator task) once it is published, in order,
naming its pack; a user error ends the task at its shard, named by the shard's file; an
unshipped listing ends it too, every shard from that one on answered {"unlisted": ...}. A pack
or shard this worker published that is small (`SEND_BYTES`) goes back with the results, files
and manifest (`sent_entry`), so the driver need not pull it. A map shard's input shard kept in
a pack (`input_pack` in its job) is pulled as its pack, once per task, its range checked
against its pin, and read in place from the pack (`raypacks.take_packed`: its row, as a local
build reads a packed input shard by its list's row), not written out as an entry of its own.

Must never: publish under a key it did not recompute or a listing its tree does not hold,
run project code the tree does not hold, or read the driver's files.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from hfbuild.builds import raykey, rayloads, raymaps, raypacks, raywarm, shardunits
from hfbuild.core.errors import BuildError, HfbuildError, UnshippedListingError
from hfbuild.core.spec import Report, stored_rows

if TYPE_CHECKING:
    from hfbuild.keys.manifest import Manifest
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
    root = job.get("driver_root", "")
    try:
        with raywarm.tree_dir(job) as root, raywarm.inside(root, job):
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
    in order, yielded as soon as the shard is published (its push runs on a thread while the
    next shard builds), so the driver counts and takes it while the next one builds. A user
    error ends the task with {"error": message} for the shard it came from, named by its
    file; the shards after it are not built. The whole task runs in its tree (`raywarm`)."""
    root = job.get("driver_root", "")
    with contextlib.ExitStack() as held:
        try:
            root = held.enter_context(raywarm.tree_dir(job))
        except HfbuildError as e:
            yield {"error": _driver_paths(e, root, job)}
            return
        held.enter_context(raywarm.inside(root, job))
        yield from _run_shards(root, job, spec_bytes, shards, datas)


def _run_shards(
    root: str,
    job: dict[str, Any],
    spec_bytes: bytes,
    shards: list[dict[str, Any]],
    datas: list[bytes | None],
) -> Iterator[dict[str, Any]]:
    """`run_shards` in the task's tree."""
    try:
        task = _Task(root, job, spec_bytes)
    except HfbuildError as e:
        yield {"error": _driver_paths(e, root, job)}
        return
    # Shards' pushes run on a few threads while the next shards build; results in order.
    pushes = concurrent.futures.ThreadPoolExecutor(PUSHES, thread_name_prefix="hfbuild-push")
    pending: collections.deque[tuple[str, concurrent.futures.Future[list[dict[str, Any]]]]]
    pending = collections.deque()
    scratch = tempfile.mkdtemp(prefix="hfbuild-ray-data-")
    chunk: list[tuple[dict[str, Any], dict[str, Any]]] = []  # built, to publish as a pack
    size = [0]  # the bytes of the files of the shards in `chunk`

    def flush() -> None:
        """The shards built since the last push, pushed (as packs) on a thread."""
        if chunk:
            label = str(chunk[0][0]["shard"]["label"])
            push = functools.partial(_publish_chunk, task, list(chunk))
            pending.append((label, pushes.submit(push)))
            chunk.clear()
            size[0] = 0

    def ready(all_of_them: bool) -> Iterator[dict[str, Any]]:
        """The results of the pushes at the head of the queue that are done (or all of
        them, waited for), in order; an error ends them."""
        if all_of_them:
            flush()
        while pending and (all_of_them or pending[0][1].done()):
            for out in _published(task, job, *pending.popleft()):
                yield out
                if "error" in out:
                    pending.clear()
                    raise _Stop

    try:
        keyed = _built_together(task, job, shards, datas, scratch)
        try:
            mapped = raymaps.build_together(task, job, shards, scratch)
        except UnshippedListingError as e:  # none published: all sent again with them
            for _ in shards:
                yield {"unlisted": e.paths}
            return
        for i, (part, data) in enumerate(zip(shards, datas, strict=True)):
            label = str(part["shard"]["label"])
            one = {**job, **part}
            try:
                built = mapped.get(i) or _build_shard(task, one, data, scratch, keyed.get(i))
            except UnshippedListingError as e:
                # The shards after it share its tree, and would list the same folders: all
                # are sent again with them, none built here.
                yield from ready(True)
                for _ in shards[i:]:
                    yield {"unlisted": e.paths}
                return
            except HfbuildError as e:
                yield from ready(True)  # the shards before it are published: theirs first
                yield {"error": _name_shard(_driver_paths(e, root, job), str(job["stage"]), label)}
                return
            if "refused" in built:
                flush()
                done: concurrent.futures.Future[list[dict[str, Any]]] = concurrent.futures.Future()
                done.set_result([built])
                pending.append((label, done))
            else:
                chunk.append((one, built))
                size[0] += raypacks.entry_bytes(task.store, str(built["fingerprint"]))
                if len(chunk) >= raypacks.PACK_SHARDS or size[0] >= raypacks.PACK_BYTES:
                    flush()
            yield from ready(False)
        yield from ready(True)
    except _Stop:
        return
    finally:
        pushes.shutdown(wait=True)
        shutil.rmtree(scratch, ignore_errors=True)


# Pushes of one task's shards under way at once (each a few requests, mostly waiting).
PUSHES = 4


class _Stop(Exception):
    """A shard's push failed: its error was yielded, the task ends."""


def _published(
    task: _Task,
    job: Mapping[str, Any],
    label: str,
    push: concurrent.futures.Future[list[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """The results of shards pushed together once their push is done; a failed push as
    its first shard's error."""
    try:
        return push.result()
    except HfbuildError as e:
        return [{"error": _name_shard(_driver_paths(e, task.root, job), str(job["stage"]), label)}]


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
    """What every unit of one task shares: the spec unpickled from the shipped tree (on the
    import path, `raywarm.inside`), the node's store, the remote with the
    pins the driver sent, and a `Place` over them."""

    def __init__(self, root: str, job: Mapping[str, Any], spec_bytes: bytes) -> None:
        from ray import cloudpickle

        from hfbuild.keys.place import Place
        from hfbuild.source.datafiles import StatCache
        from hfbuild.store.lockfile import LOCK_NAME, Pin
        from hfbuild.store.remote import Remote
        from hfbuild.store.store import Store

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
        self.packs: set[str] = set()  # the input packs this task has taken
        # Its input shards read in place from their packs: key -> the row a list records.
        self.in_pack: dict[str, list[Any]] = {}
        self.built: dict[str, str] = {}  # shards its loads built together -> their pack
        self.keys: dict[str, Any] = {}  # what keying its shards shares (`raykey.keyed`)
        # The rows of the packs its loads built and of the input packs it took.
        self.packed = raypacks.PackRows(self.store)
        self.pushed = raypacks.Pushed()  # the packs its chunks pushed, each once

    def take_inputs(self, job: Mapping[str, Any]) -> str | None:
        """Have the unit's inputs in the node's store; a refusal's message, else None."""
        from hfbuild.store.remotereach import RefusedEntryError

        name = str(job["stage"])
        packed = job.get("input_pack")
        for dep, fp in job["inputs"].items():
            try:
                if isinstance(packed, dict):
                    take = functools.partial(_take_input, self.store, self.remote)
                    row = raypacks.take_packed(
                        self.place, self.remote, fp, dep, packed, self.packs, take, self.packed
                    )
                    if row is not None:
                        self.in_pack[fp] = row
                        continue
                else:
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
    snap = Snapshot(task.root)
    m = stage_manifest(spec, snap, done, task.place.stat_cache, lookup=store.intact_manifest)
    if m.static_fingerprint != job["static"]:
        raise raykey.other_key(
            f"stage {name!r}", m.static_fingerprint, job["static"], job["doc"], m.doc
        )
    # What its builds read at run time as the driver's key assumes it (this node's store
    # may hold no record of it, or an older one), identified from the tree's copies: its
    # units are built once under that key, not built, found to read more and built again.
    read = raykey.observed_ids(job.get("observed", []), snap, task.place, task.keys)
    m = dataclasses.replace(m, observed=read)
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


def _run_shard(task: _Task, job: dict[str, Any], data: bytes | None) -> dict[str, Any]:
    """One shard by itself: built (`_build_shard`), then published (`_publish_shard`)."""
    with tempfile.TemporaryDirectory(prefix="hfbuild-ray-data-") as scratch:
        built = _build_shard(task, job, data, scratch)
    if "refused" in built:
        return built
    return _publish_shard(task, job, built)


def _build_shard(
    task: _Task,
    job: dict[str, Any],
    data: bytes | None,
    scratch: str,
    keyed: raykey.Keyed | None = None,
) -> dict[str, Any]:
    """One shard: its input taken from the remote (a refusal comes back as {"refused": ...}),
    its key recomputed (`_keyed`, unless `keyed` is it already), then built in the node's
    store; its result, to be published (`_publish_shard`)."""
    t0 = time.perf_counter()
    refused = task.take_inputs(job)
    if refused is not None:
        return {"refused": refused}
    took = time.perf_counter() - t0
    row = task.in_pack.get(str(job["shard"]["input"])) if task.spec.kind != "load" else None
    held = row[4] if row is not None else None  # a packed input shard's facts: its hash
    k = keyed or raykey.keyed(task.root, task.spec, task.place, job, data, scratch, task.keys, held)
    t1 = time.perf_counter()
    pack = task.built.get(k.s.key)
    facts = task.packed(pack, k.s.key) if pack is not None else None
    if pack is not None and facts is not None:  # loaded with the task's others, in a pack
        fp, rows, read = k.s.key, facts["rows"], k.m.observed
    else:
        offset = int(job["shard"]["offset"])
        fp, rows, read = shardunits.build_one(task.place, k.spec, k.m, k.s, offset, row)
        pack = None
    t2 = time.perf_counter()
    out = {
        "fingerprint": fp,
        "rows": rows,
        "observed": [p for p, _ in read],
        "seconds": round(t2 - t1, 3),
        # Where a shard's time went on the worker (bench/bench_ray.py adds them up).
        "timings": {"input": round(took, 4), "key": k.seconds, "build": round(t2 - t1, 4)},
    }
    if pack is not None:
        out["packed"] = pack  # for `raypacks.publish_chunk`, which pushes that pack
    return out


def _built_together(
    task: _Task,
    job: dict[str, Any],
    shards: list[dict[str, Any]],
    datas: list[bytes | None],
    scratch: str,
) -> dict[int, raykey.Keyed]:
    """A task's load shards keyed up front (up to the first refused), and those built by one
    `load_dataset` call when they may be (`rayloads.build_together`); each one's key by its
    position in the task."""
    if task.spec.kind != "load" or len(shards) < 2:
        return {}
    out: dict[int, raykey.Keyed] = {}
    for i, (part, data) in enumerate(zip(shards, datas, strict=True)):
        try:
            one = {**job, **part}
            out[i] = raykey.keyed(task.root, task.spec, task.place, one, data, scratch, task.keys)
        except HfbuildError:
            break  # that shard fails in turn, after those before it are published
    if len(out) >= 2:
        t0 = time.perf_counter()
        with contextlib.suppress(HfbuildError):  # each is then built by itself, as reported
            task.built = rayloads.build_together(
                task.place, out[0].spec, [(k.m, k.s, k.path) for k in out.values()], scratch
            )
        each = (time.perf_counter() - t0) / len(out)
        out = {i: k._replace(seconds=round(k.seconds + each, 4)) for i, k in out.items()}
    return out


# A shard published by its worker whose files add up to at most this travels back to the
# driver with its result (through Ray's object store), instead of the driver pulling it
# from the remote: a few requests and a content check less per shard.
SEND_BYTES = 1024 * 1024


def _publish_chunk(task: _Task, chunk: list[raypacks.Built]) -> list[dict[str, Any]]:
    """The shards `chunk` holds pushed, as packs where they may be (`raypacks`)."""
    t0 = time.perf_counter()
    alone = functools.partial(_publish_shard, task)
    out = raypacks.publish_chunk(
        task.place, task.remote, task.spec, chunk, alone, SEND_BYTES, task.pushed
    )
    each = round((time.perf_counter() - t0) / len(chunk), 4)
    for res in out:
        if "pack" in res:
            res["timings"]["push"] = each
    return out


def _publish_shard(task: _Task, job: Mapping[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    """Push the shard `res` says was built to the remote (first writer wins); when this
    push published it and it is small, its entry (`sent_entry`) goes back with the result."""
    from hfbuild.store.remote import sent_entry

    t0 = time.perf_counter()
    fp = str(res["fingerprint"])
    label = f"{job['stage']} {job['shard']['label']}"
    if task.remote.push_built(task.store, fp, label):
        entry = sent_entry(task.store, fp, SEND_BYTES)
        if entry is not None:
            res["entry"] = entry
    res["timings"]["push"] = round(time.perf_counter() - t0, 4)
    return res
