"""What git says about files: repository discovery, blob ids, dirty and untracked status.

Owns: every pygit2 call in hfbuild. A `Snapshot` answers, for files under one project root,
"what is this file's git blob id, and is it committed?", either from the work tree (normal
builds) or from the index only (`verify --staged`: what the next commit will contain).
Must never: read history (shallow clones are the normal case in CI), write to the repository,
or let an absolute path escape into an answer (every answer names files repo-relatively).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pygit2
from pygit2 import GIT_STATUS_CURRENT
from pygit2.enums import DiffOption

from hfbuild.caches import RACY_NS, CodeCache
from hfbuild.errors import GitStateError, NotARepositoryError, UnmergedError

Mode = Literal["worktree", "index"]
# "ignored": an untracked file git is told to ignore (.gitignore, info/exclude): data kept out
# of git on purpose, which is not uncommitted (only data files are asked about it).
Status = Literal["clean", "modified", "staged", "untracked", "ignored", "norepo"]
# The statuses a tracked data file can have, as the code cache records them.
_RECORDED: dict[str, Status] = {"staged": "staged", "modified": "modified"}


@dataclass(frozen=True)
class FileId:
    """A file named relative to the project root, with the git blob id of its content."""

    path: str  # repo-relative, posix
    id: str  # 40-hex git blob id (what `git hash-object` prints for it)
    status: Status
    kind: Literal["code", "data"] = "code"  # data: a load's data file or a file_deps file

    @property
    def dirty(self) -> bool:
        """True when the id is not what HEAD's commit records (so it warns); a git-ignored
        data file is not: it cannot be committed."""
        return self.status not in ("clean", "ignored")


_lock = threading.Lock()
_repos: dict[str, pygit2.Repository] = {}
_discovered: dict[str, str | None] = {}


def _open(gitdir: str) -> pygit2.Repository:
    with _lock:
        repo = _repos.get(gitdir)
        if repo is None:
            repo = _repos[gitdir] = pygit2.Repository(gitdir)
        return repo


def _discover(directory: str) -> pygit2.Repository | None:
    """The repository whose work tree holds `directory`, or None; memoized per directory."""
    if directory not in _discovered:
        try:
            found = pygit2.discover_repository(directory)
        except pygit2.GitError:
            found = None
        _discovered[directory] = found
    gitdir = _discovered[directory]
    if gitdir is None:
        return None
    repo = _open(gitdir)
    return None if repo.is_bare or repo.workdir is None else repo


def find_root(path: str | os.PathLike[str]) -> str | None:
    """The real path of the work tree holding `path` (a file or directory), or None."""
    p = os.path.realpath(os.fspath(path))
    directory = p if os.path.isdir(p) else os.path.dirname(p)
    repo = _discover(directory)
    return None if repo is None else os.path.realpath(repo.workdir)


def require_root(path: str | os.PathLike[str]) -> str:
    """Like `find_root`, but a path outside any work tree is a user error."""
    root = find_root(path)
    if root is None:
        raise NotARepositoryError(
            f"{os.fspath(path)} is not inside a git work tree. hfbuild identifies code by git "
            f"blob ids: run `git init` there (committing is optional but gives stable caches)."
        )
    return root


def head_text(path: str | os.PathLike[str]) -> str | None:
    """The text HEAD's commit holds for the file at `path` (in the work tree holding it),
    or None: no repository, no commit yet, or no such file in it. Never the work tree's
    bytes: what is committed is what others reviewed (the root of trust for a pull)."""
    p = os.path.realpath(os.fspath(path))
    repo = _discover(os.path.dirname(p))
    if repo is None or repo.head_is_unborn:
        return None
    rel = os.path.relpath(p, os.path.realpath(repo.workdir)).replace(os.sep, "/")
    try:
        blob = repo[repo.head.peel(pygit2.Commit).tree[rel].id]
    except (KeyError, ValueError, pygit2.GitError):
        return None
    if not isinstance(blob, pygit2.Blob):
        return None
    return blob.data.decode("utf-8", errors="replace")


def _hash_worktree(repo: pygit2.Repository, rel_to_repo: str) -> str:
    """The blob id git would give this work-tree file: its clean filters (autocrlf,
    .gitattributes) applied, as `git hash-object` does. pygit2 has no wrapper for
    git_repository_hashfile, so it is called through pygit2's own cffi handle."""
    out = pygit2.ffi.new("git_oid *")
    err = pygit2.C.git_repository_hashfile(
        out, repo._repo, rel_to_repo.encode(), pygit2.C.GIT_OBJECT_BLOB, pygit2.ffi.NULL
    )
    if err < 0:
        raise GitStateError(f"git could not hash {rel_to_repo}: {pygit2.GitError.__name__} {err}")
    return str(pygit2.Oid(raw=bytes(pygit2.ffi.buffer(out)[:20])))


