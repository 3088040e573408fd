"""Building units of work on a Ray cluster, sharing them through the remote cache.

The driver (the process running doit or `hfbuild build`) computes every key, as always; only
units whose entry is missing travel. A whole-stage unit becomes one Ray task (a stage's shard
units share a few, below), which carries the *fingerprinted tree*: the files the unit's key
names (closure code, file_deps, data files, files earlier builds read at run time) at exactly
the blob ids the key holds, read from git's object database (the work tree only for uncommitted
files, checked against the id), plus pyproject.toml. Nothing the worker happens to have on disk
is used. A task asks for no `runtime_env`, so any idle worker of the job runs it, stage after
stage: the tree travels packed in Ray's object store, once per distinct tree, and the worker
runs the task in its node's copy of it, leaving no module, variable or path of it behind
(`raywarm`). The task pulls the unit's inputs from the remote, each checked as the driver's
pulls are: against what the committed lock records for its key (the driver sends the pins of
the entries the worker may pull, `input_pins`). A worker refusing an input returns the refusal;
the driver, whose store holds the input, builds that unit here with a `RemoteWarning` (the
cluster cannot build it from the remote until the forged entry is deleted). The task then
recomputes the unit's static key from what it received (the shipped tree is not a git work
tree: its files are identified by the blob ids of their bytes, the same ids), refuses to build
under a different one, builds with the same code as a local build (`local.build_here`), and
publishes to the remote first-writer-wins (`remote.Remote.push`). The driver then pulls the
entry into its own store, so freshness is still "the store holds the key".

A sharded stage travels as its missing shards (`shardunits` splits it), consecutive ones
coalesced into a few generator tasks (`coalesce`, `rayworker.run_shards`: each shard's result
yielded as it is published, the driver pulling it on a thread meanwhile): all its shards
share one tree (the stage's code; a load's data files are left out), a transform shard's
task pulls only its input shard, a load shard's task receives its data file's bytes as its
argument (a tree per file would be packed and sent once per shard). The worker
recomputes the shard's key (`manifest.shard_key`: the code key from the tree, the input from
what it pulled or the bytes' blob id, the observed files' ids from their shipped copies) and
refuses another; it builds with `shardone`'s code (`shardunits.build_one`) and publishes
the shard under the key of what it read, a load's or a map's as packs (`raypacks`). The
driver takes each shard or pack (`Remote.take`: a small one from the result, any other
pulled), and `shardunits` publishes the stage's list as a local build does; it is pushed.

What travels is `raytree`'s (the tree, a load shard's data bytes, the job); the worker's side
is `rayworker`'s, in the tree and the process state `raywarm` gives each task.

Owns: the driver's side: submitting the Ray tasks, waiting with per-stage progress (units,
or a sharded stage's shards done / total), cancelling outstanding tasks on Ctrl-C, turning a
task's failure into the same error a local build gives, sending again a unit whose build
listed folders its tree lacked (`raytree.with_listings`), and fetching what workers published.

Must never: import ray outside a build on the Ray executor, publish under a key the worker did
not recompute, run code the shipped tree does not hold, or build a unit here other than one
whose worker refused an input.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from hfbuild.builds import rayconnect, raypacks, rayshare, raytree, shardunits
from hfbuild.builds.local import build_here
from hfbuild.builds.raytree import shard_data, shipped_files, task_args
from hfbuild.builds.rayworker import run_shards, run_unit
from hfbuild.builds.units import Unit
from hfbuild.core import threads
from hfbuild.core.errors import BuildError, RemoteWarning
from hfbuild.core.spec import Report

if TYPE_CHECKING:
    from hfbuild.keys.place import Place
    from hfbuild.store.remote import Remote

# Held while a fetched result's run-time reads are added to its stage's record.
_RECORDING = threading.Lock()

# A worker killed mid-task (OOM, preemption, SIGKILL) is retried this many times by Ray.
MAX_RETRIES = 3


class RayExecutor:
    """Builds units as Ray tasks; the cluster is Ray's own RAY_ADDRESS (else `ray.init()`'s
    default: a running local cluster, or a new one)."""

    def build(self, place: Place, unit: Unit) -> Report:
        """A whole stage as one task; a sharded stage as its missing shards (`shardunits`),
        coalesced into a few tasks, its entry then published here and pushed for every
        other clone."""
        if unit.shard is None and unit.manifest.shards is not None:
            remote = rayshare.remote_of(place, unit.spec.name)
            # The stage's list, written after the last result, needs datasets: imported while
            # the cluster works (shardunits imports it for a load's features already).
            threads.import_meanwhile("hfbuild.builds.builder")
            report = shardunits.build(place, self, unit)
            rayshare.share(place, remote, unit.spec.name, report.fingerprint)
            return report
        return build_units(place, [unit], unit.spec.name)[0]

    def build_all(self, place: Place, units: Sequence[Unit], label: str) -> list[Report]:
        """All submitted at once: the cluster runs them in parallel (a whole sharded stage
        among them is split into its shards' units, stage after stage)."""
        if any(u.shard is None and u.manifest.shards is not None for u in units):
            return [self.build(place, u) for u in units]
        return build_units(place, units, label)


def build_units(
    place: Place, units: Sequence[Unit], label: str, sent: Sequence[Unit] | None = None
) -> list[Report]:
    """Build `units` (one stage's, or one stage's shards) on the cluster and publish each
    into `place.store`: whole-stage units one task each, shards coalesced into few tasks
    (`coalesce`). Each result is pulled as soon as its task yields it, a few at a time,
    while the cluster works on; a unit whose build listed folders its tree lacked, sent
    again with them (`sent`). The caller holds the lock of each unit's static fingerprint."""
    remote = rayshare.remote_of(place, label)
    _connect()
    rayshare.ensure_inputs(place, remote, units if sent is None else ())  # pushed the first time
    trees: dict[tuple[tuple[str, str], ...], list[Any]] = {}  # each distinct tree put once
    tasks = _submit_all(place, remote, sent or units, trees)
    t0 = time.perf_counter()
    rows = raypacks.PackRows(place.store)  # each pack the results name read once
    pulls: threads.Pool[tuple[int, Mapping[str, Any]], Report] = threads.Pool(
        lambda got: _fetch(place, remote, units[got[0]], got[1], time.perf_counter() - t0, rows)
    )
    refused: dict[int, str] = {}
    unlisted: dict[int, list[str]] = {}  # what the unit's build listed that its tree lacked
    order: list[int] = []  # the units in the order their results arrived

    def arrived(i: int, res: Mapping[str, Any]) -> None:
        if "refused" in res:
            refused[i] = str(res["refused"])
        elif "unlisted" in res:
            unlisted[i] = [str(p) for p in res["unlisted"]]
        else:
            order.append(i)
            pulls.submit((i, res))

    try:
        _wait(tasks, label, units, arrived)
        fetched = dict(zip(order, pulls.results(), strict=True))
    finally:
        pulls.close()
    if unlisted:  # with what any of them listed (shards of one stage share a tree)
        again, paths = sorted(unlisted), sorted({p for ps in unlisted.values() for p in ps})
        more = [raytree.with_listings(place, (sent or units)[i], paths, unlisted[i]) for i in again]
        redone = build_units(place, [units[i] for i in again], label, more)
        fetched.update(zip(again, redone, strict=True))
    reports: list[Report] = []
    for i, unit in enumerate(units):
        if i in refused:
            reports.append(_build_refused_here(place, unit, refused[i]))
            continue
        got = fetched[i]
        if isinstance(got, Exception):
            raise got
        reports.append(got)
    return reports


def _build_refused_here(place: Place, unit: Unit, why: str) -> Report:
    """A unit whose worker refused an input the remote serves (its content is not what the
    committed lock records): the cluster cannot build it from the remote, and this
    machine's store holds the input it was built or checked with, so it is built here, with
    a warning naming the remote entry. The caller holds the lock of its static
    fingerprint."""
    what = f"stage {unit.spec.name!r}"
    if unit.shard is not None:
        what += f", shard {unit.shard.label}"
    warnings.warn(
        f"{what}: a Ray worker refused its input: {why} Building it here instead.",
        RemoteWarning,
        stacklevel=2,
    )
    if unit.shard is not None:
        return shardunits.build_shard_here(place, unit)
    return build_here(place, unit.spec, unit.manifest, unit.inputs)


def _connect() -> None:
    """Connected to the cluster (`rayconnect`: begun when the executor was chosen)."""
    rayconnect.connected()


# A task holds consecutive shards of one stage up to either budget: then the task's fixed
# cost (a round trip to the cluster, the worker's setup) is paid once for many tiny shards,
# while a shard of real work still travels alone. Measured with bench/bench_ray.py.
TASK_ROWS = 100_000
TASK_BYTES = 64 * 1024 * 1024
# At most this many shards of no size in one task: what a retried task redoes (all of them).
TASK_SHARDS = 256


class _Task(NamedTuple):
    """One submitted task: what `ray.wait` waits on (a task's ref, or a generator of one
    result per shard) and the indices of the units whose results it brings, in order."""

    waitable: Any
    units: list[int]


def _submit_all(
    place: Place, remote: Remote, units: Sequence[Unit], trees: dict[Any, list[Any]]
) -> list[_Task]:
    shards = [i for i, u in enumerate(units) if u.shard is not None]
    out = [
        _Task(_submit(place, remote, u, trees), [i]) for i, u in enumerate(units) if u.shard is None
    ]
    if shards:
        weights = [_weight(place, units[i]) for i in shards]
        for group in coalesce(weights, _cluster_cpus()):
            idx = [shards[g] for g in group]
            out.append(_Task(_submit_shards(place, remote, [units[i] for i in idx], trees), idx))
    return out


def _weight(place: Place, unit: Unit) -> tuple[int, int]:
    """(rows, bytes) a shard unit reads, as far as the driver knows without reading it: a
    load shard's data file's size (its rows are not known before it is read), a transform
    shard's input shard's rows and size from its manifest in this store."""
    assert unit.shard is not None
    if unit.spec.kind == "load":
        try:
            return 0, os.path.getsize(os.path.join(place.root, unit.shard.label))
        except OSError:
            return 0, 0
    doc = place.store.read_manifest(unit.shard.input)
    if doc is None:  # a row range of a pack its input's list names
        return raypacks.packed_weight(place, unit)
    files = doc.get("files") if isinstance(doc.get("files"), dict) else {}
    return int(doc.get("rows") or 0), sum(int(v) for v in (files or {}).values())


def coalesce(weights: Sequence[tuple[int, int]], cpus: int) -> list[list[int]]:
    """Consecutive shards (by index into `weights`, each its (rows, bytes)) grouped into
    tasks: as few as the budgets allow (`TASK_ROWS`, `TASK_BYTES`, `TASK_SHARDS`), but at
    least one per CPU of the cluster while there are shards enough, of about equal cost."""
    if not weights:
        return []
    costs = [max(r / TASK_ROWS, b / TASK_BYTES) + 1 / TASK_SHARDS for r, b in weights]
    total = sum(costs)
    n = min(len(costs), max(math.ceil(total), cpus, 1))
    target = total / n
    groups: list[list[int]] = [[] for _ in range(n)]
    done = 0.0
    for i, c in enumerate(costs):  # each shard to the task its cost's midpoint falls in
        groups[min(n - 1, int((done + c / 2) / target))].append(i)
        done += c
    return [g for g in groups if g]


def _cluster_cpus() -> int:
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)  # type: ignore[no-untyped-call]
    return max(1, int(cpus))


