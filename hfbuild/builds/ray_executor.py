"""Building units of work on a Ray cluster, sharing them through the remote cache.

The driver (the process running doit or `hfbuild build`) computes every key, as always; only
units whose entry is missing travel. Each unit becomes one Ray task whose `runtime_env`
carries the *fingerprinted tree*: the files the unit's key names (closure code, file_deps,
data files, files earlier builds read at run time) at exactly the blob ids the key holds, read
from git's object database (the work tree only for uncommitted files, checked against the id),
plus pyproject.toml. Nothing the worker happens to have on disk is used. The task pulls the
unit's inputs from the remote, each checked as the driver's pulls are: against what the
committed lock records for its key (the driver sends the pins of the entries the worker may
pull, `input_pins`). A worker refusing an input returns the refusal; the driver, whose store
holds the input, builds that unit here with a `RemoteWarning` (the cluster cannot build it
from the remote until the forged entry is deleted). The task then recomputes the unit's static
key from what it received (the shipped tree is not a git work tree: its files are identified
by the blob ids of their bytes, the same ids), refuses to build under a different one, builds
with the same code as a local build (`local.build_here`), and publishes to the remote
first-writer-wins (`remote.Remote.push`). The driver then pulls the entry into its own store,
so freshness is still "the store holds the key".

A sharded stage travels one task per missing shard (`shardunits` splits it): all its shards
share one tree (the stage's code; a load's data files are left out), a transform shard's
task pulls only its input shard, a load shard's task receives its data file's bytes as its
argument (a tree per file would be a package, and a worker process, per shard). The worker
recomputes the shard's key (`manifest.shard_key`: the code key from the tree, the input from
what it pulled or the bytes' blob id, the observed files' ids from their shipped copies) and
refuses another; it builds with `shardone`'s code (`shardunits.build_one`) and publishes
the shard under the key of what it read. The driver pulls each shard, and `shardunits`
publishes the stage's list as a local build does; it is pushed too.

What travels is `raytree`'s (the tree, a load shard's data bytes, the job); the worker's side
is `rayworker`'s.

Owns: the driver's side: submitting the Ray tasks, waiting with per-stage progress (units,
or a sharded stage's shards done / total), cancelling outstanding tasks on Ctrl-C, turning a
task's failure into the same error a local build gives, and fetching what workers published.

Must never: import ray outside a build on the Ray executor, publish under a key the worker did
not recompute, run code the shipped tree does not hold, or build a unit here other than one
whose worker refused an input.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from hfbuild.builds import shardunits
from hfbuild.builds.local import build_here
from hfbuild.builds.raytree import shard_data, shipped_files, task_args, task_env, upload_tree
from hfbuild.builds.rayworker import run_unit
from hfbuild.builds.units import Unit
from hfbuild.core.errors import BuildError, ConfigError, RemoteWarning, StoreError
from hfbuild.core.spec import Report

if TYPE_CHECKING:
    from hfbuild.keys.place import Place
    from hfbuild.store.remote import Remote

# A worker killed mid-task (OOM, preemption, SIGKILL) is retried this many times by Ray.
MAX_RETRIES = 3


class RayExecutor:
    """Builds units as Ray tasks; the cluster is Ray's own RAY_ADDRESS (else `ray.init()`'s
    default: a running local cluster, or a new one)."""

    def build(self, place: Place, unit: Unit) -> Report:
        """A whole stage as one task; a sharded stage as one task per missing shard
        (`shardunits`), its entry then published here and pushed for every other clone."""
        if unit.shard is None and unit.manifest.shards is not None:
            remote = _remote(place, unit.spec.name)
            report = shardunits.build(place, self, unit)
            _share(place, remote, unit.spec.name, report.fingerprint)
            return report
        return build_units(place, [unit], unit.spec.name)[0]

    def build_all(self, place: Place, units: Sequence[Unit], label: str) -> list[Report]:
        """All submitted at once: the cluster runs them in parallel (a whole sharded stage
        among them is split into its shards' units, stage after stage)."""
        if any(u.shard is None and u.manifest.shards is not None for u in units):
            return [self.build(place, u) for u in units]
        return build_units(place, units, label)


def _remote(place: Place, label: str) -> Remote:
    from hfbuild.store.remotereach import remote_disabled

    remote = place.remote()
    if remote is None and remote_disabled():
        raise ConfigError(
            f"stage {label!r}: the Ray executor needs the remote cache, where workers read "
            f"their inputs and publish their results, and HFBUILD_NO_REMOTE=1 turns it off: "
            f"unset HFBUILD_NO_REMOTE, or build with the local executor (--executor local, "
            f"or unset HFBUILD_EXECUTOR)."
        )
    if remote is None:
        raise ConfigError(
            f"stage {label!r}: the Ray executor needs a remote cache, where workers read "
            f"their inputs and publish their results: set HFBUILD_REMOTE or [tool.hfbuild] "
            f"remote (an fsspec URL every node can reach, e.g. s3://bucket/hfbuild)."
        )
    return remote


def build_units(place: Place, units: Sequence[Unit], label: str) -> list[Report]:
    """Build `units` (one stage's, or one stage's shards) on the cluster and publish each
    into `place.store`. The caller holds the store's lock for each unit's static
    fingerprint."""
    remote = _remote(place, label)
    _connect()
    for unit in units:
        for name, fp in zip(unit.spec.inputs, unit.input_keys, strict=True):
            _ensure_remote(place, remote, name, fp)
    packages: dict[tuple[tuple[str, str], ...], str] = {}  # one upload per distinct tree
    refs = [_submit(place, remote, u, packages) for u in units]
    t0 = time.perf_counter()
    results = _wait(refs, label, units)
    reports = []
    for unit, res in zip(units, results, strict=True):
        if "refused" in res:
            reports.append(_build_refused_here(place, unit, str(res["refused"])))
        else:
            reports.append(_fetch(place, remote, unit, res, time.perf_counter() - t0))
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
    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS is read by ray.init itself. Workers' output stays in Ray's logs.
        ray.init(log_to_driver=False, logging_level=logging.WARNING)


def _ensure_remote(place: Place, remote: Remote, name: str, fp: str) -> None:
    """An input built or pulled here must be on the remote before a worker reads it; one the
    remote holds another copy of is adopted first (the workers read the remote's)."""
    from hfbuild.store.remotereach import RemoteError, RemoteUnreachableError

    try:
        remote.adopt(place.store, fp, name)
        remote.push(place.store, fp, name)
    except RemoteUnreachableError:
        raise  # the remote, not the stage: no failed build is recorded
    except (RemoteError, StoreError) as e:
        raise BuildError(f"input {name!r} cannot be shared with the cluster: {e}") from e


def _share(place: Place, remote: Remote, name: str, fp: str) -> None:
    """Push a sharded stage's list (its shards are there already): other clones then pull
    the stage whole instead of building it."""
    from hfbuild.store.remotereach import RemoteError, RemoteUnreachableError

    try:
        remote.push(place.store, fp, name)
    except RemoteUnreachableError:
        raise
    except (RemoteError, StoreError) as e:
        raise BuildError(
            f"stage {name!r}: its shards were built on the cluster, but its entry cannot be "
            f"pushed to {remote.url}: {e}. Build again to push it."
        ) from e


def _submit(
    place: Place, remote: Remote, unit: Unit, packages: dict[tuple[tuple[str, str], ...], str]
) -> Any:
    job, spec = task_args(place, remote, unit)
    data = shard_data(place, unit)
    name = f"hfbuild:{unit.spec.name}"
    if unit.shard is not None:
        name += f":{unit.shard.label}"
    files = tuple(shipped_files(unit.manifest, unit.shard))
    if files not in packages:
        packages[files] = upload_tree(place, files)
    env = {"working_dir": packages[files], "env_vars": task_env(place, unit.manifest)}
    return _task().options(name=name, runtime_env=env).remote(job, spec, data)


@functools.cache
def _task() -> Any:
    import ray

    return ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(run_unit)


def _wait(refs: list[Any], label: str, units: Sequence[Unit]) -> list[dict[str, Any]]:
    """Each task's result, showing units done / total for the stage (for shard units: the
    stage's shards done, those already stored included, out of all its shards); Ctrl-C (or
    a failed unit) cancels the tasks still outstanding."""
    import ray

    from hfbuild.core import progress

    pending = list(refs)
    results: dict[Any, dict[str, Any]] = {}
    total, what = len(refs), "units"
    if units and units[0].shard is not None:
        total, what = len(units[0].manifest.shard_list), "shards"
    bar = progress.bar(total, f"{label} on ray", unit=what[:-1])
    bar.update(total - len(refs))
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in done:
                results[ref] = _result(ray, ref, label)
                bar.update(1)
    except BaseException:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
    here = sum("refused" in r for r in results.values())  # built by the driver next
    also = f", {here} to build here (a worker refused its input)" if here else ""
    if what == "shards":
        line = f"{total}/{total} shards done, {len(refs) - here} built on ray"
    else:
        line = f"{len(refs) - here}/{len(refs)} units built on ray"
    print(f"{label}: {line}{also}", file=sys.stderr)
    return [results[r] for r in refs]


def _result(ray: Any, ref: Any, label: str) -> dict[str, Any]:
    try:
        res = cast(dict[str, Any], ray.get(ref))
    except ray.exceptions.WorkerCrashedError as e:
        raise BuildError(
            f"stage {label!r}: the Ray worker building it died {MAX_RETRIES + 1} times "
            f"({e}). Nothing was published; look at the node's memory and Ray's logs."
        ) from e
    except ray.exceptions.RayError as e:
        raise BuildError(f"stage {label!r}: the Ray task failed: {e}") from e
    if "error" in res:
        raise BuildError(str(res["error"]))
    return res


def _fetch(place: Place, remote: Remote, unit: Unit, res: Mapping[str, Any], secs: float) -> Report:
    """Bring the entry a worker published into the driver's store."""
    fp = str(res["fingerprint"])
    m = unit.manifest
    store = place.store
    if unit.shard is not None:
        return _fetch_shard(place, remote, unit, res, fp, secs)
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
        store.add_observed(m.static_fingerprint, observed)
    return Report(unit.spec.name, fp, "built", res.get("rows"), float(res.get("seconds", secs)))


def _fetch_shard(
    place: Place, remote: Remote, unit: Unit, res: Mapping[str, Any], fp: str, secs: float
) -> Report:
    """Bring a shard a worker published into the driver's store; a shard that read more
    than its key assumed records that set under the stage's static fingerprint (the caller
    holds its lock), for `shardunits` to find."""
    store = place.store
    assert unit.shard is not None
    remote.pull(store, fp, f"{unit.spec.name} {unit.shard.label}")
    if not store.has(fp):
        raise BuildError(
            f"stage {unit.spec.name!r}: a Ray worker published shard {unit.shard.label} as "
            f"{fp}, but the remote {remote.url} does not hold it; build again."
        )
    if fp != unit.key:
        store.add_observed(unit.manifest.static_fingerprint, [str(p) for p in res["observed"]])
    return Report(unit.spec.name, fp, "built", res.get("rows"), float(res.get("seconds", secs)))