def _changed_in_worktree(
    repo: pygit2.Repository, index: pygit2.Index, paths: list[str]
) -> set[str]:
    """Which of `paths` (tracked, relative to `repo`) differ between `index` and the work
    tree: git's diff of the two (`git diff-files`), limited to exactly these paths (a
    pathspec list, matched literally), as `Index.diff_to_workdir` runs it but with the
    pathspec it does not expose, through pygit2's cffi handle."""
    from pygit2.errors import check_error
    from pygit2.utils import StrArray

    opts = pygit2.ffi.new("git_diff_options *")
    check_error(pygit2.C.git_diff_options_init(opts, 1))
    opts.flags = int(DiffOption.DISABLE_PATHSPEC_MATCH | DiffOption.SKIP_BINARY_CHECK)
    out = pygit2.ffi.new("git_diff **")
    try:
        with StrArray(paths) as arr:
            arr.assign_to(opts.pathspec)
            check_error(pygit2.C.git_diff_index_to_workdir(out, repo._repo, index._index, opts))
    except (pygit2.GitError, KeyError, ValueError):
        return set(paths)  # as if all changed: they are hashed, never taken from the index
    diff = pygit2.Diff.from_c(bytes(pygit2.ffi.buffer(out)[:]), repo)
    return {p for d in diff.deltas for p in (d.old_file.path, d.new_file.path)}


def hash_bytes(data: bytes) -> str:
    """The git blob id of raw bytes (no filters)."""
    return str(pygit2.hash(data))


def hash_file(path: str) -> str:
    """The git blob id of a file's raw bytes (no filters), for files outside any repository."""
    return str(pygit2.hashfile(path))


