"""The git repository around a project: discovery, blob ids of bytes and files, its state files.

Owns: opening repositories (one `pygit2.Repository` per git dir per process, under a lock) and
finding the work tree holding a path (memoized per directory); the blob id git gives bytes, a
file, or a work-tree file with its clean filters applied (`hash_worktree`); which tracked files
differ between an index and the work tree (`changed_in_worktree`, one diff of exactly those
paths); HEAD's text of a file; a repository's hooks directory, a file's text along the first-
parent history (as far as a shallow clone has it) and the line counts of a blob's diff; the
files whose change can change a status (`state_paths`), a digest of what the index stages
(`index_digest`), where the work tree differs from the index (`unstaged`) and given files' index
entries with HEAD's ids (`staged_entries`), for the no-import record; the values a file's
identity is told in (`FileId`, `Status`, `Mode`). With `gittrees.py`, `gitdata.py` and
`gitstate.py`, the only modules that call pygit2.

Must never: write to the repository, read history but for `text_at_commits` (shallow clones are
the normal case in CI), or let an absolute path escape into an answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import pygit2
from pygit2.enums import DiffOption

from hfbuild.core.errors import GitStateError, NotARepositoryError

Mode = Literal["worktree", "index"]
# "ignored": an untracked file git is told to ignore (.gitignore, info/exclude): data kept out
# of git on purpose, which is not uncommitted (only data files are asked about it).
Status = Literal["clean", "modified", "staged", "untracked", "ignored", "norepo"]


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


def discover(directory: str) -> pygit2.Repository | None:
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
    repo = discover(directory)
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


def blob_bytes(repo: pygit2.Repository, blob_id: str) -> bytes:
    """The bytes of blob `blob_id` in `repo`'s object database (KeyError, ValueError when it
    holds none)."""
    blob = repo[blob_id]
    assert isinstance(blob, pygit2.Blob)
    return blob.data


def head_text(path: str | os.PathLike[str]) -> str | None:
    """The text HEAD's commit holds for the file at `path` (in the work tree holding it),
    or None: no repository, no commit yet, or no such file in it. Never the work tree's
    bytes: what is committed is what others reviewed (the root of trust for a pull)."""
    p = os.path.realpath(os.fspath(path))
    repo = discover(os.path.dirname(p))
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


def hash_worktree(repo: pygit2.Repository, rel_to_repo: str) -> str:
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


def changed_in_worktree(repo: pygit2.Repository, index: pygit2.Index, paths: list[str]) -> set[str]:
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


def state_paths(root: str) -> list[str]:
    """The files of the repository holding `root` whose change can change a file's status or
    id there: the index, HEAD, the branch HEAD names (loose, and `packed-refs`), the config,
    `info/attributes` and `info/exclude`. [] outside git.
    The no-import record (`record.py`) compares their stat data; it never reads them."""
    repo = discover(os.path.realpath(root))
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
    repo = discover(os.path.realpath(root))
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


def hooks_dir(repo: pygit2.Repository | None, root: str) -> str | None:
    """Where git looks for hooks (core.hooksPath, else the common git dir's hooks/)."""
    if repo is None:
        return None
    try:
        custom = repo.config["core.hooksPath"]
    except KeyError:
        custom = None
    if custom:
        return os.path.join(root, os.path.expanduser(custom))
    gitdir = repo.path
    common = os.path.join(gitdir, "commondir")
    if os.path.isfile(common):  # a linked worktree: hooks live in the main git dir
        with open(common) as f:
            gitdir = os.path.normpath(os.path.join(gitdir, f.read().strip()))
    return os.path.join(gitdir, "hooks")


def text_at_commits(repo: pygit2.Repository | None, rel: str, n: int) -> list[str]:
    """The file's text at HEAD and up to n-1 first-parent ancestors (as far as a shallow
    clone has them); commits without the file are skipped."""
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


def line_stats(
    repo: pygit2.Repository | None, old_id: str, new_id: str, read: Callable[[], bytes]
) -> tuple[int, int] | None:
    """(lines added, lines removed) from blob `old_id` to the file's content with id
    `new_id`, or None when the old blob is not in the repository (a shallow clone)."""
    if repo is None:
        return None
    try:
        old = repo[old_id]
    except (KeyError, ValueError):
        return None
    if not isinstance(old, pygit2.Blob):
        return None
    try:
        new = repo[new_id]
        patch = old.diff(new) if isinstance(new, pygit2.Blob) else None
    except (KeyError, ValueError):
        patch = None
    if patch is None:
        try:
            patch = old.diff_to_buffer(read())
        except OSError:
            return None
    _, added, removed = patch.line_stats
    return added, removed


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
    repo = discover(os.path.realpath(root))
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
    repo = discover(os.path.realpath(root))
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