def _submit(place: Place, remote: Remote, unit: Unit, trees: dict[Any, list[Any]]) -> Any:
    job, spec = task_args(place, remote, unit)
    job.update(_env(place, unit, trees))
    data = shard_data(place, unit)
    opts = raytree.task_options(place, unit.manifest)
    return _task().options(name=f"hfbuild:{unit.spec.name}", **opts).remote(job, spec, data)


def _env(place: Place, unit: Unit, trees: dict[Any, list[Any]]) -> dict[str, Any]:
    """What a task takes its place in a worker with (`raywarm`), its tree not in a
    `runtime_env` (a worker serves only tasks of its own runtime_env: one per stage would
    start a worker process per stage): packed and put in Ray's object store once per distinct
    tree (`tree`: its digest and the reference, nested, so Ray fetches it only where a node
    lacks it)."""
    import ray

    files = tuple(shipped_files(unit.manifest, unit.shard))
    if files not in trees:
        name, packed = raytree.pack(place, files)
        trees[files] = [name, [ray.put(packed)]]
    return {"tree": trees[files]}


def _submit_shards(
    place: Place,
    remote: Remote,
    units: Sequence[Unit],
    trees: dict[Any, list[Any]],
) -> Any:
    """One task building `units`, shards of one stage, in order (`rayworker.run_shards`): what
    they share travels once, each shard's own part (its key, input, offset, data file) with it
    (`shards_args`)."""
    common, spec, parts, datas = shards_args(place, remote, units)
    first, last = units[0].shard, units[-1].shard
    assert first is not None and last is not None
    name = f"hfbuild:{units[0].spec.name}:{first.label}"
    if len(units) > 1:
        name += f"..{last.label}"
    common.update(_env(place, units[0], trees))
    opts = raytree.task_options(place, units[0].manifest)
    return _shards_task().options(name=name, **opts).remote(common, spec, parts, datas)