class Snapshot:
    """Blob ids of files under one project root, read once per fingerprint computation.

    `mode="worktree"`: a clean file's id comes from the index (no read, no hash); a modified or
    untracked file's id is the one git would give its content. `mode="index"`: ids come from
    the index only, and a file absent from the index does not exist.

    A root that is not in a git work tree is allowed (`repo is None`): every file is then
    identified by the blob id of its bytes and reported with status "norepo".
    """

    def __init__(
        self, root: str, mode: Mode = "worktree", code_cache: CodeCache | None = None
    ) -> None:
        self.root = os.path.realpath(root)
        # On POSIX a repo-relative path is already a path below the root: joining it is a
        # concatenation (a no-op in a big repo joins thousands of them).
        self._prefix = self.root if self.root.endswith("/") else self.root + "/"
        self.mode: Mode = mode
        self.repo = _discover(self.root)
        # Work-tree blob ids by stat data, and import scans, remembered across processes.
        self.code_cache = code_cache
        # What other modules derive from this snapshot (the import graph), kept with it.
        self.memo: dict[str, object] = {}
        self._ids: dict[str, FileId] = {}
        self._stats: dict[str, os.stat_result] = {}  # rel -> the lstat `file_id` took
        self._fresh: set[str] = set()
        self._real_dirs: dict[str, str] = {}
        self._indexes: dict[str, pygit2.Index] = {}
        self._dir_repos: dict[str, tuple[pygit2.Repository | None, str]] = {}
        self._trees: dict[tuple[str, str], pygit2.Tree | None] = {}
        self._heads: dict[str, pygit2.Oid | None] = {}
        self._states: dict[str, str | None] = {}
        self._ignored_dirs: dict[tuple[str, str], bool] = {}

    @classmethod
    def for_path(
        cls,
        path: str | os.PathLike[str],
        mode: Mode = "worktree",
        code_cache: CodeCache | None = None,
    ) -> Snapshot:
        """The snapshot of the work tree holding `path`, or of its directory if none does."""
        p = os.path.realpath(os.fspath(path))
        root = find_root(p) or (p if os.path.isdir(p) else os.path.dirname(p))
        return cls(root, mode, code_cache)

    # -- paths ---------------------------------------------------------------------------

    def rel(self, path: str | os.PathLike[str]) -> str | None:
        """`path` relative to the root (posix), or None when it lies outside.

        The directory part is resolved (so a root reached through a symlink still matches)
        but a symlinked file keeps its own name: it is the name Python imported it by."""
        p = os.path.abspath(os.fspath(path))
        d, base = os.path.split(p)
        real_dir = self._real_dirs.get(d)
        if real_dir is None:
            real_dir = self._real_dirs[d] = os.path.realpath(d)
        if real_dir.startswith(self.root + os.sep) and base not in ("", os.curdir, os.pardir):
            # The common case, without relpath's normalizing: a file in a directory below.
            return f"{real_dir[len(self.root) + 1 :]}{os.sep}{base}".replace(os.sep, "/")
        if real_dir == self.root and base not in ("", os.curdir, os.pardir):
            return base
        real = os.path.join(real_dir, base)
        try:
            r = os.path.relpath(real, self.root)
        except ValueError:  # another drive on Windows
            return None
        if r == os.curdir or r.startswith(os.pardir + os.sep) or r == os.pardir:
            return None
        return r.replace(os.sep, "/")

    def abspath(self, rel: str) -> str:
        if os.sep == "/":
            return self._prefix + rel
        return os.path.join(self.root, *rel.split("/"))

    def _repo_of(self, rel: str) -> tuple[pygit2.Repository, str] | None:
        """The repository tracking `rel` (a submodule's for files inside one) and the path
        relative to it."""
        if self.repo is None:
            return None
        directory, _, name = rel.rpartition("/")
        hit = self._dir_repos.get(directory)
        if hit is None:
            full = self.abspath(directory) if directory else self.root
            repo = _discover(full) if os.path.isdir(full) else self.repo
            if repo is None:
                hit = self._dir_repos[directory] = (None, "")
            else:
                wd = os.path.realpath(repo.workdir)
                inner_dir = os.path.relpath(full, wd).replace(os.sep, "/")
                if inner_dir == ".." or inner_dir.startswith("../"):
                    repo, inner_dir = self.repo, directory
                hit = self._dir_repos[directory] = (repo, "" if inner_dir == "." else inner_dir)
        repo, inner_dir = hit
        if repo is None:
            return None
        return repo, f"{inner_dir}/{name}" if inner_dir else name

    # -- files ---------------------------------------------------------------------------

    def _index(self, repo: pygit2.Repository) -> pygit2.Index:
        key = repo.path
        known = self._indexes.get(key)
        if known is not None:
            return known
        if self.mode == "worktree" and self.code_cache is not None:
            # The tree state is taken before the index is read in this snapshot, so ids
            # recorded under it are never older than it (see `_tree_state`).
            self._tree_state(repo)
        try:
            idx: pygit2.Index = repo.index
        except pygit2.GitError as e:
            raise GitStateError(
                f"the git index of {repo.workdir} cannot be read ({e}). Repair it with "
                f"`rm .git/index && git reset` in that repository."
            ) from e
        if key not in self._fresh:
            try:
                idx.read(False)  # re-read only if the index file changed on disk
            except pygit2.GitError as e:
                raise GitStateError(
                    f"the git index of {repo.workdir} cannot be read ({e}). Repair it with "
                    f"`rm .git/index && git reset` in that repository."
                ) from e
            self._fresh.add(key)
        self._indexes[key] = idx
        return idx

    def _staged(self, rel: str) -> tuple[pygit2.Repository, str, str] | None:
        """(repository, path within it, blob id) of the file's index entry, or None."""
        found = self._repo_of(rel)
        if found is None:
            return None
        repo, inner = found
        idx = self._index(repo)
        if inner not in idx:
            return None
        try:
            entry = idx[inner]
        except KeyError:  # in the index only as the sides of a merge conflict
            raise UnmergedError(
                f"{rel} has an unresolved merge conflict (it is unmerged in the git index): "
                f"resolve it, then `git add {rel}`."
            ) from None
        return repo, inner, str(entry.id)

    def _blob_bytes(self, repo: pygit2.Repository, blob_id: str) -> bytes:
        blob = repo[blob_id]
        assert isinstance(blob, pygit2.Blob)
        return blob.data

    def staged_dir(self, rel: str) -> bool:
        """Whether the index holds a file under directory `rel` (submodules included): a
        binary search of the sorted index, as a directory listing of what is staged."""
        found = self._repo_of(f"{rel}/-")  # a name inside that directory
        if found is None:
            return False
        repo, inner = found
        prefix = inner[: -len("-")].encode()
        idx = self._index(repo)
        c_index = idx._index
        count = int(pygit2.C.git_index_entrycount(c_index))
        if not prefix:
            return count > 0
        try:
            icase = bool(repo.config.get_bool("core.ignorecase"))
        except (KeyError, pygit2.GitError):
            icase = False
        if icase:  # entries are then sorted case-insensitively: no binary search
            return any(e.path.encode().startswith(prefix) for e in idx)

        def path_at(i: int) -> bytes:
            entry = pygit2.C.git_index_get_byindex(c_index, i)
            return bytes(pygit2.ffi.string(entry.path))

        lo, hi = 0, count
        while lo < hi:
            mid = (lo + hi) // 2
            if path_at(mid) < prefix:
                lo = mid + 1
            else:
                hi = mid
        return lo < count and path_at(lo).startswith(prefix)

    def staged_names(self, rel: str) -> list[str] | None:
        """The names directly in directory `rel` ("." for the root) as a commit of the
        index holds them: each staged file's, and each directory's holding one; with the
        names on disk git ignores (kept out of git on purpose: read from the work tree, as
        data files are). None when there is no such name: a checkout has no such
        directory. Submodules' entries are not looked into."""
        if self.repo is None:
            return None
        prefix = "" if rel == "." else rel + "/"
        names: set[str] = set()
        for entry in self._index(self.repo):
            path = entry.path
            if path.startswith(prefix):
                names.add(path[len(prefix) :].partition("/")[0])
        try:
            on_disk = os.listdir(self.abspath(prefix) if prefix else self.root)
        except OSError:
            on_disk = []
        for name in on_disk:
            if name not in names and name != ".git":
                inner = prefix + name
                if os.path.isdir(self.abspath(inner)):
                    inner += "/"
                if self._ignored_dir(self.repo, prefix.rstrip("/")) or self.repo.path_is_ignored(
                    inner
                ):
                    names.add(name)
        return sorted(names) if names else None

    def exists(self, rel: str) -> bool:
        if self.mode == "index":
            return self._staged(rel) is not None
        return os.path.isfile(self.abspath(rel))

    def read(self, rel: str) -> bytes:
        """The file's content as this snapshot sees it."""
        if self.mode == "index":
            staged = self._staged(rel)
            if staged is None:
                raise FileNotFoundError(rel)
            return self._blob_bytes(staged[0], staged[2])
        with open(self.abspath(rel), "rb") as f:
            return f.read()

    def content(self, rel: str, blob_id: str) -> bytes:
        """The bytes whose blob id is `blob_id`, for the file at `rel`: from git's object
        database when it holds that blob (a committed or staged file), else the file in the
        work tree, checked against the id. Raises GitStateError when neither has it."""
        found = self._repo_of(rel)
        if found is not None:
            try:
                return self._blob_bytes(found[0], blob_id)
            except (KeyError, ValueError):
                pass  # not in the object database: an uncommitted file
        try:
            with open(self.abspath(rel), "rb") as f:
                data = f.read()
        except OSError as e:
            raise GitStateError(f"{rel} cannot be read ({e.strerror}).") from e
        if hash_bytes(data) != blob_id:
            raise GitStateError(
                f"{rel} changed after its fingerprint was taken (blob {blob_id} expected): "
                f"run the build again."
            )
        return data

    def clean_id(self, rel: str) -> str | None:
        """The index's blob id when the file is tracked and unmodified, else None. Never
        hashes an untracked file (data files can be large)."""
        if self.mode == "worktree" and os.path.islink(self.abspath(rel)):
            return None
        staged = self._staged(rel)
        if staged is None:
            return None
        repo, inner, blob_id = staged
        if self.mode == "index":
            return blob_id
        try:
            flags = repo.status_file(inner)
        except (KeyError, pygit2.GitError):
            return None
        return blob_id if flags == GIT_STATUS_CURRENT else None

    def unmodified_ids(self, rels: Sequence[str]) -> dict[str, str]:
        """Of `rels` (work-tree mode), the tracked files whose work-tree content is their
        index entry's (git's own index-to-work-tree comparison: stat data, and the content
        of racily clean entries, filters applied), each with that entry's blob id; the
        others (untracked, modified, symlinks) are left out. One pass of git over the
        files of each repository, where `clean_id` asks git for the status of one file at
        a time (each reading the file's whole directory: quadratic over a directory of
        data files)."""
        found: dict[str, dict[str, tuple[str, str]]] = {}  # repo path -> inner -> (rel, id)
        repos: dict[str, pygit2.Repository] = {}
        for rel in rels:
            if os.path.islink(self.abspath(rel)):
                continue
            staged = self._staged(rel)
            if staged is not None:
                repo, inner, blob_id = staged
                repos[repo.path] = repo
                found.setdefault(repo.path, {})[inner] = (rel, blob_id)
        out: dict[str, str] = {}
        for key, files in found.items():
            changed = _changed_in_worktree(repos[key], self._index(repos[key]), list(files))
            out.update(dict(v for inner, v in files.items() if inner not in changed))
        return out

    def worktree_id(self, rel: str) -> str:
        """The blob id git would give the work-tree file now (filters applied), in either
        mode: data files that are not committed are read from the work tree even when code
        is read from the index."""
        found = self._repo_of(rel)
        if found is None:
            return hash_file(self.abspath(rel))
        return _hash_worktree(*found)

    def data_statuses(self, files: Sequence[tuple[str, str]]) -> dict[str, Status]:
        """Of data files given as (repo-relative path, blob id of the work-tree content),
        those that are not what HEAD's commit holds (work-tree mode), with their status:
        "staged" (only the index holds it), "modified" (the index holds other content),
        "untracked", "ignored" (untracked and git-ignored: kept out of git on purpose), or
        "norepo". Files the work tree lacks (absent data standing in from the lock) are
        left out: they are not the checkout's to commit. A symlink is judged by its link, as
        git stores it. For a set of tracked files, the answer is remembered in the code
        cache for the tree state (by a digest of the paths and ids), so a no-op over a
        thousand committed data files is one lookup, not a thousand."""
        out: dict[str, Status] = {}
        groups: dict[str, tuple[pygit2.Repository, list[tuple[str, str, str]]]] = {}
        for rel, blob_id in files:
            found = self._repo_of(rel)
            if found is None:
                if os.path.lexists(self.abspath(rel)):
                    out[rel] = "norepo"
                continue
            repo, inner = found
            groups.setdefault(repo.path, (repo, []))[1].append((rel, inner, blob_id))
        for repo, group in groups.values():
            out.update(self._data_group(repo, sorted(group, key=lambda g: g[1])))
        return out

    def _data_group(
        self, repo: pygit2.Repository, group: list[tuple[str, str, str]]
    ) -> dict[str, Status]:
        cache = self.code_cache
        state = self._tree_state(repo) if cache is not None else None
        key = None
        if cache is not None and state is not None:
            h = hashlib.blake2b(digest_size=16)
            for _, inner, blob_id in group:
                h.update(f"{inner}\0{blob_id}\n".encode())
            key = h.hexdigest()
            hit = cache.data_statuses(repo.path, state, key)
            if hit is not None:
                rels = {inner: rel for rel, inner, _ in group}
                return {
                    rels[inner]: _RECORDED[status]
                    for inner, status in hit
                    if inner in rels and status in _RECORDED
                }
        out: dict[str, Status] = {}
        recordable = True  # only tracked, present files: nothing else the tree state decides
        idx = self._index(repo)
        for rel, inner, blob_id in group:
            staged, head = self._read_tree_ids(repo, rel, inner, idx)
            full = self.abspath(rel)
            if staged is None:
                recordable = False
                if os.path.lexists(full):
                    out[rel] = "ignored" if self._ignored(repo, inner) else "untracked"
                continue
            if blob_id != staged:
                if not os.path.lexists(full):
                    recordable = False
                    continue
                link = os.path.islink(full)
                if not link or hash_bytes(os.fsencode(os.readlink(full))) != staged:
                    out[rel] = "modified"
                    continue
            if head != staged:
                out[rel] = "staged"
        if cache is not None and state is not None and key is not None and recordable:
            inners = {rel: inner for rel, inner, _ in group}
            cache.put_data_statuses(
                repo.path, state, key, [[inners[rel], status] for rel, status in out.items()]
            )
        return out

    def stageable(self, rels: Sequence[str]) -> list[str]:
        """Of `rels`, those `git add` can stage: tracked ones (a deletion is staged too), and
        untracked ones that exist and git does not ignore."""
        out = []
        for rel in rels:
            found = self._repo_of(rel)
            if found is None:
                continue
            repo, inner = found
            if self._read_tree_ids(repo, rel, inner)[0] is not None or (
                os.path.lexists(self.abspath(rel)) and not self._ignored(repo, inner)
            ):
                out.append(rel)
        return out

    def _ignored(self, repo: pygit2.Repository, inner: str) -> bool:
        """Whether git ignores the untracked file `inner`. A file below an ignored directory
        is ignored whatever its name (git does not look inside), so directories are asked
        first, once each: a git-ignored `data/` costs one question, not one per file."""
        directory = inner.rpartition("/")[0]
        return self._ignored_dir(repo, directory) or bool(repo.path_is_ignored(inner))

    def _ignored_dir(self, repo: pygit2.Repository, directory: str) -> bool:
        """Whether `directory` ("" for the top) or a directory above it is git-ignored."""
        if not directory:
            return False
        key = (repo.path, directory)
        hit = self._ignored_dirs.get(key)
        if hit is None:
            parent = directory.rpartition("/")[0]
            hit = self._ignored_dir(repo, parent) or bool(repo.path_is_ignored(directory + "/"))
            self._ignored_dirs[key] = hit
        return hit

    def hooks_dir(self) -> str | None:
        """Where git looks for hooks (core.hooksPath, else the common git dir's hooks/)."""
        if self.repo is None:
            return None
        try:
            custom = self.repo.config["core.hooksPath"]
        except KeyError:
            custom = None
        if custom:
            return os.path.join(self.root, os.path.expanduser(custom))
        gitdir = self.repo.path
        common = os.path.join(gitdir, "commondir")
        if os.path.isfile(common):  # a linked worktree: hooks live in the main git dir
            with open(common) as f:
                gitdir = os.path.normpath(os.path.join(gitdir, f.read().strip()))
        return os.path.join(gitdir, "hooks")

    def read_index_text(self, rel: str) -> str | None:
        """A file's staged content, or None when it is not in the index."""
        staged = self._staged(rel)
        if staged is None:
            return None
        return self._blob_bytes(staged[0], staged[2]).decode("utf-8", errors="replace")

    def text_at_commits(self, rel: str, n: int) -> list[str]:
        """The file's text at HEAD and up to n-1 first-parent ancestors (as far as a shallow
        clone has them); commits without the file are skipped."""
        repo = self.repo
        if repo is None or repo.head_is_unborn or n <= 0:
            return []
        out: list[str] = []
        commit: pygit2.Commit | None = repo.head.peel(pygit2.Commit)
        for _ in range(n):
            if commit is None:
                break
            try:
                blob = repo[commit.tree[rel].id]
                if isinstance(blob, pygit2.Blob):
                    out.append(blob.data.decode("utf-8", errors="replace"))
            except KeyError:
                pass
            try:
                commit = commit.parents[0] if commit.parents else None
            except (KeyError, pygit2.GitError):  # the edge of a shallow clone
                commit = None
        return out

    def line_stats(self, old_id: str, rel: str, new_id: str) -> tuple[int, int] | None:
        """(lines added, lines removed) from blob `old_id` to the file's content with id
        `new_id`, or None when the old blob is not in the repository (a shallow clone)."""
        if self.repo is None:
            return None
        try:
            old = self.repo[old_id]
        except (KeyError, ValueError):
            return None
        if not isinstance(old, pygit2.Blob):
            return None
        try:
            new = self.repo[new_id]
            patch = old.diff(new) if isinstance(new, pygit2.Blob) else None
        except (KeyError, ValueError):
            patch = None
        if patch is None:
            try:
                patch = old.diff_to_buffer(self.read(rel))
            except OSError:
                return None
        _, added, removed = patch.line_stats
        return added, removed

    def file_id(self, rel: str) -> FileId:
        """The blob id and status of the file at repo-relative `rel`; memoized per snapshot."""
        hit = self._ids.get(rel)
        if hit is None:
            hit = self._ids[rel] = self._file_id(rel)
        return hit

    def stat_of(self, rel: str) -> os.stat_result | None:
        """The stat data `file_id` took of `rel` in work-tree mode, when `rel` is no symlink
        (so it equals `os.stat` of the file at that moment); None otherwise."""
        return self._stats.get(rel)

    def _file_id(self, rel: str) -> FileId:
        full = self.abspath(rel)
        st: os.stat_result | None = None
        if self.mode == "worktree":
            try:
                st = os.lstat(full)  # one call for "is it a symlink" and its stat data
            except OSError:
                st = None  # reported below, where the file is read
            else:
                if not stat.S_ISLNK(st.st_mode):
                    self._stats[rel] = st
        if st is not None and stat.S_ISLNK(st.st_mode):
            # A symlink counts by the content it points to, not by the link text git stores.
            target = os.path.realpath(full)
            trel = self.rel(target)
            if trel is not None and not os.path.islink(target):
                pointed = self.file_id(trel)
                return FileId(rel, pointed.id, pointed.status)
            return FileId(rel, hash_file(target), "untracked")
        found = self._repo_of(rel)
        if found is None:
            return FileId(rel, hash_file(full), "norepo")
        repo, inner = found
        if self.mode == "index":
            idx = self._index(repo)
            if inner not in idx:
                raise GitStateError(
                    f"{rel} defines a stage but is not staged: `git add {rel}` so the commit "
                    f"contains it."
                )
            return FileId(rel, str(idx[inner].id), "clean")
        # git's status, from blob ids: the work-tree file's id (remembered by stat data in
        # the code cache, as git's index does) against the index's and HEAD's. One status
        # call per file costs ~0.6 ms in a 20,000-file repository; this, a few microseconds.
        worktree = self._worktree_id(repo, inner, full, st)
        staged, head = self._tree_ids(repo, rel, inner)
        if staged is None:
            return FileId(rel, worktree, "untracked")
        if worktree != staged:
            return FileId(rel, worktree, "modified")
        if head == staged:
            return FileId(rel, staged, "clean")
        # Staged but not committed: the index already holds exactly the work-tree content.
        return FileId(rel, staged, "staged")

    def _tree_ids(
        self, repo: pygit2.Repository, rel: str, inner: str
    ) -> tuple[str | None, str | None]:
        """(index id, HEAD id) of `inner` (None where there is no entry): from the code cache
        while the repository's tree state is the one they were recorded in, else read from
        the index and HEAD's trees (and recorded, unless the index file is racily new)."""
        cache = self.code_cache
        state = self._tree_state(repo) if cache is not None else None
        if cache is not None and state is not None:
            hit = cache.tree_ids(repo.path, state, inner)
            if hit is not None:
                return hit
        staged, head = self._read_tree_ids(repo, rel, inner)
        if cache is not None and state is not None:
            cache.put_tree_ids(repo.path, state, inner, staged, head)
        return staged, head

    def _read_tree_ids(
        self, repo: pygit2.Repository, rel: str, inner: str, idx: pygit2.Index | None = None
    ) -> tuple[str | None, str | None]:
        """(index id, HEAD id) of `inner`, read from the index (`idx`, the repository's
        index, when the caller has it) and HEAD's trees."""
        if idx is None:
            idx = self._index(repo)
        if inner not in idx:
            return None, None
        try:
            staged = str(idx[inner].id)
        except KeyError:  # in the index only as the sides of a merge conflict
            raise UnmergedError(
                f"{rel} has an unresolved merge conflict (it is unmerged in the git "
                f"index): resolve it, then `git add {rel}`."
            ) from None
        return staged, self._head_id(repo, inner)

    def _tree_state(self, repo: pygit2.Repository) -> str | None:
        """What the index and HEAD ids of every file depend on: the index file's stat data
        (size, mtime, ctime, inode; git replaces the file by a rename, so a new index is a new
        inode) and HEAD's commit. None (nothing recorded or trusted) while the index file is
        younger than 2 s, the racy-git window in which a rewrite could keep its stat data.
        Taken once per snapshot, before the index is read, and HEAD's trees are read from
        that same commit: ids read after it can only be newer than the state they are filed
        under, which then no longer matches the files."""
        key = repo.path
        if key in self._states:
            return self._states[key]
        state: str | None
        try:
            st = os.stat(os.path.join(repo.path, "index"))
        except FileNotFoundError:
            index = "none"
        except OSError:
            index = ""
        else:
            fresh = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) <= RACY_NS
            index = "" if fresh else f"{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
        head = self._head_commit(repo)
        state = f"{index}|{head}" if index else None
        self._states[key] = state
        return state

    def _head_commit(self, repo: pygit2.Repository) -> pygit2.Oid | None:
        """HEAD's commit id (None when unborn or unreadable), read once per snapshot."""
        key = repo.path
        if key not in self._heads:
            oid: pygit2.Oid | None = None
            if not repo.head_is_unborn:
                try:
                    oid = repo.head.peel(pygit2.Commit).id
                except (KeyError, pygit2.GitError):
                    oid = None
            self._heads[key] = oid
        return self._heads[key]

    def _worktree_id(
        self, repo: pygit2.Repository, inner: str, full: str, st: os.stat_result | None
    ) -> str:
        if self.code_cache is None:
            return _hash_worktree(repo, inner)
        return self.code_cache.worktree_id(full, lambda: _hash_worktree(repo, inner), st)

    def _head_id(self, repo: pygit2.Repository, inner: str) -> str | None:
        """The blob id HEAD's commit records for `inner`, or None."""
        directory, _, name = inner.rpartition("/")
        tree = self._head_tree(repo, directory)
        if tree is None:
            return None
        try:
            return str(tree[name].id)
        except KeyError:
            return None

    def _head_tree(self, repo: pygit2.Repository, directory: str) -> pygit2.Tree | None:
        """HEAD's tree of `directory` ("" for the top), memoized: one lookup per directory."""
        key = (repo.path, directory)
        if key in self._trees:
            return self._trees[key]
        tree: pygit2.Tree | None = None
        if not directory:
            head = self._head_commit(repo)
            if head is not None:
                try:
                    commit = repo[head]
                    tree = commit.tree if isinstance(commit, pygit2.Commit) else None
                except (KeyError, pygit2.GitError):
                    tree = None
        else:
            parent, _, name = directory.rpartition("/")
            up = self._head_tree(repo, parent)
            try:
                sub = up[name] if up is not None else None
            except KeyError:
                sub = None
            tree = sub if isinstance(sub, pygit2.Tree) else None
        self._trees[key] = tree
        return tree


