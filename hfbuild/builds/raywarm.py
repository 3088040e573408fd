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
duration, its mtime touched at the task's start and end; the task itself runs in a copy of it
no other task uses meanwhile, `<digest>.<n>`, the lowest slot no task holds (`_own_copy`: an
exclusive lock on the file `<digest>.<n>.lock`; its directories its own, its files hard links,
made once and kept for the slot's next task), since inotify reports every process's opens in
a build's watched directories (`watch.py`): in a shared one another task's imports, builds,
or its taking its place were this build's listings and reads (a listing of the root on Ray
that no local build records; a map's key other than a local build's); a task run by hand in
its tree, with no tree in its job, takes its working directory); the node's trees and tasks'
copies collected (`collect_trees`: those unused for longer than the keep time and held by no
task, renamed aside under an exclusive lock, then deleted; a copy's directory looked at by
`stat` only until its slot's lock is held; on each new unpack, those unused for a day, and by
`hfbuild gc` on each node, `raynodes`, by gc's keep time); and the process's state for one
task's duration (`inside`): its working directory the tree, the tree first on the import path
(with the driver's own project directories, which Ray puts on a worker's path, off it);
afterwards, the task failing too, the working directory, import path and environment as they
were, every module whose file lies in the tree dropped from `sys.modules` and the import
system's caches invalidated, so the next task imports its code from its own tree.

Must never: let a module, variable, path entry or working directory of one task's tree reach
the next task; run two tasks in one directory at once, or open a directory of a copy a task
holds; use a tree whose bytes are not its digest's; remove a tree a task holds; read the
driver's files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import io
import os
import re
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
    """For the block: this task's own copy (`_own_copy`) of the tree the job names, unpacked
    on this node the first time a task here needs it, marked used (its mtime, at the block's
    start and end) and held (a shared lock on it) so that `collect_trees` leaves it alone; a
    job naming none: the working directory (a task run in its tree)."""
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
                    with _own_copy(dest) as own:
                        yield own
                finally:
                    os.utime(fd)  # used until now
                return
        finally:
            os.close(fd)


@contextlib.contextmanager
def _own_copy(tree: str) -> Iterator[str]:
    """For the block: a copy of the node's `tree` that no other task uses meanwhile, the
    lowest slot `<tree>.<n>` no task holds (an exclusive lock on the file `<tree>.<n>.lock`
    beside it: taking a slot opens no directory of one), made once by hard links to the
    tree's files (its directories its own: `_link_copy`) and kept for the slot's next task,
    marked used (its mtime) as the block starts and ends. inotify reports any process's
    opens in a watched directory (`watch.py`): in a directory shared with another task, that
    task's imports and builds (or its `tree_dir`) would be this build's listings and reads."""
    n = 0
    while True:
        lock = f"{tree}.{n}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a task holds it: the next slot
            os.close(fd)
            n += 1
            continue
        now = _stat(lock)
        if now is not None and os.path.samestat(os.fstat(fd), now):
            break
        os.close(fd)  # collected after we opened it: again
    own = f"{tree}.{n}"
    try:
        if not os.path.isdir(own):
            _link_copy(tree, own)
        os.utime(own)
        try:
            yield own
        finally:
            with contextlib.suppress(OSError):
                os.utime(own)  # used until now
    finally:
        os.close(fd)


def _link_copy(tree: str, own: str) -> None:
    """`own` made a copy of `tree`: its directories made anew, its files hard links (a copy
    where a link is refused), its symbolic links as they are; built beside it and renamed
    into place."""
    part = tempfile.mkdtemp(prefix=f".{os.path.basename(own)}-", dir=os.path.dirname(own))
    try:
        for d, dirs, files in os.walk(tree):
            here = os.path.normpath(os.path.join(part, os.path.relpath(d, tree)))
            for name in [*dirs, *files]:
                src, dst = os.path.join(d, name), os.path.join(here, name)
                if os.path.islink(src):
                    os.symlink(os.readlink(src), dst)
                elif os.path.isdir(src):
                    os.mkdir(dst)
                else:
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copy2(src, dst)
            dirs[:] = [n for n in dirs if not os.path.islink(os.path.join(d, n))]
        os.chmod(part, 0o755)
        os.rename(part, own)
    finally:
        shutil.rmtree(part, ignore_errors=True)


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
    not at all (and unpacks it again); the tasks' copies of trees likewise, by their slots'
    locks (`_collect_slot`). A size counts the bytes the removals free: a file a copy shares
    with its tree (a hard link) counts once all its links are removed, by this call or
    before it (`_Links`), so a copy removed while its tree stays counts its directories only."""
    top = trees_dir()
    try:
        names = sorted(os.listdir(top))
    except FileNotFoundError:
        return []
    gone = []
    now = time.time()
    links = _Links(dry_run)
    slots = {m.group(1) for n in names if (m := _SLOT.match(n))}
    for slot in sorted(slots):  # a task's copy: never opened while a task holds it
        got = _collect_slot(top, slot, keep_seconds, now, links)
        if got is not None:
            gone.append(got)
    for name in names:
        if _SLOT.match(name):
            continue
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
            size = links.size(path)
            if not dry_run:
                aside = tempfile.mkdtemp(prefix=".gone-", dir=top)
                os.rename(path, os.path.join(aside, name))
                shutil.rmtree(aside, ignore_errors=True)
                links.removed()
            gone.append((path, size))
        finally:
            os.close(fd)
    return gone


_SLOT = re.compile(r"^([^.][^/]*\.\d+)(?:\.lock)?$")  # a task's copy `<tree>.<n>`, its lock


def _collect_slot(
    top: str, slot: str, keep_seconds: float, now: float, links: _Links
) -> tuple[str, int] | None:
    """A task's copy of a tree (`_own_copy`) no task used within `keep_seconds` and none
    holds, removed with its lock file (renamed aside first); the copy and its size. Its
    directory is looked at by `stat` only until its lock is held: a task's build watches it."""
    path, lock = os.path.join(top, slot), os.path.join(top, slot + ".lock")
    st = _stat(path) or _stat(lock)
    if st is None or now - st.st_mtime <= keep_seconds:
        return None
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a task runs in it
            return None
        here = _stat(lock)
        if here is None or not os.path.samestat(os.fstat(fd), here):
            return None
        st = _stat(path)
        if st is not None and now - st.st_mtime <= keep_seconds:  # used meanwhile
            return None
        size = links.size(path) if st is not None else 0
        if not links.dry_run:
            if st is not None:
                aside = tempfile.mkdtemp(prefix=".gone-", dir=top)
                os.rename(path, os.path.join(aside, slot))
                shutil.rmtree(aside, ignore_errors=True)
                links.removed()
            os.unlink(lock)
        return (path, size) if st is not None else None
    finally:
        os.close(fd)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


class _Links:
    """The bytes removing directories frees, over one collection: a file's size counts when
    the last of its links (`st_nlink`, plus those this collection removed) is among the
    directories removed. A dry run removes nothing and counts alike."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.taken: dict[tuple[int, int], int] = {}  # links met in the directories removed
        self.gone: dict[tuple[int, int], int] = {}  # links this collection removed
        self.pending: list[tuple[int, int]] = []

    def size(self, path: str) -> int:
        """The bytes removing `path` (next: `removed` after it) frees."""
        freed = 0
        self.pending = []
        for d, _, files in os.walk(path):
            for f in files:
                try:
                    st = os.lstat(os.path.join(d, f))
                except OSError:
                    continue
                ino = (st.st_dev, st.st_ino)
                self.taken[ino] = self.taken.get(ino, 0) + 1
                self.pending.append(ino)
                if self.taken[ino] == st.st_nlink + self.gone.get(ino, 0):
                    freed += st.st_size
        return freed

    def removed(self) -> None:
        """The directory last sized is removed: its links are gone."""
        for ino in self.pending:
            self.gone[ino] = self.gone.get(ino, 0) + 1
        self.pending = []


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