def shards_args(
    place: Place, remote: Remote, units: Sequence[Unit]
) -> tuple[dict[str, Any], bytes, list[dict[str, Any]], list[bytes | None]]:
    """`rayworker.run_shards`' arguments for `units`, shards of one stage: the job they
    share, the pickled spec, each one's own part and data file."""
    job, spec = task_args(place, remote, units[0])
    own = ("inputs", "shard", "input_pack")
    common = {k: v for k, v in job.items() if k not in own}
    parts, datas, pins = [], [], {}
    sh = job.get("shard") or {}
    decided = {k: sh[k] for k in ("decider", "schema") if k in sh} or None
    for u in units:
        j = job if u is units[0] else task_args(place, remote, u, pickled=False, decided=decided)[0]
        parts.append({k: j[k] for k in own if k in j})
        pins.update(j["pins"])
        datas.append(shard_data(place, u))
    common["pins"] = pins
    return common, spec, parts, datas


@functools.cache
def _task() -> Any:
    import ray

    return ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(run_unit)


@functools.cache
def _shards_task() -> Any:
    """A generator task: Ray streams each shard's result to the driver as it is yielded; a
    retry (its worker died) runs the task again from its first shard, and Ray hands on only
    the results the first attempt had not yielded."""
    import ray

    return ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(run_shards)