def state_paths(root: str) -> list[str]:
    """The files of the repository holding `root` whose change can change a file's status or
    id there: the index, HEAD, the branch HEAD names (loose, and `packed-refs`), the config,
    `info/attributes` and `info/exclude`. [] outside git.
    The no-import record (`record.py`) compares their stat data; it never reads them."""
    repo = _discover(os.path.realpath(root))
    if repo is None:
        return []
    gitdir = repo.path
    common = gitdir
    commondir = os.path.join(gitdir, "commondir")  # a linked worktree's refs: the main one's
    with contextlib.suppress(OSError), open(commondir, encoding="utf-8") as f:
        common = os.path.join(gitdir, f.read().strip())
    out = [os.path.join(gitdir, "index"), os.path.join(gitdir, "HEAD")]
    # Filters and attributes decide blob ids; excludes decide what is ignored.
    for rel in ("packed-refs", "config", "info/attributes", "info/exclude"):
        out.append(os.path.join(common, rel))
    if not repo.head_is_detached:
        with contextlib.suppress(pygit2.GitError):
            name = repo.lookup_reference("HEAD").target
            if isinstance(name, str):
                out.append(os.path.join(common, *name.split("/")))
    return [os.path.normpath(p) for p in out]


def index_digest(root: str) -> str | None:
    """A digest of what the index of the repository holding `root` stages: every entry's
    path, mode and blob id (not its stat data, which `git add` rewrites). None outside git
    or while the index holds a conflict."""
    repo = _discover(os.path.realpath(root))
    if repo is None:
        return None
    idx = repo.index
    idx.read(False)
    if idx.conflicts is not None:
        return None
    h = hashlib.blake2b(digest_size=16)
    for e in idx:
        h.update(f"{e.path}\0{e.mode:o}\0{e.id}\n".encode())
    return h.hexdigest()


