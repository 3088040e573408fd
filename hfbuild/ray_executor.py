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
with the same code as a local build (`build.build_here`), and publishes to the remote
first-writer-wins (`remote.Remote.push`). The driver then pulls the entry into its own store,
so freshness is still "the store holds the key".

A sharded stage travels one task per missing shard (`shardunits` splits it): all its shards
share one tree (the stage's code; a load's data files are left out), a transform shard's
task pulls only its input shard, a load shard's task receives its data file's bytes as its
argument (a tree per file would be a package, and a worker process, per shard). The worker
recomputes the shard's key (`shards.shard_key`: the code key from the tree, the input from
what it pulled or the bytes' blob id, the observed files' ids from their shipped copies) and
refuses another; it builds with `shardbuild`'s code (`shardunits.build_one`) and publishes
the shard under the key of what it read. The driver pulls each shard, and `shardunits`
publishes the stage's list as a local build does; it is pushed too.

Owns: the tree a unit ships with (and a load shard's data bytes), the Ray task and its worker
side (a node-local store: $HFBUILD_STORE on the worker, else `<tmp>/hfbuild-ray-<uid>`),
waiting with per-stage progress (units, or a sharded stage's shards done / total),
cancelling outstanding tasks on Ctrl-C, and turning a task's failure into the same error a
local build gives.

Must never: import ray outside a build on the Ray executor, publish under a key the worker did
not recompute, run code the shipped tree does not hold, or build a unit here other than one
whose worker refused an input.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from hfbuild.errors import BuildError, ConfigError, HfbuildError, RemoteWarning, StoreError
from hfbuild.spec import Report, stored_rows

if TYPE_CHECKING:
    from hfbuild.executor import Unit
    from hfbuild.fingerprint import Manifest
    from hfbuild.pipeline import Pipeline
    from hfbuild.remote import Remote
    from hfbuild.shards import Shard
    from hfbuild.store import Store

# A worker killed mid-task (OOM, preemption, SIGKILL) is retried this many times by Ray.
MAX_RETRIES = 3
_DRIVER = uuid.uuid4().hex  # this driver process, in the trees it ships (not in any key)


class RayExecutor:
    """Builds units as Ray tasks; the cluster is Ray's own RAY_ADDRESS (else `ray.init()`'s
    default: a running local cluster, or a new one)."""

    def build(self, pipe: Pipeline, unit: Unit) -> Report:
        """A whole stage as one task; a sharded stage as one task per missing shard
        (`shardunits`), its entry then published here and pushed for every other clone."""
        if unit.shard is None and unit.manifest.shards is not None:
            from hfbuild import shardunits

            remote = _remote(pipe, unit.spec.name)
            report = shardunits.build(pipe, self, unit)
            _share(pipe, remote, unit.spec.name, report.fingerprint)
            return report
        return build_units(pipe, [unit], unit.spec.name)[0]

    def build_all(self, pipe: Pipeline, units: Sequence[Unit], label: str) -> list[Report]:
        """All submitted at once: the cluster runs them in parallel (a whole sharded stage
        among them is split into its shards' units, stage after stage)."""
        if any(u.shard is None and u.manifest.shards is not None for u in units):
            return [self.build(pipe, u) for u in units]
        return build_units(pipe, units, label)


def _remote(pipe: Pipeline, label: str) -> Remote:
    from hfbuild.remote import remote_disabled

    remote = pipe.remote()
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


def build_units(pipe: Pipeline, units: Sequence[Unit], label: str) -> list[Report]:
    """Build `units` (one stage's, or one stage's shards) on the cluster and publish each
    into `pipe.store`. The caller holds the store's lock for each unit's static
    fingerprint."""
    remote = _remote(pipe, label)
    _connect()
    for unit in units:
        for name, fp in zip(unit.spec.inputs, unit.input_keys, strict=True):
            _ensure_remote(pipe, remote, name, fp)
    packages: dict[tuple[tuple[str, str], ...], str] = {}  # one upload per distinct tree
    refs = [_submit(pipe, remote, u, packages) for u in units]
    t0 = time.perf_counter()
    results = _wait(refs, label, units)
    reports = []
    for unit, res in zip(units, results, strict=True):
        if "refused" in res:
            reports.append(_build_refused_here(pipe, unit, str(res["refused"])))
        else:
            reports.append(_fetch(pipe, remote, unit, res, time.perf_counter() - t0))
    return reports


def _build_refused_here(pipe: Pipeline, unit: Unit, why: str) -> Report:
    """A unit whose worker refused an input the remote serves (its content is not what the
    committed lock records): the cluster cannot build it from the remote, and this
    machine's store holds the input it was built or checked with, so it is built here, with
    a warning naming the remote entry. The caller holds the lock of its static
    fingerprint."""
    from hfbuild.build import build_here
    from hfbuild.shardunits import build_shard_here

    what = f"stage {unit.spec.name!r}"
    if unit.shard is not None:
        what += f", shard {unit.shard.label}"
    warnings.warn(
        f"{what}: a Ray worker refused its input: {why} Building it here instead.",
        RemoteWarning,
        stacklevel=2,
    )
    if unit.shard is not None:
        return build_shard_here(pipe, unit)
    return build_here(pipe, unit.spec, unit.manifest, unit.inputs)


def _connect() -> None:
    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS is read by ray.init itself. Workers' output stays in Ray's logs.
        ray.init(log_to_driver=False, logging_level=logging.WARNING)


def _ensure_remote(pipe: Pipeline, remote: Remote, name: str, fp: str) -> None:
    """An input built or pulled here must be on the remote before a worker reads it; one the
    remote holds another copy of is adopted first (the workers read the remote's)."""
    from hfbuild.remote import RemoteError, RemoteUnreachableError

    try:
        remote.adopt(pipe.store, fp, name)
        remote.push(pipe.store, fp, name)
    except RemoteUnreachableError:
        raise  # the remote, not the stage: no failed build is recorded
    except (RemoteError, StoreError) as e:
        raise BuildError(f"input {name!r} cannot be shared with the cluster: {e}") from e


def _share(pipe: Pipeline, remote: Remote, name: str, fp: str) -> None:
    """Push a sharded stage's list (its shards are there already): other clones then pull
    the stage whole instead of building it."""
    from hfbuild.remote import RemoteError, RemoteUnreachableError

    try:
        remote.push(pipe.store, fp, name)
    except RemoteUnreachableError:
        raise
    except (RemoteError, StoreError) as e:
        raise BuildError(
            f"stage {name!r}: its shards were built on the cluster, but its entry cannot be "
            f"pushed to {remote.url}: {e}. Build again to push it."
        ) from e


# -- what travels -------------------------------------------------------------------------------


def shipped_files(m: Manifest, shard: Shard | None = None) -> list[tuple[str, str]]:
    """[repo-relative path, blob id] of every file the key of `m` names: its closure, its
    file_deps, its data files, the files its arguments name (a directory's files too) and
    the files its builds were seen to read. For a shard of a
    load stage, no data file: the tree is the stage's code, one package for all its shards,
    and the shard's own file travels with its task (`shard_data`)."""
    from hfbuild.argpaths import named_files
    from hfbuild.envvars import observed_name
    from hfbuild.fullkey import (
        MISSING,
        UNKNOWN,
        UNOBSERVED,
        in_static_key,
        is_listing,
        listing_dir,
    )
    from hfbuild.shards import load_code_doc

    doc = m.doc
    pairs = {str(p): str(i) for p, i in (doc.get("code") or {}).get("files", [])}
    pairs.update({str(p): str(i) for p, i in doc.get("file_deps") or []})
    files = (doc.get("data") or {}).get("files")
    if shard is not None and files is not None:
        doc = load_code_doc(doc)
        files = None
    groups: Any = files.values() if isinstance(files, dict) else [files or []]
    for group in groups:
        pairs.update({str(p): str(i) for p, i in group})
    pairs.update(named_files(doc))  # files that arguments name (argpaths.py)
    # Variables read at run time (`env://NAME`) travel in the task's runtime_env (`_env`).
    pairs.update(
        {
            p: i
            for p, i in m.observed
            if i not in (MISSING, UNKNOWN) and p != UNOBSERVED and observed_name(p) is None
        }
    )
    listed = sorted(listing_dir(p) for p in pairs if is_listing(p))
    if listed:
        raise ConfigError(
            f"builds of this stage listed {', '.join(listed)} at run time, and the Ray "
            f"executor ships only the files a key names, so a worker would list other "
            f"names: build this stage with the local executor (`--executor local`)."
        )
    outside = sorted(p for p in pairs if p.startswith("<outside>/"))
    if outside:
        raise ConfigError(
            f"the Ray executor ships the files a stage's key names, and {', '.join(outside)} "
            f"lie outside the project: move them into the repository."
        )
    assert set(pairs) >= in_static_key(doc)
    return sorted(pairs.items())


@contextlib.contextmanager
def tree(pipe: Pipeline, files: Sequence[tuple[str, str]]) -> Iterator[str]:
    """A temporary directory holding a unit's fingerprinted tree (`shipped_files`)."""
    from hfbuild.gitstate import Snapshot

    snap = Snapshot(pipe.root)
    with tempfile.TemporaryDirectory(prefix="hfbuild-ray-tree-") as d:
        for rel, blob in files:
            dest = os.path.join(d, *rel.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(snap.content(rel, blob))
        # Ray deletes a package's unpacked copy on a node when the job that uploaded it
        # ends, even while another job's task runs in it: one package per driver process.
        with open(os.path.join(d, ".hfbuild-driver"), "w") as f:
            f.write(_DRIVER)
        pyproject = os.path.join(pipe.root, "pyproject.toml")
        if os.path.isfile(pyproject) and not os.path.exists(os.path.join(d, "pyproject.toml")):
            with open(pyproject, "rb") as src, open(os.path.join(d, "pyproject.toml"), "wb") as f:
                f.write(src.read())  # settings (untracked-env, secret-salt), not in any key
        yield d


def _import_dirs(root: str) -> list[str]:
    """The driver's import path entries inside the project, relative to its root: the worker
    puts the same ones (inside the shipped tree) on its own path."""
    real = os.path.realpath(root)
    out = []
    for p in sys.path:
        full = os.path.realpath(p or os.getcwd())
        if full == real or full.startswith(real + os.sep):
            rel = os.path.relpath(full, real).replace(os.sep, "/")
            if rel not in out:
                out.append(rel)
    return out


def _env(pipe: Pipeline, m: Manifest) -> dict[str, str]:
    """The variables the unit's code reads (those in its key, by literal name or read at run time by
    an earlier build, and the project's untracked-env ones), with the driver's values: the worker's
    own environment must not change the key or the result. A secret-looking one
    (`envvars.is_secret`) never travels: Ray keeps a task's `runtime_env` in the cluster's task
    table, readable by whoever reads the cluster. The worker takes it from its node's environment;
    its key then holds the salted hash of that value, so a node with another value (or none) refuses
    the task."""
    from hfbuild.envvars import is_secret, observed_name, project_settings

    names = {str(n) for n, _ in m.doc.get("env") or []}
    names |= {n for p, _ in m.observed if (n := observed_name(p))}  # read at run time
    names |= set(project_settings(pipe.root).untracked)
    return {n: os.environ[n] for n in sorted(names) if n in os.environ and not is_secret(n)}


def _submit(
    pipe: Pipeline, remote: Remote, unit: Unit, packages: dict[tuple[tuple[str, str], ...], str]
) -> Any:
    job, spec = task_args(pipe, remote, unit)
    data = shard_data(pipe, unit)
    name = f"hfbuild:{unit.spec.name}"
    if unit.shard is not None:
        name += f":{unit.shard.label}"
    files = tuple(shipped_files(unit.manifest, unit.shard))
    if files not in packages:
        packages[files] = _upload_tree(pipe, files)
    env = {"working_dir": packages[files], "env_vars": _env(pipe, unit.manifest)}
    return _task().options(name=name, runtime_env=env).remote(job, spec, data)


def shard_data(pipe: Pipeline, unit: Unit) -> bytes | None:
    """A load shard's data file, the bytes its key names, sent as the task's argument
    (through Ray's object store) rather than in its tree: a tree per data file would be a
    package, and a worker process, per shard. None for any other unit."""
    if unit.shard is None or unit.spec.kind != "load":
        return None
    from hfbuild.gitstate import Snapshot

    return Snapshot(pipe.root).content(unit.shard.label, unit.shard.input)


def task_args(pipe: Pipeline, remote: Remote, unit: Unit) -> tuple[dict[str, Any], bytes]:
    """What a unit's task receives besides its tree (`run_unit`'s arguments): the job, plain
    JSON-able values, and the pickled spec."""
    from ray import cloudpickle

    m = unit.manifest
    job: dict[str, Any] = {
        "stage": unit.spec.name,
        "static": m.static_fingerprint,
        "doc": dict(m.doc),
        "inputs": dict(zip(unit.spec.inputs, unit.input_keys, strict=True)),
        "remote": remote.url,
        "pins": input_pins(pipe, remote, unit.input_keys),
        "paths": _import_dirs(pipe.root),
        "driver_root": pipe.root,
    }
    if unit.shard is not None:
        job["shard"] = {
            **unit.shard._asdict(),
            "observed": [list(p) for p in m.observed],
            "offset": unit.offset,
        }
        if unit.spec.kind == "load":
            job["shard"].update(_decided_features(unit.spec, m))
    # The spec is pickled here and unpickled by the task once the shipped tree is on its
    # path: its callable travels by module and name, never as code.
    spec: bytes = cloudpickle.dumps(unit.spec)  # type: ignore[no-untyped-call]
    return job, spec


def input_pins(pipe: Pipeline, remote: Remote, keys: Sequence[str]) -> dict[str, list[Any]]:
    """What the committed lock records (`Remote.pins`) for every entry a unit's worker may
    pull: its inputs and, through this store's manifests, what they reference (a list's
    shards, an indices entry's base), as {key: [content hash, stage, shard?]}. The worker
    checks its pulls against these as the driver checks its own; only these travel, not
    the whole lock (a shard's task would carry every shard's pin)."""
    pins = remote.pins()
    out: dict[str, list[Any]] = {}
    if not pins:
        return out
    seen: set[str] = set()
    todo = list(keys)
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        pin = pins.get(key)
        if pin is not None:
            out[key] = [pin.content_hash, pin.stage, pin.shard]
        todo.extend(pipe.store.references(key))
    return out


def _decided_features(spec: Any, m: Manifest) -> dict[str, Any]:
    """What decides a load shard's features (`shards.features_decider`) and, when it is the
    first data file (which does not travel), the features the driver read from it."""
    from hfbuild import shardbuild, shards

    data = m.doc.get("data") or {}
    decider = shards.features_decider(spec, data, data.get("files")) or ""
    if not decider:
        return {"decider": ""}
    features = shardbuild.decided_features(spec, m).options["features"]
    return {"decider": decider, "features": features.to_dict()}


def _upload_tree(pipe: Pipeline, files: Sequence[tuple[str, str]]) -> str:
    """Pack the unit's tree and upload it to the cluster; its URI. Ray names a package by
    the hash of its files and uploads it once, so units of one code share one package. Only
    a job's own runtime_env may name a local directory: a task's must name an uploaded
    package, hence Ray's packaging functions, with no exclusion (every file of the tree is
    named by the key; a shipped .gitignore must not drop one)."""
    from ray._private.runtime_env.packaging import (
        get_uri_for_directory,
        upload_package_if_needed,
    )

    with (
        tree(pipe, files) as tree_dir,
        tempfile.TemporaryDirectory(prefix="hfbuild-ray-pkg-") as tmp,
    ):
        uri = str(get_uri_for_directory(tree_dir, include_gitignore=False, excludes=[]))
        upload_package_if_needed(uri, tmp, tree_dir, include_gitignore=False, excludes=[])
    return uri


@functools.cache
def _task() -> Any:
    import ray

    return ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(run_unit)


def _wait(refs: list[Any], label: str, units: Sequence[Unit]) -> list[dict[str, Any]]:
    """Each task's result, showing units done / total for the stage (for shard units: the
    stage's shards done, those already stored included, out of all its shards); Ctrl-C (or
    a failed unit) cancels the tasks still outstanding."""
    import ray

    from hfbuild import progress

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


def _fetch(
    pipe: Pipeline, remote: Remote, unit: Unit, res: Mapping[str, Any], secs: float
) -> Report:
    """Bring the entry a worker published into the driver's store."""
    fp = str(res["fingerprint"])
    m = unit.manifest
    store = pipe.store
    if unit.shard is not None:
        return _fetch_shard(pipe, remote, unit, res, fp, secs)
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
    if fp != m.fingerprint:
        pipe.manifests(fresh=True)  # the stages after this one take the key it was built under
    return Report(unit.spec.name, fp, "built", res.get("rows"), float(res.get("seconds", secs)))


def _fetch_shard(
    pipe: Pipeline, remote: Remote, unit: Unit, res: Mapping[str, Any], fp: str, secs: float
) -> Report:
    """Bring a shard a worker published into the driver's store; a shard that read more
    than its key assumed records that set under the stage's static fingerprint (the caller
    holds its lock), for `shardunits` to find."""
    store = pipe.store
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


# -- the worker side ---------------------------------------------------------------------------


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
    """The Ray task: build one unit from the shipped tree (the task's working directory) and
    `data` (a load shard's data file), and publish it to the remote. A user error comes back
    as {"error": message}."""
    root = os.getcwd()
    try:
        return _run_unit(root, job, spec_bytes, data)
    except HfbuildError as e:
        return {"error": str(e).replace(root, str(job["driver_root"]))}


def _run_unit(
    root: str, job: dict[str, Any], spec_bytes: bytes, data: bytes | None
) -> dict[str, Any]:
    from ray import cloudpickle

    from hfbuild.build import build_here
    from hfbuild.diff import diff
    from hfbuild.gitstate import Snapshot
    from hfbuild.lockfile import Pin
    from hfbuild.manifests import stage_manifest
    from hfbuild.pipeline import Pipeline
    from hfbuild.remote import RefusedEntryError, Remote
    from hfbuild.store import Store

    # Ray puts the driver's working directory on a worker's path (for clusters whose nodes
    # share a file system): the project's code must come from the shipped tree alone.
    driver = os.path.realpath(str(job["driver_root"]))
    sys.path[:] = [
        p for p in sys.path if not (os.path.realpath(p or ".") + os.sep).startswith(driver + os.sep)
    ]
    for rel in reversed(job["paths"]):
        p = os.path.normpath(os.path.join(root, rel))
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    spec = cloudpickle.loads(spec_bytes)
    name = str(job["stage"])
    store = Store(worker_store())
    pins = {str(k): Pin(str(h), str(s), bool(sh)) for k, (h, s, sh) in job["pins"].items()}
    remote = Remote(str(job["remote"]), lambda: pins)
    inputs: dict[str, str] = job["inputs"]
    for dep, fp in inputs.items():
        try:
            _take_input(store, remote, fp, dep)
        except RefusedEntryError as e:
            return {"refused": str(e)}
        if not store.has(fp):
            raise BuildError(
                f"stage {name!r}: its input {dep!r} ({fp}) is not on the remote {remote.url}."
            )
    pipe = Pipeline(store.root, root=root, remote=False)
    if "shard" in job:
        return _run_shard(root, job, spec, pipe, remote, data)
    done = cast("Mapping[str, Manifest]", {d: _Key(fp) for d, fp in inputs.items()})
    # Its key holds its inputs' results as the entries pulled above record them (inputid.py).
    m = stage_manifest(spec, Snapshot(root), done, pipe.stat_cache, lookup=pipe.ledger.lookup())
    if m.static_fingerprint != job["static"]:
        changes = "; ".join(c.describe() for c in diff(job["doc"], m.doc)[:5])
        raise BuildError(
            f"stage {name!r}: the Ray worker computed the key {m.static_fingerprint} from the "
            f"tree it received, not the driver's {job['static']} ({changes or 'same parts'}), "
            f"on node {_node()}. Nothing was published. The worker's environment differs from "
            f"the driver's "
            f"(packages, Python, or a secret variable, which never travels: set it in every "
            f"node's environment): run the cluster from the same environment."
        )
    t0 = time.perf_counter()
    with store.lock(m.static_fingerprint):
        if store.has(m.fingerprint):  # a retried task whose first attempt built it here
            doc = store.read_manifest(m.fingerprint) or {}
            report = Report(name, m.fingerprint, "built", stored_rows(doc), 0.0)
        else:
            report = build_here(pipe, spec, m, done)
    fp = report.fingerprint
    remote.push(store, fp, name)
    return {
        "fingerprint": fp,
        "rows": report.rows,
        "seconds": round(time.perf_counter() - t0, 3),
    }


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


def _take_input(store: Store, remote: Remote, fp: str, dep: str) -> None:
    """Have input `fp` in the node's store: pulled from the remote, checked against the
    committed lock's pins the driver sent (`input_pins`); one already held is compared with
    its pin too (pulled before the lock pinned it, or built here by another run). One this
    node built but did not publish (the remote was down, another node published first) is
    replaced by the remote's (`Remote.adopt`): what this task builds must rest on the
    published entry, or its entry (a selection of that input's rows) contradicts the remote."""
    from hfbuild.remote import RefusedEntryError

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


def _shard_lookup(pipe: Pipeline, key: str, doc: Mapping[str, Any]) -> Any:
    """The input shard `key`'s result as the transform shard's key holds it (inputid.py):
    the content hash of the shard this worker pulled (checked on pull), with the form of
    its stage's result as the driver's manifest says it (a form is of the whole list,
    which the worker does not pull; as the `with_indices` digest, the driver's)."""
    from hfbuild import shards

    marker = doc.get("inputs")
    form = marker.get(shards.INPUT_MARKER) if isinstance(marker, dict) else None
    stored = pipe.store.intact_manifest(key)

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


def _run_shard(
    root: str, job: dict[str, Any], spec: Any, pipe: Pipeline, remote: Remote, data: bytes | None
) -> dict[str, Any]:
    """One shard: its key recomputed from what the task received (the code key from the
    stage's code in the tree, a load shard's input from the blob id of the data file's bytes
    sent with it, the observed files' ids from their shipped copies; the digest of the keys
    before it, for `with_indices`, as sent), refused when it is not the driver's, then built
    and published to the remote."""
    with tempfile.TemporaryDirectory(prefix="hfbuild-ray-data-") as d:
        return _run_shard_in(root, job, spec, pipe, remote, data, d)


def _run_shard_in(
    root: str,
    job: dict[str, Any],
    spec: Any,
    pipe: Pipeline,
    remote: Remote,
    data: bytes | None,
    scratch: str,
) -> dict[str, Any]:
    import dataclasses

    from hfbuild import shards, shardunits
    from hfbuild.diff import diff
    from hfbuild.fullkey import identify
    from hfbuild.gitstate import Snapshot
    from hfbuild.manifests import stage_manifest

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
        m = stage_manifest(one, snap, {}, pipe.stat_cache, lookup=pipe.ledger.lookup())
        got = str(m.doc["data"]["files"][0][1])
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
            (shards.ShardIn(str(sh["split"]), key, label),),
            [shards.Shard(str(sh["split"]), key, label, 0, key)],
        )
        done = cast("Mapping[str, Manifest]", {spec.inputs[0]: stand_in})
        m = stage_manifest(
            spec, snap, done, pipe.stat_cache, lookup=_shard_lookup(pipe, key, job["doc"])
        )
        got, code = key, m.static_fingerprint
        content = m.shards[0].content if m.shards else ""
        mine, theirs = dict(m.doc), job["doc"]
    observed = identify([str(p) for p, _ in sh["observed"]], snap, pipe.stat_cache)
    ins = shards.ShardIn(str(sh["split"]), got, label, str(sh["before"]), content)
    m = dataclasses.replace(m, shards=(ins,), shard_code=code, observed=observed)
    s = m.shard_list[0]
    if s.key != sh["key"]:
        changes = "; ".join(c.describe() for c in diff(theirs, mine)[:5])
        if got != sh["input"]:
            changes = f"its data file {label} is {got}, not {sh['input']}"
        raise BuildError(
            f"stage {name!r}, shard {label}: the Ray worker computed the key {s.key} from "
            f"the tree it received, not the driver's {sh['key']} ({changes or 'same parts'}), "
            f"on node {_node()}. Nothing was published. The worker's environment differs from "
            f"the driver's "
            f"(packages, Python, or a secret variable, which never travels: set it in every "
            f"node's environment): run the cluster from the same environment."
        )
    t0 = time.perf_counter()
    fp, rows, read = shardunits.build_one(pipe, spec, m, s, int(sh["offset"]))
    remote.push(pipe.store, fp, f"{name} {label}")
    return {
        "fingerprint": fp,
        "rows": rows,
        "observed": [p for p, _ in read],
        "seconds": round(time.perf_counter() - t0, 3),
    }
