"""The no-import record (issue #20): what a full check computed, with every fact it rested on,
so that the next check answers from it without importing dodo.py or a transform module.

A full check (`hfbuild status`, `explain`, `graph`, `verify [--staged]`, `build`, or doit's
up-to-date checks) imports dodo.py and the modules its stages' functions live in, and computes
every stage's manifest. When it computed them without a failed stage or a warning, it leaves an
entry: the manifests as they were, the pipeline's shape (stage names, kinds, inputs, store,
lock, remote, task name) and the facts. The next check in the same context whose facts all
hold takes the manifests from the entry; everything after (the store's answer, the lock, the
refs, what is printed) is the ordinary code's.

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

An entry is used only once *confirmed*: a second full check under the same facts computed the
same manifests. One that computed others is *volatile* (arguments from the clock, from random,
from the network) and every check in that context takes the full path while dodo.py is the same
file. The facts are captured before the check imports anything (doit: before it computes the
manifests) and again at exit; an entry is written only when nothing but the lock changed in
between, and never by a process that built or pulled anything.

`verify --staged` and a check after `git add` derive their manifests from the confirmed
work-tree entry (`staged_as_worktree`) when its facts hold but the index file's stat data and
the index holds what the work tree does; its context is matched with the environment taken
without what git and the pre-commit framework set for a hook (`hook_env_digest`). A full check
that missed walks the tree once: the walk `holds` took is `begin`'s facts.

Owns: the record file (`Store.record_path`, in the default store: the CLI finds it before it
knows anything dodo.py says), its entries per context (who asks, snapshot mode, interpreter,
working directory, `sys.path`, environment digest), the facts, confirmation and volatility.
`HFBUILD_RECORD=0` turns it off.
Must never: answer when one fact differs or the entry is unconfirmed or volatile; hold an
environment value; import a user module or `datasets`; put anything in a key.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import os
import site
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable
from typing import Any

import xxhash

from hfbuild.keys.argpaths import named_files
from hfbuild.keys.fingerprint import data_file_ids
from hfbuild.keys.fullkey import is_listing, listing_at, listing_dir, listing_id
from hfbuild.keys.manifest import Manifest, ShardIn
from hfbuild.keys.manifests import Manifests
from hfbuild.source.envvars import observed_name
from hfbuild.source.gitrepo import (
    FileId,
    find_root,
    index_digest,
    staged_entries,
    state_paths,
    unstaged,
)
from hfbuild.source.gitstate import Snapshot
from hfbuild.store import sharing
from hfbuild.store.paths import default_root
from hfbuild.store.store import Store

FORMAT = 2
KEEP = 8  # contexts kept per dodo file
RACY_NS = 2_000_000_000  # as the code cache's racy-git margin (caches.py)
_SKIP_NAMES = frozenset({".git", "__pycache__"})
_SHELL_VARS = frozenset({"_", "OLDPWD", "SHLVL"})
_HFBUILD_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NeedsImport(Exception):
    """A pipeline built from the record was asked for what only dodo.py can answer: the
    command runs again on the imported pipeline (never seen by a user)."""


# True while `project.load_pipeline` imports a dodo file: the command's session is attached
# after, so the `pipe.tasks()` it starts is not doit's.
cli_loading = False


def enabled() -> bool:
    return os.environ.get("HFBUILD_RECORD", "").strip() not in {"0", "false", "no"}


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


class _Tree:
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


def walk(root: str, store: Store, lock: str) -> _Tree:
    """The project's tree now, as `capture` takes it (files within `RACY_NS` with their
    content): `holds` compares it, and a full check that follows takes it as its facts before
    (one walk, not two: a 20,000-file tree costs ~0.3 s of CPU a walk)."""
    tree = _Tree({os.path.realpath(store.root)}, lock, time.time_ns() - RACY_NS)
    tree.walk(root)
    return tree


def holds(
    facts: dict[str, Any],
    mode: str,
    root: str,
    store: Store,
    lock: str,
    tree: Callable[[], _Tree] | None = None,
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
    tree: _Tree | None = None,
) -> dict[str, Any] | None:
    """Every fact, now; None when the project cannot be recorded (a symlinked directory).
    `tree`: the project's walk taken just before (by `walk`, for the same lock), reused."""
    c = _Capture()
    if tree is None or tree.lock != lock:
        tree = walk(root, store, lock)
    if not tree.ok:
        return None
    c.file(lock)
    for p in sys.path:
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
_HOOK_VARS = frozenset(
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
        if k not in _SHELL_VARS and k not in _HOOK_VARS:
            h.update(f"{k}\0{env[k]}\0".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _status(wt: str, staged: tuple[str, int, str | None] | None) -> str | None:
    """A project file's status once the index holds its work-tree id `wt` (None: not staged,
    so git-ignored, as nothing untracked is left); "" when the derivation cannot say."""
    if staged is None:
        return None
    blob, filemode, head = staged
    if blob != wt or filemode == 0o120000:  # a symlink counts by its target: not derived
        return ""
    return "clean" if head == blob else "staged"


def staged_as_worktree(ms: Manifests, mode: str, root: str, store: Store) -> Manifests | None:
    """The manifests `mode` computes, from `ms` (computed over the work tree) when the index
    holds what the work tree does: nothing modified, deleted or untracked (`unstaged`), every
    closure file staged with its id, every listing a build read the same in the index, no
    variable of a commit's hook read; else None. In index mode nothing is dirty; in work-tree
    mode a file is "staged" when HEAD holds other content, else clean. A sharded stage, a
    directory an argument names and a symlink are not derived."""
    pending = unstaged(root)
    if pending is None or any(not _outside_record(root, store, p) for p in pending):
        return None
    names: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {}
    for name in ms:
        m = ms.ok[name]
        doc = m.doc
        if m.shards is not None or any(
            isinstance(e, list) and len(e) == 3 and isinstance(e[2], dict)
            for e in doc.get("paths") or []
        ):
            return None
        if any(isinstance(e, list) and e and e[0] in _HOOK_VARS for e in doc.get("env") or []):
            return None
        code = [(str(p), str(i)) for p, i in (doc.get("code") or {}).get("files") or []]
        data = [*data_file_ids(doc).items(), *named_files(doc)]
        data = [(p, i) for p, i in data if not p.startswith("<outside>/")]
        names[name] = (code, data)
    rels = sorted({p for code, data in names.values() for p, _ in [*code, *data]})
    staged = staged_entries(root, rels)
    snap: Snapshot | None = None
    out: dict[str, Manifest] = {}
    for name in ms:
        m = ms.ok[name]
        code, data = names[name]
        dirty: list[FileId] = []
        for p, i in code:
            st = _status(i, staged.get(p))
            if not st:  # a closure file not staged: index mode refuses it
                return None
            if st == "staged":
                dirty.append(FileId(p, i, "staged"))
        for p, i in data:
            st = _status(i, staged.get(p))
            if st == "":
                return None
            if st == "staged":
                dirty.append(FileId(p, i, "staged", "data"))
        for path, ident in m.observed:
            var = observed_name(path)
            if var is not None:
                if var in _HOOK_VARS:
                    return None
            elif is_listing(path):
                snap = snap or Snapshot(root, "index")
                if listing_id(listing_at(listing_dir(path), snap)) != ident:
                    return None
        if mode == "index":
            dirty = []
        out[name] = dataclasses.replace(m, dirty=tuple(sorted(dirty, key=lambda f: f.path)))
    return Manifests(list(ms), out, {})


def _outside_record(root: str, store: Store, rel: str) -> bool:
    """An untracked path no fact of the record covers and no check reads: doit's database,
    `__pycache__`, the store, a virtual environment (`unstaged` names an untracked directory
    once, with a trailing "/")."""
    parts = rel.rstrip("/").split("/")
    if any(_skipped(part) for part in parts):
        return True
    skip = {os.path.realpath(store.root)}
    full = os.path.join(root, *parts)
    return rel.endswith("/") and _excluded_dir(full, skip)


# -- manifests as JSON --------------------------------------------------------------------------


def dump_manifests(ms: Manifests) -> dict[str, Any] | None:
    """The manifests as JSON; None when one stage failed (its error is the full path's)."""
    if ms.failed:
        return None
    if any(ms.ok[name].hub for name in ms):
        # A Hub load's revision moves with no file of the project's changing (offline, the
        # cache's refs/; online, the Hub): such a pipeline's manifests are computed in full.
        return None
    stages: dict[str, Any] = {}
    for name in ms:
        m = ms.ok[name]
        stages[name] = {
            "doc": m.doc,
            "dirty": [[f.path, f.id, f.status, f.kind] for f in m.dirty],
            "incomplete": list(m.incomplete),
            "data_files": m.data_files,
            "observed": [list(p) for p in m.observed],
            "shards": None if m.shards is None else [list(s) for s in m.shards],
            "shard_code": m.shard_code,
            "outside": list(m.outside),
            "pending": list(m.pending),  # inputs not built yet (inputid.py)
            "fingerprint": m.fingerprint,
        }
    try:
        text = json.dumps({"names": list(ms), "stages": stages}, sort_keys=True)
    except (TypeError, ValueError):
        return None
    doc: dict[str, Any] = json.loads(text)
    again = load_manifests(doc)
    if any(again.ok[n].fingerprint != ms.ok[n].fingerprint for n in ms):
        return None  # the JSON does not carry the key whole: never answer from it
    return doc


def load_manifests(doc: dict[str, Any]) -> Manifests:
    ok: dict[str, Manifest] = {}
    for name in doc["names"]:
        s = doc["stages"][name]
        ok[name] = Manifest(
            doc=s["doc"],
            dirty=tuple(FileId(p, i, st, k) for p, i, st, k in s["dirty"]),
            incomplete=tuple(s["incomplete"]),
            data_files=s["data_files"],
            observed=tuple((str(p), str(i)) for p, i in s["observed"]),
            shards=None if s["shards"] is None else tuple(ShardIn(*x) for x in s["shards"]),
            shard_code=s["shard_code"],
            outside=tuple(s["outside"]),
            pending=tuple(s.get("pending") or ()),
        )
    return Manifests(list(doc["names"]), ok, {})


def _outside_data(doc: dict[str, Any], root: str) -> list[str]:
    """The data files of load stages that lie outside the project (absolute paths)."""
    out: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, str):
            if os.path.isabs(x) and not x.startswith(root.rstrip(os.sep) + os.sep):
                out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for s in doc["stages"].values():
        walk(s["data_files"])
    return out


# -- the record file ----------------------------------------------------------------------------


def _names(dirs: dict[str, list[Any] | None]) -> dict[str, str | None]:
    """Each directory's names: what a check's own writes (doit's database) leave alone."""
    return {p: None if v is None else str(v[2]) for p, v in dirs.items()}


def _same_facts(a: Any, b: dict[str, Any], ignore: Iterable[str] = ()) -> bool:
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


def _read(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return []
    entries = doc.get("entries")
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


class Session:
    """The record of one dodo file for one process: answers per snapshot mode, and the entry
    this process leaves at exit when it took the full path."""

    def __init__(self, dodo: str, who: str) -> None:
        self.dodo = os.path.realpath(dodo)
        directory = os.path.dirname(self.dodo)
        self.root = find_root(directory) or directory
        self.store = Store(default_root(self.root))
        rel = os.path.relpath(self.dodo, self.root).replace(os.sep, "/")
        self.path = self.store.record_path(str(xxhash.xxh3_128_hexdigest(rel.encode())))
        self.who = who
        self.entries = _read(self.path)
        self.base = {
            "format": FORMAT,
            "who": who,
            "dodo": self.dodo,
            "exe": sys.executable,
            "python": sys.version,
            "cwd": os.getcwd(),
            "path": list(sys.path),
            "env": env_digest(),
        }
        self._answers: dict[str, Manifests | None] = {}
        self.shape: Callable[[], dict[str, Any]] | None = None
        self.start: dict[str, dict[str, Any] | None] = {}
        self.pending: dict[str, dict[str, Any]] = {}
        self.dropped = False
        self._registered = False
        self._walked: dict[str, _Tree] = {}  # lock -> the tree `answer` walked, for `begin`
        self.sources: dict[str, dict[str, Any]] = {}  # mode -> the entry that answered it
        self.hook_env = hook_env_digest(self.root)

    @property
    def lock(self) -> str:
        """The lock file: the pipeline's once it is known, else the default name."""
        name = self.shape()["lock"] if self.shape is not None else "hfbuild.lock"
        return os.path.join(self.root, name)

    def _lock_of(self, entry: dict[str, Any]) -> str:
        return os.path.join(self.root, (entry.get("pipeline") or {}).get("lock", "hfbuild.lock"))

    def context(self, mode: str) -> dict[str, Any]:
        return {**self.base, "mode": mode}

    def entry(self, mode: str) -> dict[str, Any] | None:
        ctx = self.context(mode)
        return next((e for e in self.entries if e.get("context") == ctx), None)

    def answer(self, mode: str) -> Manifests | None:
        """The recorded manifests of `mode` when its entry is confirmed and every fact holds
        (checked once per process), else None."""
        if self.dropped:
            return None
        if mode not in self._answers:
            e = self.entry(mode)
            got = None
            try:
                if e is not None and self._usable(e):
                    lock = self._lock_of(e)
                    if holds(
                        e["facts"], mode, self.root, self.store, lock, lambda: self._tree(lock)
                    ):
                        got = load_manifests(e["manifests"])
                        self.sources[mode] = e
                if got is None:
                    got = self._derived(mode)
            except (KeyError, TypeError, ValueError, AttributeError):
                got = None  # an entry not of this shape (edited by hand): the full path
            self._answers[mode] = got
        return self._answers[mode]

    def _usable(self, e: dict[str, Any]) -> bool:
        return e.get("state") == "confirmed" and (
            self.shape is None or self.shape() == e.get("pipeline")
        )

    def _derived(self, mode: str) -> Manifests | None:
        """`mode`'s manifests derived from the confirmed work-tree entry of this context (but
        for the variables a commit's hook runs with) when every fact of it holds but the index
        file's stat data, and what is staged is what the work tree holds (`staged_as_worktree`):
        the usual commit (`doit run`, `git add -A`, `git commit`) is answered without dodo.py."""
        if mode not in ("index", "worktree") or self.hook_env is None:
            return None
        ctx = {**self.context("worktree"), "env": None}
        w = next(
            (
                e
                for e in self.entries
                if isinstance(e.get("context"), dict)
                and {**e["context"], "env": None} == ctx
                and e.get("hook_env") == self.hook_env
                and self._usable(e)
            ),
            None,
        )
        if w is None:
            return None
        index = {p for p in state_paths(self.root) if os.path.basename(p) == "index"}
        facts = {**w["facts"], "files": {p: v for p, v in w["facts"]["files"].items()}}
        for p in index:
            facts["files"].pop(p, None)
        lock = self._lock_of(w)
        if not holds(facts, "worktree", self.root, self.store, lock, lambda: self._tree(lock)):
            return None
        got = staged_as_worktree(load_manifests(w["manifests"]), mode, self.root, self.store)
        if got is not None:
            self.sources[mode] = w
        return got

    def _tree(self, lock: str) -> _Tree:
        """The project's walk for `lock`, taken once until `begin` takes it as its facts."""
        if lock not in self._walked:
            self._walked[lock] = walk(self.root, self.store, lock)
        return self._walked[lock]

    def begin(self, *modes: str) -> None:
        """Capture the facts before a full computation of `modes` (once per mode)."""
        todo = [m for m in modes if m not in self.start]
        if self.dropped or not todo:
            return
        lock = self.lock
        facts = capture(self.root, self.store, lock, tree=self._walked.pop(lock, None))
        self._walked.clear()
        for mode in todo:
            self.start[mode] = for_mode(facts, mode, self.root)

    def computed(self, mode: str, ms: Manifests, *, clean: bool) -> None:
        """A full computation of `mode` gave `ms`; `clean`: without a warning or a stand-in."""
        if self.dropped or mode in self.pending:
            return
        doc = dump_manifests(ms) if clean else None
        if doc is None or self.start.get(mode) is None or self.shape is None:
            self.start[mode] = None
            return
        self.pending[mode] = doc
        if not self._registered:
            self._registered = True
            atexit.register(self.finish)

    def drop(self) -> None:
        """Something was built or pulled: this process neither answers nor records."""
        self.dropped = True
        self._answers.clear()

    def finish(self) -> None:
        """At exit: write an entry per mode computed in full, when the facts at exit are the
        facts before (but the lock, which the check itself may rewrite)."""
        if self.dropped or not self.pending or self.shape is None:
            return
        with contextlib.suppress(OSError, ValueError, TypeError):
            self._write()

    def _write(self) -> None:
        assert self.shape is not None
        shape = self.shape()
        entries = _read(self.path)
        lock = os.path.join(self.root, shape.get("lock", "hfbuild.lock"))
        extra = sorted({p for doc in self.pending.values() for p in _outside_data(doc, self.root)})
        now = capture(self.root, self.store, lock, extra)
        try:
            st = os.stat(self.dodo)
            dodo_stat: list[int] | None = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        except OSError:
            dodo_stat = None
        for mode, doc in self.pending.items():
            start = self.start.get(mode)
            end = for_mode(now, mode, self.root)
            if start is None or end is None:
                continue
            # The CLI's first capture precedes dodo.py's import, so it lacks the modules loaded
            # from elsewhere and the data outside: what both hold, the same (but the lock).
            both = {
                **start,
                "files": {p: start["files"][p] for p in start["files"] if p in end["files"]},
            }
            trimmed = {**end, "files": {p: end["files"][p] for p in both["files"]}}
            if not _same_facts(both, trimmed, ignore=[lock]):
                continue
            ctx = self.context(mode)
            old = next((e for e in entries if e.get("context") == ctx), None)
            state = "new"
            if (
                old is not None
                and old.get("state") == "volatile"
                and old.get("volatile_dodo") == dodo_stat
            ):
                state = "volatile"
            if old is not None and _same_facts(old.get("facts"), end) and state != "volatile":
                same = old.get("manifests") == doc and old.get("pipeline") == shape
                state = "confirmed" if same else "volatile"
            entry = {
                "context": ctx,
                "facts": end,
                "manifests": doc,
                "pipeline": shape,
                "state": state,
                "volatile_dodo": dodo_stat if state == "volatile" else None,
                "hook_env": self.hook_env,
            }
            entries = [entry] + [e for e in entries if e.get("context") != ctx]
        sharing.makedirs(os.path.dirname(self.path))
        sharing.write_json_atomic(
            self.path, {"format": FORMAT, "entries": entries[:KEEP]}, durable=False, indent=None
        )


def session(dodo: str, who: str) -> Session | None:
    """The record session of `dodo` for this process, or None (turned off, or no dodo)."""
    if not enabled() or not os.path.isfile(dodo):
        return None
    return Session(dodo, who)
