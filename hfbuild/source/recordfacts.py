"""The facts of the no-import record (issue #20; the record itself is
`hfbuild/pipeline/record.py`): what a check's manifests rest on, captured and compared.

Facts, compared by `stat` data (a file: size, mtime, ctime, inode; a directory: the digest of
its names):
- every file and directory of the project, but `.git`, `__pycache__`, the store, virtual
  environments and doit's database (`.doit.db*`, which decides nothing), folded into one
  digest that a check walks the tree again to compare (one JSON entry per file made a
  20,000-file repository's record 2.4 MB, whose parse cost as much as the stats): the
  closure's files, dodo.py and whatever it imports or reads, the data files, the files
  arguments name or builds read, the directories listed (import resolution, globs,
  listings), `pyproject.toml`; the lock is a fact of its own (a check may rewrite it);
- each `sys.path` directory outside the project, as a directory (site-packages: its
  `*.dist-info` names carry the package versions), and `sys.path` itself;
- hfbuild's own files; git's index, HEAD and branch (a file's status); in index mode the digest
  of the index's entries instead of the index file (`git add` rewrites its stat data);
- the store's `objects/` and `observed/` subdirectories (which candidate key the store holds);
- a load's data files outside the project;
- the environment: a blake2b digest of every variable (but the shell's `_`, `OLDPWD`,
  `SHLVL`), never a value.
A file whose mtime or ctime lies within `RACY_NS` of the capture is recorded with a digest of
its content too (compared as well: a change within the file system's clock tick leaves the stat
data equal). A directory outside the project is listed again only when its mtime or inode
moved, or when it was within that margin.


The environment also as `hook_env_digest`: without what git and the pre-commit framework set for
a commit's hook (`HOOK_VARS`), for the staged answer (`keys/recordmanifests.py`).

Owns: capturing the facts (`capture`, the tree's walk `walk`), whether they hold now (`holds`),
whether two captures found the same state (`same_facts`; but for what a build changes,
`same_but_built`), a capture as a snapshot mode takes it
(`for_mode`), the environment digests, which untracked paths no fact covers (`outside_record`).
Must never: hold an environment value; import a user module or `datasets`; write anything;
put anything in a key.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import site
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable
from typing import Any

import xxhash

from hfbuild.source.gitrepo import index_digest, state_paths
from hfbuild.store.store import Store

RACY_NS = 2_000_000_000  # as the code cache's racy-git margin (caches.py)
_SKIP_NAMES = frozenset({".git", "__pycache__"})
_SHELL_VARS = frozenset({"_", "OLDPWD", "SHLVL"})
_HFBUILD_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _skipped(name: str) -> bool:
    return name in _SKIP_NAMES or name.startswith(".doit.db")


def _names_digest(names: Iterable[str]) -> str:
    return str(xxhash.xxh3_64_hexdigest("\0".join(sorted(names)).encode()))


def _content(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return str(xxhash.xxh3_128_hexdigest(f.read()))
    except OSError:
        return None


def env_digest() -> str:
    """A digest of the environment (names and values), without the shell's bookkeeping."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(os.environ):
        if k not in _SHELL_VARS:
            h.update(f"{k}\0{os.environ[k]}\0".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# -- facts ------------------------------------------------------------------------------------


class Tree:
    """The project's files and directories folded into one digest: each directory by its names
    (in order), each file by its stat data; a file within `RACY_NS` of `since` kept apart with
    a digest of its content. Not the store, environments, `.git`, `__pycache__`, doit's
    database, nor the lock (the check itself may rewrite it: a fact of its own)."""

    def __init__(self, skip_dirs: set[str], lock: str, since: int | None) -> None:
        self.h = xxhash.xxh3_128()
        self.racy: dict[str, list[Any]] = {}
        self.walked: set[str] = set()
        self.skip_dirs = skip_dirs
        self.lock = lock
        self.since = since
        self.ok = True

    def walk(self, path: str) -> None:
        self.walked.add(path)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            self.h.update(b"?\0")
            return
        for e in entries:
            if _skipped(e.name) or e.path == self.lock:
                continue
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if _excluded_dir(e.path, self.skip_dirs):
                    continue
                if e.is_symlink():  # a change inside would not show: no record
                    self.ok = False
                    continue
                self.h.update(f"d\0{e.name}\0".encode("utf-8", "surrogateescape"))
                self.walk(e.path)
                self.h.update(b"u\0")
                continue
            try:
                st = e.stat()
            except OSError:
                self.h.update(f"x\0{e.name}\0".encode("utf-8", "surrogateescape"))
                continue
            key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            self.h.update(f"f\0{e.name}\0{key}\0".encode("utf-8", "surrogateescape"))
            if self.since is not None and (key[1] >= self.since or key[2] >= self.since):
                self.racy[e.path] = [*key, _content(e.path)]

    def digest(self) -> str:
        return str(self.h.hexdigest())


class _Capture:
    def __init__(self) -> None:
        self.since = time.time_ns() - RACY_NS
        self.files: dict[str, list[Any] | None] = {}
        self.dirs: dict[str, list[Any] | None] = {}

    def file(self, path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            self.files[path] = None
            return
        key: list[Any] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        if st.st_mtime_ns >= self.since or st.st_ctime_ns >= self.since:
            key.append(_content(path))
        self.files[path] = key

    def directory(self, path: str) -> None:
        """A directory outside the project, by its names (not walked)."""
        try:
            st = os.stat(path)
        except OSError:
            self.dirs[path] = None
            return
        names = _listing(path, set())
        racy = st.st_mtime_ns >= self.since
        self.dirs[path] = [st.st_mtime_ns, st.st_ino, names, racy]


def _file_holds(path: str, want: list[Any] | None) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return want is None
    if want is None or want[:4] != [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]:
        return False
    return len(want) == 4 or _content(path) == want[4]


def _excluded_dir(full: str, skip_dirs: set[str]) -> bool:
    """A directory of the project that is no fact: the store, a virtual environment."""
    return os.path.realpath(full) in skip_dirs or os.path.exists(os.path.join(full, "pyvenv.cfg"))


def _listing(path: str, skip_dirs: set[str]) -> str | None:
    """The digest of a directory's names as `capture` takes it (skipped and excluded names
    left out)."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return None
    keep = []
    for e in entries:
        if _skipped(e.name):
            continue
        if e.is_dir() and _excluded_dir(e.path, skip_dirs):
            continue
        keep.append(e.name)
    return _names_digest(keep)


def _dir_holds(path: str, want: list[Any] | None, skip_dirs: set[str]) -> bool:
    if want is None:
        return not os.path.isdir(path)
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not want[3] and [st.st_mtime_ns, st.st_ino] == want[:2]:
        return True
    return _listing(path, skip_dirs) == str(want[2])


def walk(root: str, store: Store, lock: str) -> Tree:
    """The project's tree now, as `capture` takes it (files within `RACY_NS` with their
    content): `holds` compares it, and a full check that follows takes it as its facts before
    (one walk, not two: a 20,000-file tree costs ~0.3 s of CPU a walk)."""
    tree = Tree({os.path.realpath(store.root)}, lock, time.time_ns() - RACY_NS)
    tree.walk(root)
    return tree


def holds(
    facts: dict[str, Any],
    mode: str,
    root: str,
    store: Store,
    lock: str,
    tree: Callable[[], Tree] | None = None,
) -> bool:
    """Whether every fact of an entry holds now (`tree`: the walk of the tree, when the
    caller keeps it)."""
    for path, want in facts["files"].items():
        if not _file_holds(path, want):
            return False
    for path, want in facts["dirs"].items():
        if not _dir_holds(path, want, set()):
            return False
    if mode == "index" and index_digest(root) != facts.get("index"):
        return False
    walked = tree() if tree is not None else walk(root, store, lock)
    if not walked.ok or walked.digest() != facts["tree"]:
        return False
    return all(_file_holds(path, want) for path, want in facts["racy"].items())


def _installed() -> tuple[str, ...]:
    """The directories of installed code (the standard library, site-packages): a version
    there is its `*.dist-info` name, which the `sys.path` directories' listings hold."""
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    return tuple(os.path.realpath(d).rstrip(os.sep) + os.sep for d in dirs)


def _loaded_elsewhere(root: str) -> list[str]:
    """The files of modules this process loaded from outside the project and outside installed
    code (a directory on PYTHONPATH): dodo.py may take a value from one."""
    prefix = root.rstrip(os.sep) + os.sep
    installed = _installed()
    out = []
    for m in list(sys.modules.values()):
        f = getattr(m, "__file__", None)
        if not isinstance(f, str):
            continue
        full = os.path.realpath(f)
        if full.startswith(prefix) or full.startswith(installed):
            continue
        if full.startswith(_HFBUILD_DIR + os.sep):
            continue
        out.append(full)
    return out


def _outside_dirs(paths: list[str]) -> list[str]:
    """The directories that hold `paths` (data files outside the project), and every one
    between them and their common directory, where a glob may find a new file."""
    if not paths:
        return []
    common = os.path.commonpath([os.path.dirname(p) for p in paths])
    out = {common}
    for p in paths:
        d = os.path.dirname(p)
        while len(d) > len(common):
            out.add(d)
            d = os.path.dirname(d)
    return sorted(out)


def for_mode(facts: dict[str, Any] | None, mode: str, root: str) -> dict[str, Any] | None:
    """`facts` (a worktree-mode capture) as `mode` takes them: in index mode, the index's
    entries instead of the index file's stat data (`git add` rewrites that file)."""
    if facts is None or mode != "index":
        return facts
    digest = index_digest(root)
    if digest is None:
        return None
    index = {p for p in state_paths(root) if os.path.basename(p) == "index"}
    files = {p: v for p, v in facts["files"].items() if p not in index}
    return {**facts, "files": files, "index": digest}


def capture(
    root: str,
    store: Store,
    lock: str,
    extra_files: Iterable[str] = (),
    tree: Tree | None = None,
    paths: Iterable[str] | None = None,
) -> dict[str, Any] | None:
    """Every fact, now; None when the project cannot be recorded (a symlinked directory).
    `tree`: the project's walk taken just before (by `walk`, for the same lock), reused;
    `paths`: the `sys.path` entries to take (default this process's)."""
    c = _Capture()
    if tree is None or tree.lock != lock:
        tree = walk(root, store, lock)
    if not tree.ok:
        return None
    c.file(lock)
    for p in sys.path if paths is None else paths:
        full = os.path.realpath(p or os.curdir)
        if full in tree.walked or full in c.dirs:  # walked (not an environment in the project)
            continue
        if os.path.isdir(full):
            c.directory(full)
        else:
            c.file(full)
    for path in _loaded_elsewhere(root):
        c.file(path)
    for d, dirs, names in os.walk(_HFBUILD_DIR):  # every package of hfbuild
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        for name in sorted(names):
            if name.endswith(".py"):
                c.file(os.path.join(d, name))
    for p in state_paths(root):
        c.file(p)
    for d in store.key_dirs():
        c.directory(d)
        with contextlib.suppress(OSError):
            for e in os.scandir(d):
                if e.is_dir(follow_symlinks=False):
                    c.directory(e.path)
    extra = list(extra_files)
    for p in extra:
        if p not in c.files:
            c.file(p)
    for d in _outside_dirs(extra):
        if d not in c.dirs:
            c.directory(d)
    return {"tree": tree.digest(), "racy": tree.racy, "files": c.files, "dirs": c.dirs}


# -- the staged answer from the work tree's ------------------------------------------------

# What git sets for a commit's hooks and the pre-commit framework for its own: the environment
# a hook runs in, which the shell that ran `doit run` or `hfbuild status` lacks (the author
# date is new at every commit). Left out of `hook_env_digest` only: a dodo.py whose arguments
# read one of them would be answered as in that shell (README: HFBUILD_RECORD=0).
HOOK_VARS = frozenset(
    {
        "GIT_AUTHOR_DATE",
        "GIT_AUTHOR_EMAIL",
        "GIT_AUTHOR_NAME",
        "GIT_COMMITTER_DATE",
        "GIT_COMMITTER_EMAIL",
        "GIT_COMMITTER_NAME",
        "GIT_EDITOR",
        "GIT_EXEC_PATH",
        "GIT_INDEX_FILE",
        "GIT_PREFIX",
        "GIT_REFLOG_ACTION",
        "PRE_COMMIT",
        "PWD",  # the shell's name for the working directory, which the context holds
    }
)


def hook_env_digest(root: str) -> str | None:
    """`env_digest` without the variables of a commit's hook (and `PATH` without the
    `GIT_EXEC_PATH` git puts first); None when `GIT_INDEX_FILE` names an index other than the
    repository's (`git commit -a` or `git commit PATH` stage into a temporary one)."""
    env = dict(os.environ)
    named = env.get("GIT_INDEX_FILE")
    if named is not None:
        index = [p for p in state_paths(root) if os.path.basename(p) == "index"]
        if [os.path.realpath(named)] != [os.path.realpath(p) for p in index]:
            return None
    exec_path = env.get("GIT_EXEC_PATH")
    path = env.get("PATH")
    if exec_path and path is not None and path.startswith(exec_path + os.pathsep):
        env["PATH"] = path[len(exec_path) + 1 :]
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(env):
        if k not in _SHELL_VARS and k not in HOOK_VARS:
            h.update(f"{k}\0{env[k]}\0".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def outside_record(root: str, store: Store, rel: str) -> bool:
    """An untracked path no fact of the record covers and no check reads: doit's database,
    `__pycache__`, the store, a virtual environment (`unstaged` names an untracked directory
    once, with a trailing "/")."""
    parts = rel.rstrip("/").split("/")
    if any(_skipped(part) for part in parts):
        return True
    skip = {os.path.realpath(store.root)}
    full = os.path.join(root, *parts)
    return rel.endswith("/") and _excluded_dir(full, skip)


def same_but_built(start: Any, end: dict[str, Any], lock: str, store: Store) -> bool:
    """Whether `end` found the state `start` did but for what building changes: the lock and
    the store's key directories; files and directories compared where both captures took
    them (a building process loads more modules; a side check adds its `sys.path`)."""
    if not isinstance(start, dict):
        return False
    inside = os.path.realpath(store.root).rstrip(os.sep) + os.sep

    def common(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        files = a.get("files") or {}
        dirs = a.get("dirs") or {}
        keep = [d for d in dirs if d in b["dirs"] and not (d + os.sep).startswith(inside)]
        return {
            **a,
            "files": {p: files[p] for p in files if p in b["files"]},
            "dirs": {d: dirs[d] for d in keep},
        }

    return same_facts(common(start, end), common(end, start), ignore=[lock])


def _names(dirs: dict[str, list[Any] | None]) -> dict[str, str | None]:
    """Each directory's names: what a check's own writes (doit's database) leave alone."""
    return {p: None if v is None else str(v[2]) for p, v in dirs.items()}


def same_facts(a: Any, b: dict[str, Any], ignore: Iterable[str] = ()) -> bool:
    """Whether two captures, `a` first, found the same state: files by stat data (and content,
    when racy), directories by their names; `ignore`: files left out (the lock)."""
    if not isinstance(a, dict) or a.get("index") != b.get("index") or a.get("tree") != b["tree"]:
        return False
    if _names(a.get("dirs") or {}) != _names(b["dirs"]):
        return False
    racy = a.get("racy") or {}
    for path, old in racy.items():  # the tree's stat data is the same: their content too?
        if not _same_file(path, old, b["racy"].get(path) or old[:4]):
            return False
    files = a.get("files") or {}
    skip = set(ignore)
    if files.keys() - skip != b["files"].keys() - skip:
        return False
    return all(_same_file(p, files[p], new) for p, new in b["files"].items() if p not in skip)


def _same_file(path: str, old: list[Any] | None, new: list[Any] | None) -> bool:
    """Whether two captures of one file, `old` first, found it the same."""
    if old is None or new is None:
        return old == new
    if old[:4] != new[:4]:
        return False
    if len(old) == 5:
        # Racy then: its content then against its content later (the stat data is the same).
        return bool(old[4] == (new[4] if len(new) == 5 else _content(path)))
    return True
