"""What git says of data files: their statuses, what `git add` can stage, what git ignores.

Owns: `DataFiles`, for one snapshot: a data file's blob id from the index when git finds it
unmodified (`clean_id`, `unmodified_ids`: one pass of git per repository) or from the work tree
(`worktree_id`); the status of a group of data files of one repository
against its index and HEAD ("staged", "modified", "untracked", "ignored"; a symlink judged by
its link, as git stores it), remembered in the code cache per tree state for a set of tracked,
present files (by a digest of their paths and ids); whether git ignores an untracked file (its
directories asked first, once each); the names directly in a directory as a commit of the index
would hold them, with the git-ignored names on disk.

Must never: hash a file (the caller gives each data file's blob id), record a status that
depends on more than the tree state (an untracked or absent file), write to the repository.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence

import pygit2
from pygit2 import GIT_STATUS_CURRENT

from hfbuild.source.caches import CodeCache
from hfbuild.source.gitrepo import (
    Status,
    changed_in_worktree,
    hash_bytes,
    hash_file,
    hash_worktree,
)
from hfbuild.source.gittrees import Trees

# The statuses a tracked data file can have, as the code cache records them.
_RECORDED: dict[str, Status] = {"staged": "staged", "modified": "modified"}


class DataFiles:
    """The data-file questions of one snapshot (`abspath`: a repo-relative path's file)."""

    def __init__(
        self, trees: Trees, code_cache: CodeCache | None, root: str, abspath: Callable[[str], str]
    ) -> None:
        self.trees = trees
        self.code_cache = code_cache
        self._root = root
        self._abspath = abspath
        self._ignored_dirs: dict[tuple[str, str], bool] = {}

    def clean_id(self, rel: str) -> str | None:
        """The index's blob id when the file is tracked and unmodified, else None. Never
        hashes an untracked file (data files can be large)."""
        if self.trees.mode == "worktree" and os.path.islink(self._abspath(rel)):
            return None
        staged = self.trees.staged(rel)
        if staged is None:
            return None
        repo, inner, blob_id = staged
        if self.trees.mode == "index":
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
            if os.path.islink(self._abspath(rel)):
                continue
            staged = self.trees.staged(rel)
            if staged is not None:
                repo, inner, blob_id = staged
                repos[repo.path] = repo
                found.setdefault(repo.path, {})[inner] = (rel, blob_id)
        out: dict[str, str] = {}
        for key, files in found.items():
            changed = changed_in_worktree(repos[key], self.trees.index(repos[key]), list(files))
            out.update(dict(v for inner, v in files.items() if inner not in changed))
        return out

    def worktree_id(self, rel: str) -> str:
        """The blob id git would give the work-tree file now (filters applied), in either
        mode: data files that are not committed are read from the work tree even when code
        is read from the index."""
        found = self.trees.repo_of(rel)
        if found is None:
            return hash_file(self._abspath(rel))
        return hash_worktree(*found)

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
            found = self.trees.repo_of(rel)
            if found is None:
                if os.path.lexists(self._abspath(rel)):
                    out[rel] = "norepo"
                continue
            repo, inner = found
            groups.setdefault(repo.path, (repo, []))[1].append((rel, inner, blob_id))
        for repo, group in groups.values():
            out.update(self.group(repo, sorted(group, key=lambda g: g[1])))
        return out

    def stageable(self, rels: Sequence[str]) -> list[str]:
        """Of `rels`, those `git add` can stage: tracked ones (a deletion is staged too), and
        untracked ones that exist and git does not ignore."""
        out = []
        for rel in rels:
            found = self.trees.repo_of(rel)
            if found is None:
                continue
            repo, inner = found
            if self.trees.read_tree_ids(repo, rel, inner)[0] is not None or (
                os.path.lexists(self._abspath(rel)) and not self.ignored(repo, inner)
            ):
                out.append(rel)
        return out

    def group(
        self, repo: pygit2.Repository, group: list[tuple[str, str, str]]
    ) -> dict[str, Status]:
        """The statuses of `group`, (repo-relative path, path in `repo`, blob id) each, sorted
        by path in `repo`, that are not what HEAD's commit holds (`Snapshot.data_statuses`)."""
        cache = self.code_cache
        state = self.trees.tree_state(repo) if cache is not None else None
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
        idx = self.trees.index(repo)
        for rel, inner, blob_id in group:
            staged, head = self.trees.read_tree_ids(repo, rel, inner, idx)
            full = self._abspath(rel)
            if staged is None:
                recordable = False
                if os.path.lexists(full):
                    out[rel] = "ignored" if self.ignored(repo, inner) else "untracked"
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

    def ignored(self, repo: pygit2.Repository, inner: str) -> bool:
        """Whether git ignores the untracked file `inner`. A file below an ignored directory
        is ignored whatever its name (git does not look inside), so directories are asked
        first, once each: a git-ignored `data/` costs one question, not one per file."""
        directory = inner.rpartition("/")[0]
        return self.ignored_dir(repo, directory) or bool(repo.path_is_ignored(inner))

    def ignored_dir(self, repo: pygit2.Repository, directory: str) -> bool:
        """Whether `directory` ("" for the top) or a directory above it is git-ignored."""
        if not directory:
            return False
        key = (repo.path, directory)
        hit = self._ignored_dirs.get(key)
        if hit is None:
            parent = directory.rpartition("/")[0]
            hit = self.ignored_dir(repo, parent) or bool(repo.path_is_ignored(directory + "/"))
            self._ignored_dirs[key] = hit
        return hit

    def names(self, repo: pygit2.Repository, rel: str) -> list[str] | None:
        """`Snapshot.staged_names` of directory `rel` ("." for the root) in `repo`."""
        prefix = "" if rel == "." else rel + "/"
        names: set[str] = set()
        for entry in self.trees.index(repo):
            path = entry.path
            if path.startswith(prefix):
                names.add(path[len(prefix) :].partition("/")[0])
        try:
            on_disk = os.listdir(self._abspath(prefix) if prefix else self._root)
        except OSError:
            on_disk = []
        for name in on_disk:
            if name not in names and name != ".git":
                inner = prefix + name
                if os.path.isdir(self._abspath(inner)):
                    inner += "/"
                if self.ignored_dir(repo, prefix.rstrip("/")) or repo.path_is_ignored(inner):
                    names.add(name)
        return sorted(names) if names else None
