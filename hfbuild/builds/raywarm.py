"""A Ray task's place in a warm worker: its tree on the node, and the process as it ran in.

A task asks for no `runtime_env`: Ray gives a task a worker only of its own runtime_env, so a
tree per stage in one would start a worker process per stage (~1 s, and ~0.85 s importing
datasets, hfbuild and s3fs again). The driver packs each distinct tree once (`raytree.pack`)
and puts it in Ray's object store; the job names it by the digest of its bytes
(`{"tree": [digest, [ref]]}`, the reference nested, so that Ray does not fetch it for a
task whose node holds the tree).

A warm-up task (`warm_up`, submitted by the driver as soon as it is connected, `rayconnect`)
imports in a new worker what a task imports (installed packages and hfbuild, outside any
tree) while the driver prepares the tasks.

A task's variables (`raytree.task_env`) are not set here: they are its `runtime_env`
(`ray_executor`), so its worker process started with them.

Owns: the warm-up's imports (`WARM_MODULES`); a tree materialized once per node, in a directory
named by its digest under `<tmp>/hfbuild-ray-trees-<uid>` (`tree_dir`: the bytes checked
against the digest, unpacked beside it and renamed into place, so concurrent tasks on a node
each see it whole or not at all; held by a shared lock on its directory for the task's
duration, its mtime touched at the task's start and end; a task run by hand in its tree, with
no tree in its job, takes its working directory); the node's trees collected (`collect_trees`:
those unused for longer than the keep time and held by no task, renamed aside under an
exclusive lock, then deleted; on each new unpack, those unused for a day, and by `hfbuild gc`
on each node, `raynodes`, by gc's keep time); and the process's state for one task's duration
(`inside`): its working directory the tree, the tree first on the import path (with the
driver's own project directories, which Ray puts on a worker's path, off it); afterwards, the
task failing too, the working directory, import path and environment as they were, every module
whose file lies in the tree dropped from `sys.modules` and the import system's caches
invalidated, so the next task imports its code from its own tree.

Must never: let a module, variable, path entry or working directory of one task's tree reach
the next task; use a tree whose bytes are not its digest's; remove a tree a task holds; read
the driver's files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

WARM_MODULES = (
    "hfbuild.builds.rayworker",
    "hfbuild.builds.local",
    "hfbuild.keys.manifests",
    "hfbuild.keys.place",
    "hfbuild.source.gitstate",
    "hfbuild.store.remote",
    "hfbuild.builds.builder",
    "datasets",
    "s3fs",
)
"""What a task imports before its build (`warm_up`): installed packages and hfbuild only."""


def warm_up() -> None:
    """A warm-up task (`rayconnect`): this worker imports what a task imports (datasets,
    hfbuild, s3fs: ~1 s) while the driver prepares the tasks, outside any task's tree."""
    for name in WARM_MODULES:
        importlib.import_module(name)


def digest(packed: bytes) -> str:
    """The name of a packed tree: the SHA-256 of its bytes."""
    return hashlib.sha256(packed).hexdigest()


def trees_dir() -> str:
    """The node's materialized trees, one directory each, named by its digest."""
    return os.path.join(tempfile.gettempdir(), f"hfbuild-ray-trees-{os.getuid()}")


@contextlib.contextmanager
def tree_dir(job: Mapping[str, Any]) -> Iterator[str]:
    """For the block: the directory of the tree the job names, unpacked on this node the first
    time a task here needs it, marked used (its mtime, at the block's start and end) and held
    (a shared lock on it) so that `collect_trees` leaves it alone; a job naming none: the
    working directory (a task run in its tree)."""
    tree = job.get("tree")
    if tree is None:
        yield os.getcwd()
        return
    name = str(tree[0])
    dest = os.path.join(trees_dir(), name)
    while True:
        if not os.path.isdir(dest):
            _unpack(job, name, dest)
        try:
            fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # collected meanwhile: unpacked again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:  # still the tree in place (not one collected after we opened it)?
                same = os.path.samestat(os.fstat(fd), os.stat(dest))
            except FileNotFoundError:
                same = False
            if same:
                os.utime(fd)
                try:
                    yield dest
                finally:
                    os.utime(fd)  # used until now
                return
        finally:
            os.close(fd)


