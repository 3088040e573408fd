"""The index and HEAD of a snapshot's repositories: blob ids by path, and the tree state.

Owns: `Trees`, for one snapshot: which repository tracks a file (a submodule's for files inside
one) and its path there; a file's index entry; each repository's index, read once (re-read only
if its file changed), after the repository's tree state is taken; the tree state (the index
file's stat data and HEAD's commit; None within the racy-git window of 2 s); each file's index
and HEAD blob ids, from the code cache while the tree state is the one they were recorded under,
else read from the index and HEAD's trees (one lookup per directory) and recorded; whether the
index holds a file under a directory (a binary search of the sorted index).

Must never: write to the repository or the index, record ids under a tree state older than
them, hand out an unmerged entry's id (an `UnmergedError` says to resolve it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pygit2

from hfbuild.core.errors import GitStateError, UnmergedError
from hfbuild.source.caches import RACY_NS, CodeCache
from hfbuild.source.gitrepo import Mode, discover


class Trees:
    """The index and HEAD trees of the repositories one snapshot reads (memoized for it)."""

    def __init__(
        self,
        root: str,
        repo: pygit2.Repository | None,
        abspath: Callable[[str], str],
        mode: Mode,
        code_cache: CodeCache | None,
    ) -> None:
        self.root = root
        self.repo = repo
        self._abspath = abspath
        self._dir_repos: dict[str, tuple[pygit2.Repository | None, str]] = {}
        self.mode: Mode = mode
        self.code_cache = code_cache
        self._fresh: set[str] = set()
        self._indexes: dict[str, pygit2.Index] = {}
        self._trees: dict[tuple[str, str], pygit2.Tree | None] = {}
        self._heads: dict[str, pygit2.Oid | None] = {}
        self._states: dict[str, str | None] = {}

    def repo_of(self, rel: str) -> tuple[pygit2.Repository, str] | None:
        """The repository tracking `rel` (a submodule's for files inside one) and the path
        relative to it."""
        if self.repo is None:
            return None
        directory, _, name = rel.rpartition("/")
        hit = self._dir_repos.get(directory)
        if hit is None:
            full = self._abspath(directory) if directory else self.root
            repo = discover(full) if os.path.isdir(full) else self.repo
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

    def staged(self, rel: str) -> tuple[pygit2.Repository, str, str] | None:
        """(repository, path within it, blob id) of the file's index entry, or None."""
        found = self.repo_of(rel)
        if found is None:
            return None
        repo, inner = found
        idx = self.index(repo)
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

    def index(self, repo: pygit2.Repository) -> pygit2.Index:
        key = repo.path
        known = self._indexes.get(key)
        if known is not None:
            return known
        if self.mode == "worktree" and self.code_cache is not None:
            # The tree state is taken before the index is read in this snapshot, so ids
            # recorded under it are never older than it (see `tree_state`).
            self.tree_state(repo)
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

    def tree_ids(
        self, repo: pygit2.Repository, rel: str, inner: str
    ) -> tuple[str | None, str | None]:
        """(index id, HEAD id) of `inner` (None where there is no entry): from the code cache
        while the repository's tree state is the one they were recorded in, else read from
        the index and HEAD's trees (and recorded, unless the index file is racily new)."""
        cache = self.code_cache
        state = self.tree_state(repo) if cache is not None else None
        if cache is not None and state is not None:
            hit = cache.tree_ids(repo.path, state, inner)
            if hit is not None:
                return hit
        staged, head = self.read_tree_ids(repo, rel, inner)
        if cache is not None and state is not None:
            cache.put_tree_ids(repo.path, state, inner, staged, head)
        return staged, head

    def read_tree_ids(
        self, repo: pygit2.Repository, rel: str, inner: str, idx: pygit2.Index | None = None
    ) -> tuple[str | None, str | None]:
        """(index id, HEAD id) of `inner`, read from the index (`idx`, the repository's
        index, when the caller has it) and HEAD's trees."""
        if idx is None:
            idx = self.index(repo)
        if inner not in idx:
            return None, None
        try:
            staged = str(idx[inner].id)
        except KeyError:  # in the index only as the sides of a merge conflict
            raise UnmergedError(
                f"{rel} has an unresolved merge conflict (it is unmerged in the git "
                f"index): resolve it, then `git add {rel}`."
            ) from None
        return staged, self.head_id(repo, inner)

    def tree_state(self, repo: pygit2.Repository) -> str | None:
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
        head = self.head_commit(repo)
        state = f"{index}|{head}" if index else None
        self._states[key] = state
        return state

    def head_commit(self, repo: pygit2.Repository) -> pygit2.Oid | None:
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

    def head_id(self, repo: pygit2.Repository, inner: str) -> str | None:
        """The blob id HEAD's commit records for `inner`, or None."""
        directory, _, name = inner.rpartition("/")
        tree = self.head_tree(repo, directory)
        if tree is None:
            return None
        try:
            return str(tree[name].id)
        except KeyError:
            return None

    def head_tree(self, repo: pygit2.Repository, directory: str) -> pygit2.Tree | None:
        """HEAD's tree of `directory` ("" for the top), memoized: one lookup per directory."""
        key = (repo.path, directory)
        if key in self._trees:
            return self._trees[key]
        tree: pygit2.Tree | None = None
        if not directory:
            head = self.head_commit(repo)
            if head is not None:
                try:
                    commit = repo[head]
                    tree = commit.tree if isinstance(commit, pygit2.Commit) else None
                except (KeyError, pygit2.GitError):
                    tree = None
        else:
            parent, _, name = directory.rpartition("/")
            up = self.head_tree(repo, parent)
            try:
                sub = up[name] if up is not None else None
            except KeyError:
                sub = None
            tree = sub if isinstance(sub, pygit2.Tree) else None
        self._trees[key] = tree
        return tree

    def staged_dir(self, rel: str) -> bool:
        """Whether the index holds a file under the project's directory `rel` (submodules
        included)."""
        found = self.repo_of(f"{rel}/-")  # a name inside that directory
        if found is None:
            return False
        repo, inner = found
        return self.holds_under(repo, inner[: -len("-")].encode())

    def holds_under(self, repo: pygit2.Repository, prefix: bytes) -> bool:
        """Whether `repo`'s index holds a path starting with `prefix` (a directory's path in
        it and "/", or b"" for any): a binary search of the sorted index."""
        idx = self.index(repo)
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
