"""What git says about files: a project's files' blob ids, dirty and untracked status.

Owns: `Snapshot`, which answers, for files under one project root, "what is this file's git
blob id, and is it committed?", either from the work tree (normal builds) or from the index
only (`verify --staged`: what the next commit will contain); a file's content by its blob id;
which repository (a submodule's for files inside one) tracks a file. Its parts: the
repositories' index and HEAD trees (`gittrees.py`), data files' statuses (`gitdata.py`);
repository-level answers are `gitrepo.py`'s. With those, the only modules calling pygit2.
Must never: read history (shallow clones are the normal case in CI; `text_at_commits` is
`gitrepo`'s), write to the repository, or let an absolute path escape into an answer (every
answer names files repo-relatively).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

import pygit2

from hfbuild.core.errors import GitStateError
from hfbuild.source import gitrepo
from hfbuild.source.caches import CodeCache
from hfbuild.source.gitdata import DataFiles
from hfbuild.source.gitrepo import (
    FileId,
    Mode,
    Status,
    blob_bytes,
    discover,
    find_root,
    hash_bytes,
    hash_file,
    hash_worktree,
)
from hfbuild.source.gittrees import Trees


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
        self.repo = discover(self.root)
        # Work-tree blob ids by stat data, and import scans, remembered across processes.
        self._code_cache = code_cache
        # What other modules derive from this snapshot (the import graph), kept with it.
        self.memo: dict[str, object] = {}
        self._ids: dict[str, FileId] = {}
        self._stats: dict[str, os.stat_result] = {}  # rel -> the lstat `file_id` took
        self._real_dirs: dict[str, str] = {}
        # Each repository's index and HEAD; the questions about data files.
        self.trees = Trees(self.root, self.repo, self.abspath, mode, code_cache)
        self.data = DataFiles(self.trees, code_cache, self.root, self.abspath)

    @property
    def code_cache(self) -> CodeCache | None:
        """Work-tree blob ids by stat data, tree ids by tree state, import scans: remembered
        across processes (None: nothing remembered). Set after creation too (`fingerprint`),
        which gives it to the snapshot's parts as well."""
        return self._code_cache

    @code_cache.setter
    def code_cache(self, cache: CodeCache | None) -> None:
        self._code_cache = cache
        self.trees.code_cache = cache
        self.data.code_cache = cache

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

    def staged_dir(self, rel: str) -> bool:
        """Whether the index holds a file under directory `rel` (submodules included): a
        binary search of the sorted index, as a directory listing of what is staged."""
        return self.trees.staged_dir(rel)

    def staged_names(self, rel: str) -> list[str] | None:
        """The names directly in directory `rel` ("." for the root) as a commit of the
        index holds them: each staged file's, and each directory's holding one; with the
        names on disk git ignores (kept out of git on purpose: read from the work tree, as
        data files are). None when there is no such name: a checkout has no such
        directory. Submodules' entries are not looked into."""
        if self.repo is None:
            return None
        return self.data.names(self.repo, rel)

    def exists(self, rel: str) -> bool:
        if self.mode == "index":
            return self.trees.staged(rel) is not None
        return os.path.isfile(self.abspath(rel))

    def read(self, rel: str) -> bytes:
        """The file's content as this snapshot sees it."""
        if self.mode == "index":
            staged = self.trees.staged(rel)
            if staged is None:
                raise FileNotFoundError(rel)
            return blob_bytes(staged[0], staged[2])
        with open(self.abspath(rel), "rb") as f:
            return f.read()

    def content(self, rel: str, blob_id: str) -> bytes:
        """The bytes whose blob id is `blob_id`, for the file at `rel`: from git's object
        database when it holds that blob (a committed or staged file), else the file in the
        work tree, checked against the id. Raises GitStateError when neither has it."""
        found = self.trees.repo_of(rel)
        if found is not None:
            try:
                return blob_bytes(found[0], blob_id)
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
        return self.data.clean_id(rel)

    def unmodified_ids(self, rels: Sequence[str]) -> dict[str, str]:
        """Of `rels` (work-tree mode), the tracked files whose work-tree content is their
        index entry's, each with that entry's blob id (`DataFiles.unmodified_ids`)."""
        return self.data.unmodified_ids(rels)

    def worktree_id(self, rel: str) -> str:
        """The blob id git would give the work-tree file now (filters applied), in either
        mode (`DataFiles.worktree_id`)."""
        return self.data.worktree_id(rel)

    def data_statuses(self, files: Sequence[tuple[str, str]]) -> dict[str, Status]:
        """Of data files given as (repo-relative path, blob id of the work-tree content),
        those that are not what HEAD's commit holds, with their status
        (`DataFiles.data_statuses`)."""
        return self.data.data_statuses(files)

    def stageable(self, rels: Sequence[str]) -> list[str]:
        """Of `rels`, those `git add` can stage (`DataFiles.stageable`)."""
        return self.data.stageable(rels)

    def hooks_dir(self) -> str | None:
        """Where git looks for hooks (core.hooksPath, else the common git dir's hooks/)."""
        return gitrepo.hooks_dir(self.repo, self.root)

    def read_index_text(self, rel: str) -> str | None:
        """A file's staged content, or None when it is not in the index."""
        staged = self.trees.staged(rel)
        if staged is None:
            return None
        return blob_bytes(staged[0], staged[2]).decode("utf-8", errors="replace")

    def text_at_commits(self, rel: str, n: int) -> list[str]:
        """The file's text at HEAD and up to n-1 first-parent ancestors (`gitrepo`)."""
        return gitrepo.text_at_commits(self.repo, rel, n)

    def line_stats(self, old_id: str, rel: str, new_id: str) -> tuple[int, int] | None:
        """(lines added, lines removed) from blob `old_id` to the file's content with id
        `new_id`, or None when the old blob is not in the repository (a shallow clone)."""
        return gitrepo.line_stats(self.repo, old_id, new_id, lambda: self.read(rel))

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
        found = self.trees.repo_of(rel)
        if found is None:
            return FileId(rel, hash_file(full), "norepo")
        repo, inner = found
        if self.mode == "index":
            idx = self.trees.index(repo)
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
        staged, head = self.trees.tree_ids(repo, rel, inner)
        if staged is None:
            return FileId(rel, worktree, "untracked")
        if worktree != staged:
            return FileId(rel, worktree, "modified")
        if head == staged:
            return FileId(rel, staged, "clean")
        # Staged but not committed: the index already holds exactly the work-tree content.
        return FileId(rel, staged, "staged")

    def _worktree_id(
        self, repo: pygit2.Repository, inner: str, full: str, st: os.stat_result | None
    ) -> str:
        if self.code_cache is None:
            return hash_worktree(repo, inner)
        return self.code_cache.worktree_id(full, lambda: hash_worktree(repo, inner), st)