def _wait(
    tasks: Sequence[_Task],
    label: str,
    units: Sequence[Unit],
    arrived: Callable[[int, Mapping[str, Any]], None],
) -> None:
    """Each unit's result handed to `arrived` as its task yields it, showing units done /
    total for the stage (for shard units: the stage's shards done, those already stored
    included, out of all its shards); Ctrl-C (or a failed unit) cancels the tasks still
    outstanding."""
    import ray

    from hfbuild.core import progress

    todo = {t.waitable: list(t.units) for t in tasks}
    ends = {t.waitable: [units[t.units[i]].shard for i in (0, -1)] for t in tasks}
    labels = {w: "..".join(dict.fromkeys(s.label for s in e if s)) for w, e in ends.items()}
    total, what = len(units), "units"
    if units and units[0].shard is not None:
        total, what = len(units[0].manifest.shard_list), "shards"
    bar = progress.bar(total, f"{label} on ray", unit=what[:-1])
    bar.update(total - len(units))
    here, again = 0, []  # units whose worker refused an input; listings of those to send again
    try:
        while todo:
            ready, _ = ray.wait(list(todo), num_returns=1, timeout=0.5)
            for w in ready:
                left = todo[w]
                if isinstance(w, ray.ObjectRefGenerator):
                    try:
                        ref = next(w)
                    except StopIteration:
                        del todo[w]
                        if left:
                            raise BuildError(
                                f"stage {label!r}: a Ray task ended without building "
                                f"{len(left)} of its shards; build again."
                            ) from None
                        continue
                else:
                    ref = w
                    del todo[w]
                res = _result(ray, ref, label, labels[w])
                here += "refused" in res
                again += [res["unlisted"]] if "unlisted" in res else []
                arrived(left.pop(0), res)
                bar.update(1)
                if not left:  # all its results are in: its worker's clean-up is not waited for
                    todo.pop(w, None)
    except BaseException:
        for w in todo:
            with contextlib.suppress(Exception):
                ray.cancel(w, force=True)
        raise
    finally:
        bar.close()
    also = f", {here} to build here (a worker refused its input)" if here else ""
    if again:  # the first build of code listing folders its tree lacked (`build_units`)
        named = ", ".join(sorted({p.removesuffix("/.") for ps in again for p in ps}))
        also += f", {len(again)} to send again with the folders listed at run time ({named})"
    built = len(units) - here - len(again)
    if what == "shards":
        line = f"{total - len(again)}/{total} shards done, {built} built on ray{also}"
        line += f" ({len(tasks)} task{'s' if len(tasks) != 1 else ''})"
    else:
        line = f"{built}/{len(units)} units built on ray{also}"
    print(f"{label}: {line}", file=sys.stderr)


