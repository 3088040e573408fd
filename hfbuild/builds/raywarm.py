"""A Ray task's place in a warm worker: its tree on the node, and the process as it ran in.

A task asks for no `runtime_env`: Ray gives a task a worker only of its own runtime_env, so a
tree per stage in one would start a worker process per stage (~1 s, and ~0.85 s importing
datasets, hfbuild and s3fs again). The driver packs each distinct tree once (`raytree.pack`)
and puts it in Ray's object store; the job names it by the digest of its bytes
(`{"tree": [digest, [ref]]}`, the reference nested, so that Ray does not fetch it for a
task whose node holds the tree).

Owns: a tree materialized once per node, in a directory named by its digest under
`<tmp>/hfbuild-ray-trees-<uid>` (`tree_dir`: the bytes checked against the digest, unpacked
beside it and renamed into place, so concurrent tasks on a node each see it whole or not at
all; a task run by hand in its tree, with no tree in its job, takes its working directory);
and the process's state for one task's duration (`inside`): its working directory the tree,
the tree first on the import path (with the driver's own project directories, which Ray puts
on a worker's path, off it), the task's variables (`raytree.task_env`) set; afterwards, the
task failing too, the working directory, import path and environment as they were, every
module whose file lies in the tree dropped from `sys.modules` and the import system's caches
invalidated, so the next task imports its code from its own tree.

Must never: let a module, variable, path entry or working directory of one task's tree reach
the next task; use a tree whose bytes are not its digest's; read the driver's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any


def digest(packed: bytes) -> str:
    """The name of a packed tree: the SHA-256 of its bytes."""
    return hashlib.sha256(packed).hexdigest()


def trees_dir() -> str:
    """The node's materialized trees, one directory each, named by its digest."""
    return os.path.join(tempfile.gettempdir(), f"hfbuild-ray-trees-{os.getuid()}")


def tree_dir(job: Mapping[str, Any]) -> str:
    """The directory of the tree the job names, unpacked on this node the first time a task
    here needs it; a job naming none: the working directory (a task run in its tree)."""
    tree = job.get("tree")
    if tree is None:
        return os.getcwd()
    name, (ref,) = str(tree[0]), tree[1]
    top = trees_dir()
    dest = os.path.join(top, name)
    if os.path.isdir(dest):
        return dest
    import ray

    packed: bytes = ray.get(ref)
    if digest(packed) != name:
        from hfbuild.core.errors import BuildError

        raise BuildError(
            f"stage {job['stage']!r}: the tree this Ray task received is not the one it was "
            f"sent with (digest {name}); build again."
        )
    os.makedirs(top, exist_ok=True)
    part = tempfile.mkdtemp(prefix=f".{name}-", dir=top)
    try:
        with tarfile.open(fileobj=io.BytesIO(packed), mode="r:") as tar:
            tar.extractall(part, filter="data")
        os.chmod(part, 0o755)
        with contextlib.suppress(OSError):  # another task here put it in place first
            os.rename(part, dest)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return dest


@contextlib.contextmanager
def inside(root: str, job: Mapping[str, Any]) -> Iterator[None]:
    """For the block: the working directory `root` (the task's tree), the tree's import
    directories (`job["paths"]`, relative to it; the tree itself first) first on the import
    path, the driver's project directories off it, the job's variables (`job["env"]`) set.
    After it, whatever the block did: all of them as they were, and the tree's modules
    dropped (`_drop`)."""
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
        os.environ.update({str(k): str(v) for k, v in (job.get("env") or {}).items()})
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
    top = os.path.realpath(root) + os.sep

    def within(p: object) -> bool:
        return isinstance(p, str) and (os.path.realpath(p) + os.sep).startswith(top)

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
