"""What a unit of work travels to a Ray worker with.

Owns: the *fingerprinted tree* a unit ships with (`shipped_files`: the files its key names, at
exactly the blob ids the key holds, read from git's object database, the work tree only for
uncommitted files; each folder its builds listed at run time, the project's root too, with the
names its listing holds, their files' bytes from the work tree (`_listed`), checked to list as
the key holds them once the tree is written; plus pyproject.toml), packed as the same bytes on
every driver and named by their digest (`pack`; the driver puts it in Ray's object store once
per distinct tree: all the shards of a stage share one, without a load's data files; a node
materializes it once, `raywarm`); a load shard's data file, sent as the task's argument
(`shard_data`); the job (`task_args`: plain JSON-able values and the pickled spec, and the
folders the tree holds with their names, `listed`; a unit to send again with more,
`with_listings`), with the committed lock's pins of the entries the worker may pull
(`input_pins`) and the variables its code reads, with the driver's values (`task_env`: never a
secret-looking one).

Must never: ship a file the key does not name (a listed folder's files are named by its
listing), ship a listing other than the key's, or a secret variable's value; import ray
outside a build on the Ray executor.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from hfbuild.core.errors import BuildError, ConfigError

if TYPE_CHECKING:
    from hfbuild.builds.units import Unit
    from hfbuild.keys.manifest import Manifest, Shard
    from hfbuild.keys.place import Place
    from hfbuild.source.gitstate import Snapshot
    from hfbuild.store.remote import Remote


def shipped_files(m: Manifest, shard: Shard | None = None) -> list[tuple[str, str]]:
    """[repo-relative path, blob id] of every file the key of `m` names: its closure, its
    file_deps, its data files, the files its arguments name (a directory's files too) and
    the files its builds were seen to read; and [`dir/.`, listing id] of each folder they
    listed, whose files `tree` writes. For a shard of a
    load stage, no data file: the tree is the stage's code, one tree for all its shards,
    and the shard's own file travels with its task (`shard_data`)."""
    from hfbuild.keys.argpaths import named_files
    from hfbuild.keys.fullkey import MISSING, UNKNOWN, UNOBSERVED, in_static_key, is_listing
    from hfbuild.keys.shards import load_code_doc
    from hfbuild.source.envvars import observed_name

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
    from hfbuild.source import hub

    hubbed = sorted(p for p in pairs if hub.is_hub(p))
    if hubbed:
        raise ConfigError(
            f"this load of Hub files ({hubbed[0]}{', ...' if len(hubbed) > 1 else ''}) is "
            f"built whole (one file, or a builder a load is not sharded by without "
            f"features=), and the Ray executor sends a Hub file only with a load shard's "
            f"task: build this stage with the local executor (`--executor local`)."
        )
    pairs.update(named_files(doc))  # files that arguments name (argpaths.py)
    # Variables read at run time (`env://NAME`) travel in the task's job (`task_env`).
    # A folder builds listed (the project's root too) travels with the names its listing
    # holds and their files (`tree`); one that is missing travels as missing.
    pairs.update(
        {
            p: i
            for p, i in m.observed
            if (is_listing(p) or i not in (MISSING, UNKNOWN))
            and p != UNOBSERVED
            and observed_name(p) is None
        }
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
def tree(place: Place, files: Sequence[tuple[str, str]]) -> Iterator[str]:
    """A temporary directory holding a unit's fingerprinted tree (`shipped_files`): each
    file at its blob id, each listed folder with the names its listing recorded (`_listed`)."""
    from hfbuild.keys.fullkey import is_listing, listing_dir
    from hfbuild.source.gitstate import Snapshot

    snap = Snapshot(place.root)
    with tempfile.TemporaryDirectory(prefix="hfbuild-ray-tree-") as d:
        names = {
            listing_dir(rel): _listed(snap, listing_dir(rel), blob, d)
            for rel, blob in files
            if is_listing(rel)
        }
        for rel, blob in files:
            if is_listing(rel):
                continue
            dest = os.path.join(d, *rel.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(snap.content(rel, blob))
        pyproject = os.path.join(place.root, "pyproject.toml")
        if os.path.isfile(pyproject) and not os.path.exists(os.path.join(d, "pyproject.toml")):
            with open(pyproject, "rb") as src, open(os.path.join(d, "pyproject.toml"), "wb") as f:
                f.write(src.read())  # settings (untracked-env, secret-salt), not in any key
        _check_listed(d, names)
        yield d


def _listed(snap: Snapshot, folder: str, recorded: str, dest: str) -> list[str] | None:
    """Write into the tree at `dest` the project folder a build listed at run time (`.`: the
    root), so the worker lists the names the key holds (`recorded`, the digest of the
    names), and return them (None: a folder that is missing, and stays so): the folder, each
    file named in it with its bytes as they are here (those the build also read are in the
    key by blob id, and written over these), each directory named in it empty (what is in it
    travels when a build read or listed it)."""
    from hfbuild.keys.fullkey import listing_at, listing_id

    names = listing_at(folder, snap)
    if listing_id(names) != recorded:
        raise BuildError(
            f"the folder {folder} changed while its stage was being built on Ray (a build "
            f"lists it at run time, and its names are in the key): build again."
        )
    if names is None:
        return None
    os.makedirs(os.path.join(dest, *folder.split("/")), exist_ok=True)
    for name in names:
        rel = name if folder == "." else f"{folder}/{name}"
        src, to = snap.abspath(rel), os.path.join(dest, *rel.split("/"))
        if os.path.isdir(src):
            os.makedirs(to, exist_ok=True)
        elif os.path.isfile(src):
            with open(src, "rb") as f, open(to, "wb") as out:
                out.write(f.read())
    return names


def _check_listed(dest: str, names: dict[str, list[str] | None]) -> None:
    """Each listed folder in the finished tree at `dest` lists the names the key holds (a
    name that is neither a file nor a directory here, a broken link, is not shipped; a file
    the key names that the folder here lacks is)."""
    from hfbuild.keys.fullkey import listing

    for folder, want in names.items():
        got = listing(os.path.join(dest, *folder.split("/")))
        if got != want:
            odd = sorted(set(want or ()).symmetric_difference(got or ()))
            where = "the project's root" if folder == "." else f"the folder {folder}"
            raise ConfigError(
                f"a build of this stage lists {where} at run time, and a Ray worker's tree "
                f"cannot hold it as it is here ({', '.join(odd[:3]) or folder}: neither a "
                f"file nor a directory, or a file the key names that is not there): build "
                f"this stage with the local executor (`--executor local`)."
            )


def with_listings(place: Place, unit: Unit, paths: Sequence[str], missed: Sequence[str]) -> Unit:
    """`unit` to send again with the listings `paths` (`dir/.`, `.` for the root) in its
    key as a recorded listing is (the digest of the folder's names here), so that its tree
    holds each folder with its names and files (`tree`), and its worker's key is a local
    build's. `missed`: what its worker found missing from its tree; a folder it was sent with
    already is an error (a unit is never sent again for nothing: the rounds end)."""
    import dataclasses

    from hfbuild.keys.fullkey import identify, listing_dir
    from hfbuild.source.gitstate import Snapshot

    m = unit.manifest
    had = {p for p, _ in m.observed}
    again = sorted(set(missed) & had)
    if again or not missed:
        folders = ", ".join(listing_dir(p) for p in again) or "nothing"
        raise BuildError(
            f"stage {unit.spec.name!r}: a Ray worker found {folders} missing from its tree "
            f"although it was sent with the names the key holds (a folder reached through a "
            f"link?): build this stage with the local executor (`--executor local`)."
        )
    new = identify([p for p in paths if p not in had], Snapshot(place.root), place.stat_cache)
    m = dataclasses.replace(m, observed=tuple(sorted({*m.observed, *new})))
    shard = None if unit.shard is None else m.shard_list[unit.manifest.shard_list.index(unit.shard)]
    return dataclasses.replace(unit, manifest=m, shard=shard)


def _import_dirs(root: str) -> list[str]:
    """The driver's import path entries inside the project, relative to its root: the worker
    puts the same ones (inside the shipped tree) on its own path."""
    return list(_import_dirs_of(root, tuple(sys.path), os.getcwd()))


@functools.lru_cache(maxsize=8)
def _import_dirs_of(root: str, path: tuple[str, ...], cwd: str) -> tuple[str, ...]:
    """`_import_dirs` for one import path and working directory (a stage's shards each ask:
    resolving every entry's real path once per shard cost 0.7 s for 1,000)."""
    real = os.path.realpath(root)
    out = []
    for p in path:
        full = os.path.realpath(p or cwd)
        if full == real or full.startswith(real + os.sep):
            rel = os.path.relpath(full, real).replace(os.sep, "/")
            if rel not in out:
                out.append(rel)
    return tuple(out)


def task_env(place: Place, m: Manifest) -> dict[str, str]:
    """The variables the unit's code reads (those in its key, by literal name or read at run time by
    an earlier build, and the project's untracked-env ones), with the driver's values: the worker's
    own environment must not change the key or the result. A secret-looking one
    (`envvars.is_secret`) never travels: a task's arguments stay in the cluster's object
    store, readable by whoever reads the cluster. The worker takes it from its node's environment;
    its key then holds the salted hash of that value, so a node with another value (or none) refuses
    the task."""
    from hfbuild.source.envvars import is_secret, observed_name, project_settings

    names = {str(n) for n, _ in m.doc.get("env") or []}
    names |= {n for p, _ in m.observed if (n := observed_name(p))}  # read at run time
    names |= set(project_settings(place.root).untracked)
    return {n: os.environ[n] for n in sorted(names) if n in os.environ and not is_secret(n)}


def task_options(place: Place, m: Manifest) -> dict[str, Any]:
    """The task's variables (`task_env`), if it has any, as its `runtime_env`: Ray starts a
    worker process with them in its environment and gives it only tasks of the same
    variables, so what an installed package reads from the environment at import (say
    `datasets.config`) sees them, as in a build of its own; a task with none (most) runs in
    any worker of the job, warm from earlier stages."""
    env = task_env(place, m)
    return {"runtime_env": {"env_vars": env}} if env else {}


def shard_data(place: Place, unit: Unit) -> bytes | None:
    """A load shard's data file, the bytes its key names, sent as the task's argument
    (through Ray's object store) rather than in its tree: a tree per data file would be
    packed, sent and materialized on its node once per shard. None for any other unit."""
    if unit.shard is None or unit.spec.kind != "load":
        return None
    from hfbuild.source import hub
    from hfbuild.source.gitstate import Snapshot

    if hub.is_hub(unit.shard.label):  # read from this driver's Hub cache (`hub.ensure`d)
        m = unit.manifest
        ids = (m.doc.get("data") or {}).get("files")
        path = hub.local_file(m.data_files, ids, unit.shard.label, unit.shard.input)
        if path is None:
            raise BuildError(
                f"stage {unit.spec.name!r}: {unit.shard.label} is not a file it loads."
            )
        with open(path, "rb") as f:
            return f.read()
    return Snapshot(place.root).content(unit.shard.label, unit.shard.input)


def task_args(
    place: Place,
    remote: Remote,
    unit: Unit,
    *,
    pickled: bool = True,
    decided: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], bytes]:
    """What a unit's task receives besides its tree (`run_unit`'s arguments): the job, plain
    JSON-able values, and the pickled spec (b"" unless `pickled`: the shards of one task
    share their stage's). `decided`: a load shard's features as another shard of the same
    stage was given them (they are the stage's: read once, not once per shard)."""
    from ray import cloudpickle

    from hfbuild.keys.fullkey import is_listing

    m = unit.manifest
    job: dict[str, Any] = {
        "stage": unit.spec.name,
        "static": m.static_fingerprint,
        "doc": dict(m.doc),
        "inputs": dict(zip(unit.spec.inputs, unit.input_keys, strict=True)),
        "remote": remote.url,
        "pins": input_pins(place, remote, unit.input_keys),
        "paths": _import_dirs(place.root),
        "driver_root": place.root,
        # The folders its tree holds with their names (`tree`): a listing of any other one
        # there is not the project's, and the worker says so instead of building.
        "listed": sorted(p for p, _ in m.observed if is_listing(p)),
    }
    packed = input_pack(place, unit)
    if packed is not None:
        job["input_pack"] = packed
    if unit.shard is None:
        # What its builds read, as the driver's key assumes it: the worker identifies these
        # paths in its tree and builds under that key (a node without the record would
        # assume nothing, see the reads and build the whole stage again under them).
        job["observed"] = [list(p) for p in m.observed]
    else:
        job["shard"] = {
            **unit.shard._asdict(),
            "observed": [list(p) for p in m.observed],
            "offset": unit.offset,
        }
        if unit.spec.kind == "load":
            job["shard"].update(decided or _decided_features(unit.spec, m))
    # The spec is pickled here and unpickled by the task once the shipped tree is on its
    # path: its callable travels by module and name, never as code.
    if not pickled:
        return job, b""
    spec: bytes = cloudpickle.dumps(unit.spec)  # type: ignore[no-untyped-call]
    return job, spec


def input_pack(place: Place, unit: Unit) -> dict[str, Any] | None:
    """A transform shard unit's input shard when its input's list (in this store) keeps it
    as a row range of a pack: {"key": the pack, "shard": its split, label, input and
    `before`}, for the worker to pull the pack, once per task, and read the shard's rows
    from it in place (`rayworker`); else None (the worker pulls the shard by its key)."""
    from hfbuild.store.entry import row_pack

    if unit.shard is None or unit.spec.kind == "load" or not unit.spec.inputs:
        return None
    via = unit.inputs[unit.spec.inputs[0]].fingerprint
    row = place.store.listed_row(via, unit.shard.input)
    if row is None or row_pack(row) is None or place.store.has(unit.shard.input):
        return None
    pack = row_pack(row)
    assert pack is not None
    facts = row[4]
    shard = {"split": row[0], "label": row[2], "input": facts.get("input")}
    shard["before"] = facts.get("before") or ""
    return {"key": pack[0], "shard": shard}


def input_pins(place: Place, remote: Remote, keys: Sequence[str]) -> dict[str, list[Any]]:
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
        todo.extend(place.store.references(key))
    return out


def _decided_features(spec: Any, m: Manifest) -> dict[str, Any]:
    """What decides a load shard's features (`shards.features_decider`) and, when it is the
    first data file (which does not travel), that file's Arrow schema, read here
    (`shardone.first_schema`): the worker makes the features of it (`raykey`), so the
    driver submits without waiting for datasets' import (~0.7 s, on a thread meanwhile)."""
    from hfbuild.builds import shardone
    from hfbuild.keys import shards

    data = m.doc.get("data") or {}
    decider = shards.features_decider(spec, data, data.get("files")) or ""
    if not decider:
        return {"decider": ""}
    return {"decider": decider, "schema": shardone.first_schema(spec, m)}


def pack(place: Place, files: Sequence[tuple[str, str]]) -> tuple[str, bytes]:
    """The unit's tree (`tree`) packed as a tar archive of its directories and files, in
    name order, with no time, owner or mode but a file's executable bit (the same tree packs
    to the same bytes, on every driver), and its digest (`raywarm.digest`): the name a node
    materializes it under (`raywarm.tree_dir`). Every file of the tree travels (each is named
    by the key; a shipped .gitignore or .rayignore drops none)."""
    import io
    import tarfile

    from hfbuild.builds.raywarm import digest

    buf = io.BytesIO()
    with (
        tree(place, files) as top,
        tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar,
    ):
        for here, dirs, names in os.walk(top):
            dirs.sort()
            rel = os.path.relpath(here, top).replace(os.sep, "/")
            for name in dirs:
                info = tarfile.TarInfo(name if rel == "." else f"{rel}/{name}")
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            for name in sorted(names):
                full = os.path.join(here, name)
                info = tarfile.TarInfo(name if rel == "." else f"{rel}/{name}")
                info.size = os.path.getsize(full)
                info.mode = 0o755 if os.access(full, os.X_OK) else 0o644
                with open(full, "rb") as f:
                    tar.addfile(info, f)
    packed = buf.getvalue()
    return digest(packed), packed