def _result(ray: Any, ref: Any, label: str, shards: str = "") -> dict[str, Any]:
    """What `ref` holds; a failed task as the error a local build gives, in one line.
    `shards`: those its task builds ("" for a whole unit: it publishes once, at its end)."""
    try:
        res = cast(dict[str, Any], ray.get(ref))
    except ray.exceptions.WorkerCrashedError as e:
        why = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise BuildError(
            f"stage {label!r}: the Ray worker building {f'its shards {shards}' if shards else 'it'}"
            f" died {MAX_RETRIES + 1} times ({why}); what it published before is kept, each "
            f"entry checked when pulled. Build again (with --executor local if it dies again) "
            f"and look at the node's memory and Ray's logs."
        ) from None
    except ray.exceptions.RayError as e:
        raise BuildError(f"stage {label!r}: the Ray task failed: {e}") from e
    if "error" in res:
        raise BuildError(str(res["error"]))
    return res


def _fetch(
    place: Place,
    remote: Remote,
    unit: Unit,
    res: Mapping[str, Any],
    secs: float,
    rows: raypacks.PackRows | None = None,
) -> Report:
    """Bring the entry a worker published into the driver's store."""
    fp = str(res["fingerprint"])
    m = unit.manifest
    store = place.store
    if unit.shard is not None:
        return _fetch_shard(place, remote, unit, res, fp, secs, rows)
    held = contextlib.nullcontext() if fp == m.static_fingerprint else store.lock(fp)
    with held:
        remote.pull_held(store, fp, unit.spec.name)
    if not store.has(fp):
        raise BuildError(
            f"stage {unit.spec.name!r}: a Ray worker published {fp}, but the remote "
            f"{remote.url} does not hold it; build again."
        )
    observed = [str(p) for p, _ in (store.read_manifest(fp) or {}).get("observed") or []]
    if observed:
        with _RECORDING:
            store.add_observed(m.static_fingerprint, observed)
    return Report(unit.spec.name, fp, "built", res.get("rows"), float(res.get("seconds", secs)))


def _fetch_shard(
    place: Place,
    remote: Remote,
    unit: Unit,
    res: Mapping[str, Any],
    fp: str,
    secs: float,
    rows: raypacks.PackRows | None = None,
) -> Report:
    """Bring a shard a worker published into the driver's store; a shard that read more
    than its key assumed records that set under the stage's static fingerprint (the caller
    holds its lock), for `shardunits` to find."""
    store = place.store
    assert unit.shard is not None
    label = f"{unit.spec.name} {unit.shard.label}"
    entry = raypacks.take(store, remote, res, fp, label, rows)  # a pack's row range, or None
    if "pack" not in res:
        remote.take(store, fp, label, res.get("entry"))
    if entry is None and not store.has(fp):
        raise BuildError(
            f"stage {unit.spec.name!r}: a Ray worker published shard {unit.shard.label} as "
            f"{fp}, but the remote {remote.url} does not hold it; build again."
        )
    if fp != unit.key:
        with _RECORDING:  # results are fetched on threads; the record is read, then rewritten
            store.add_observed(unit.manifest.static_fingerprint, [str(p) for p in res["observed"]])
    seconds = float(res.get("seconds", secs))  # a packed one's carries its list row's facts
    return Report(unit.spec.name, fp, "built", res.get("rows"), seconds, entry=entry)