def _unpack(job: Mapping[str, Any], name: str, dest: str) -> None:
    """The job's packed tree, fetched, checked against its digest `name` and unpacked beside
    `dest`, then renamed into place (another task here putting it first wins); the trees unused
    for a day (`STALE_SECONDS`) collected then."""
    import ray

    packed: bytes = ray.get(job["tree"][1][0])
    if digest(packed) != name:
        from hfbuild.core.errors import BuildError

        raise BuildError(
            f"stage {job['stage']!r}: the tree this Ray task received is not the one it was "
            f"sent with (digest {name}); build again."
        )
    top = os.path.dirname(dest)
    os.makedirs(top, exist_ok=True)
    collect_trees(STALE_SECONDS)
    part = tempfile.mkdtemp(prefix=f".{name}-", dir=top)
    try:
        with tarfile.open(fileobj=io.BytesIO(packed), mode="r:") as tar:
            tar.extractall(part, filter="data")
        os.chmod(part, 0o755)
        os.utime(part)  # used now, whatever the tar said of its top
        with contextlib.suppress(OSError):  # another task here put it in place first
            os.rename(part, dest)
    finally:
        shutil.rmtree(part, ignore_errors=True)


STALE_SECONDS = 86400.0
"""A tree no task used for this long is removed when the node unpacks another one."""


def collect_trees(keep_seconds: float, *, dry_run: bool = False) -> list[tuple[str, int]]:
    """Remove the node's trees no task used within `keep_seconds` (their mtime, touched by
    each task that uses one) and none holds now (a running task's shared lock), and the
    leftovers of unpacks older than that; each removed directory with its size. A tree is
    renamed aside under its exclusive lock before it is deleted, so a task sees it whole or
    not at all (and unpacks it again)."""
    top = trees_dir()
    try:
        names = sorted(os.listdir(top))
    except FileNotFoundError:
        return []
    gone = []
    now = time.time()
    for name in names:
        path = os.path.join(top, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # gone meanwhile, or not a directory
            continue
        try:
            if now - os.fstat(fd).st_mtime <= keep_seconds:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a task runs in it
                continue
            now_there = _stat(path)
            if now_there is None or not os.path.samestat(os.fstat(fd), now_there):
                continue
            size = _size(path)
            if not dry_run:
                aside = tempfile.mkdtemp(prefix=".gone-", dir=top)
                os.rename(path, os.path.join(aside, name))
                shutil.rmtree(aside, ignore_errors=True)
            gone.append((path, size))
        finally:
            os.close(fd)
    return gone


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@contextlib.contextmanager
def inside(root: str, job: Mapping[str, Any]) -> Iterator[None]:
    """For the block: the working directory `root` (the task's tree), the tree's import
    directories (`job["paths"]`, relative to it; the tree itself first) first on the import
    path, the driver's project directories off it. After it, whatever the block did: they and
    the environment's variables as they were, and the tree's modules dropped (`_drop`)."""
    cwd, path, environ = os.getcwd(), list(sys.path), dict(os.environ)
    try:
        os.chdir(root)
        driver = os.path.realpath(str(job["driver_root"]))
        sys.path[:] = [
            p
            for p in sys.path
            if not (os.path.realpath(p or ".") + os.sep).startswith(driver + os.sep)
        ]
        for rel in reversed([".", *job["paths"]]):
            p = os.path.normpath(os.path.join(root, rel))
            if p in sys.path:
                sys.path.remove(p)
            sys.path.insert(0, p)
        importlib.invalidate_caches()
        yield
    finally:
        with contextlib.suppress(OSError):
            os.chdir(cwd)
        sys.path[:] = path
        for name in set(os.environ) - set(environ):
            del os.environ[name]
        for name, value in environ.items():
            if os.environ.get(name) != value:
                os.environ[name] = value
        _drop(root)


def _drop(root: str) -> None:
    """Every module whose file (or package directory) lies in the tree at `root` out of
    `sys.modules`, the import system's caches of the tree's directories with them."""
    tops = tuple({os.path.realpath(root) + os.sep, os.path.abspath(root) + os.sep})

    def within(p: object) -> bool:
        # A string test for an absolute path (what the tree's absolute import path entries
        # give): resolving each of a worker's ~1,200 modules' paths cost ~70 ms a task.
        if not isinstance(p, str):
            return False
        if os.path.isabs(p):
            return (os.path.normpath(p) + os.sep).startswith(tops)
        return (os.path.realpath(p) + os.sep).startswith(tops)

    for name, module in list(sys.modules.items()):
        try:
            where = [getattr(module, "__file__", None), *(getattr(module, "__path__", None) or ())]
        except Exception:  # a module's odd __path__ (a lazy one): not the tree's
            continue
        if any(within(p) for p in where):
            del sys.modules[name]
    for p in [p for p in sys.path_importer_cache if within(p)]:
        del sys.path_importer_cache[p]
    importlib.invalidate_caches()