_UNSTAGED = (
    pygit2.enums.FileStatus.WT_NEW
    | pygit2.enums.FileStatus.WT_MODIFIED
    | pygit2.enums.FileStatus.WT_DELETED
    | pygit2.enums.FileStatus.WT_TYPECHANGE
    | pygit2.enums.FileStatus.WT_RENAMED
    | pygit2.enums.FileStatus.WT_UNREADABLE
    | pygit2.enums.FileStatus.CONFLICTED
)


def unstaged(root: str) -> list[str] | None:
    """The paths (relative to `root`) where the work tree differs from the index of the
    repository whose work tree `root` is: modified, deleted, type-changed, untracked and not
    ignored (an untracked directory once, with a trailing "/"). None outside git, below a
    repository's top, or while the index holds a conflict.
    The no-import record (`record.py`) answers `verify --staged` from a work-tree entry only
    where what is staged is what the work tree holds."""
    repo = _discover(os.path.realpath(root))
    if repo is None or os.path.realpath(repo.workdir) != os.path.realpath(root):
        return None
    idx = repo.index
    idx.read(False)
    if idx.conflicts is not None:
        return None
    return sorted(p for p, f in repo.status(untracked_files="normal").items() if f & _UNSTAGED)


def staged_entries(root: str, rels: Sequence[str]) -> dict[str, tuple[str, int, str | None]]:
    """Of repo-relative `rels` in the repository whose work tree is `root`, those its index
    holds: (blob id, file mode, the blob id HEAD's commit records or None)."""
    repo = _discover(os.path.realpath(root))
    if repo is None:
        return {}
    idx = repo.index
    idx.read(False)
    tree: pygit2.Tree | None = None
    if not repo.head_is_unborn:
        with contextlib.suppress(KeyError, pygit2.GitError):
            tree = repo.head.peel(pygit2.Commit).tree
    out: dict[str, tuple[str, int, str | None]] = {}
    for rel in rels:
        try:
            e = idx[rel]
        except KeyError:  # not staged, or the sides of a conflict
            continue
        head: str | None = None
        if tree is not None:
            with contextlib.suppress(KeyError):
                head = str(tree[rel].id)
        out[rel] = (str(e.id), int(e.mode), head)
    return out
