"""Datasets on the Hugging Face Hub as a load stage's data files.

Owns: every `huggingface_hub` call; `hf://datasets/org/name@revision/pattern` data-file
patterns: the revision resolved to a commit (a commit id as given; offline, the local Hub
cache's `refs/<revision>`; online, the Hub's answer), the commit's files listed (offline, its
cache snapshot; online, the Hub's tree), each matched file named `hf://datasets/org/name/path`
(no revision: a file is keyed by its content, never by the commit or branch it came in) with
its content id from the Hub's metadata (the LFS sha256, else the git blob id: what the cache
names the file's blob, read from the snapshot's link without reading the file), and its path
in the snapshot, which is what the build reads; fetching a pinned file the cache lacks (online
only); the Hub's content id of bytes a Ray worker received (`content_id`). The dataset card
is `hubcard.py`'s. The online paths are three small functions (`_remote_commit`,
`_remote_files`, `_download`), each one documented Hub call.

Must never: read, store or print a token (huggingface_hub reads the user's own), key a file by
a branch name or a commit, or serve a file of another commit than the one resolved.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hfbuild.core.errors import MissingDataError, StageError
from hfbuild.source.datafiles import keep_matched

PREFIX = "hf://datasets/"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_URL = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?/(?P<path>.*)$")


class HubError(StageError):
    """A Hub dataset cannot be resolved: not in the local cache, or the Hub cannot be reached."""


def is_commit(revision: str) -> bool:
    """A revision that is a full commit id: it names one commit forever (a branch moves)."""
    return bool(_COMMIT.match(revision))


def is_hub(pattern: Any) -> bool:
    return isinstance(pattern, str) and pattern.startswith(PREFIX)


def any_hub(data_files: Any) -> bool:
    """Whether a `data_files` value names Hub files (any pattern `hf://datasets/...`)."""
    return any(is_hub(p) for p in _patterns(data_files))


def _patterns(data_files: Any) -> list[Any]:
    if isinstance(data_files, Mapping):
        return [p for v in data_files.values() for p in _patterns(v)]
    if isinstance(data_files, (str, os.PathLike)):
        return [data_files]
    return list(data_files)


def url(repo: str, revision: str, pattern: str) -> str:
    """The `hf://` pattern of `pattern` in `repo` at `revision`."""
    return f"{PREFIX}{repo}@{revision}/{pattern.lstrip('/')}"


def repo_pattern(repo: str, revision: str, data_files: Any) -> Any:
    """`data_files` relative to a Hub repository, as `hf://` patterns (the shape kept)."""
    if isinstance(data_files, Mapping):
        return {k: repo_pattern(repo, revision, v) for k, v in data_files.items()}
    if isinstance(data_files, str):
        return data_files if is_hub(data_files) else url(repo, revision, data_files)
    return [repo_pattern(repo, revision, p) for p in data_files]


def _split_url(pattern: str, what: str) -> tuple[str, str, str]:
    m = _URL.match(pattern)
    if m is None:
        raise StageError(
            f"{what}: {pattern!r} is not a Hub dataset path: write "
            f"hf://datasets/org/name@revision/path (the revision may be left out for main)."
        )
    return m.group("repo"), m.group("rev") or "main", m.group("path")


@dataclass(frozen=True)
class Pin:
    """A revision of a Hub dataset a stage read, and the commit it resolved to."""

    repo: str
    revision: str
    commit: str

    def as_json(self) -> dict[str, str]:
        return {"repo": self.repo, "revision": self.revision, "commit": self.commit}


@dataclass(frozen=True)
class Resolved:
    """Hub data files matched: the files to read (snapshot paths) and their identities
    ([name, content id]), each in `data_files`' shape; the revisions they were pinned at."""

    files: Any
    ids: Any
    pins: tuple[Pin, ...]


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def repo_dir(repo: str) -> str:
    from huggingface_hub.file_download import repo_folder_name

    return os.path.join(cache_dir(), repo_folder_name(repo_id=repo, repo_type="dataset"))


def fetch_advice(repo: str, revision: str) -> str:
    return (
        f"run the build once online, or fetch it with `huggingface-cli download {repo} "
        f"--repo-type dataset --revision {revision}` (then HF_HUB_OFFLINE=1 works)"
    )


def commit_of(repo: str, revision: str) -> str:
    """The commit `revision` of `repo` resolves to: a commit id as given; offline, what the
    local cache's `refs/<revision>` records (where huggingface_hub writes the commit of a
    branch or tag it downloaded); online, the Hub's answer."""
    if is_commit(revision):
        return revision
    if not offline():
        return _remote_commit(repo, revision)
    ref = os.path.join(repo_dir(repo), "refs", *revision.split("/"))
    try:
        with open(ref, encoding="utf-8") as f:
            commit = f.read().strip()
    except OSError:
        commit = ""
    if not _COMMIT.match(commit):
        raise HubError(
            f"revision {revision!r} of the Hub dataset {repo} is not in the local Hub cache "
            f"({cache_dir()}) and HF_HUB_OFFLINE is set: {fetch_advice(repo, revision)}."
        )
    return commit


def snapshot_dir(repo: str, commit: str) -> str:
    return os.path.join(repo_dir(repo), "snapshots", commit)


def cached_files(repo: str, commit: str, revision: str) -> dict[str, str]:
    """The files of `repo` at `commit` the local cache holds, by path in the repository, with
    their content ids: the name of the blob each snapshot entry links to (huggingface_hub
    names a blob by its etag: the LFS sha256, else the git blob id), read from the link
    alone, so a file whose blob was removed is still identified. A snapshot the cache lacks
    is an error that says what to do."""
    top = snapshot_dir(repo, commit)
    if not os.path.isdir(top):
        raise HubError(
            f"commit {commit} of the Hub dataset {repo} (revision {revision!r}) is not in the "
            f"local Hub cache ({cache_dir()}): {fetch_advice(repo, commit)}."
        )
    out: dict[str, str] = {}
    for d, dirs, names in os.walk(top):
        dirs.sort()
        for n in names:
            full = os.path.join(d, n)
            rel = os.path.relpath(full, top).replace(os.sep, "/")
            if not os.path.islink(full):
                raise HubError(
                    f"{full} is a copy, not huggingface_hub's link to a blob (a cache made "
                    f"without symlinks): hfbuild reads a Hub file's content id from the link. "
                    f"Use a cache on a file system with symlinks (HF_HUB_CACHE)."
                )
            out[rel] = os.path.basename(os.readlink(full))
    return out


def files_of(repo: str, commit: str, revision: str) -> dict[str, str]:
    """The files of `repo` at `commit` with their content ids: the cache's snapshot offline,
    the Hub's listing online (the same ids: the cache names each blob by the Hub's)."""
    if offline():
        return cached_files(repo, commit, revision)
    return _remote_files(repo, commit)


def _regex(pattern: str) -> re.Pattern[str]:
    """A glob as fsspec applies it to a repository's paths: `*` and `?` within one path
    part, `**` across parts, `[...]` as a set."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and "]" in pattern[i + 1 :]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1 : j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def resolve(data_files: Any, what: str) -> Resolved:
    """`data_files` of `hf://` patterns expanded, pattern by pattern, each pattern's files
    sorted (datasets' order), with the revisions they were pinned at. A pattern matching no
    file of its commit is a `MissingDataError`; a local pattern among Hub ones is refused."""
    pins: dict[tuple[str, str], Pin] = {}
    listings: dict[tuple[str, str], dict[str, str]] = {}

    def one(spec: Any) -> tuple[list[str], list[list[str]]]:
        patterns = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
        files: list[str] = []
        ids: list[list[str]] = []
        for p in patterns:
            if not is_hub(p):
                raise StageError(
                    f"{what}: {p!r} is a local path among Hub paths: a load reads either "
                    f"Hub files or local files; make two load stages and combine them."
                )
            repo, revision, path = _split_url(str(p), what)
            pin = pins.get((repo, revision))
            if pin is None:
                pin = pins[(repo, revision)] = Pin(repo, revision, commit_of(repo, revision))
            listing = listings.get((repo, pin.commit))
            if listing is None:
                listing = listings[(repo, pin.commit)] = files_of(repo, pin.commit, revision)
            rx = _regex(path)
            found = keep_matched(sorted(n for n in listing if rx.match(n)), path, "/")
            if not found:
                raise MissingDataError(
                    f"{what}: {p!r} matches no file of {repo} at commit {pin.commit}"
                    f"{' (offline: the files the local Hub cache holds)' if offline() else ''}."
                    f" Check the pattern, or the revision."
                )
            top = snapshot_dir(repo, pin.commit)
            for n in found:
                files.append(os.path.join(top, *n.split("/")))
                ids.append([f"{PREFIX}{repo}/{n}", listing[n]])
        return files, ids

    if isinstance(data_files, Mapping):
        got = {str(k): one(v) for k, v in data_files.items()}
        files: Any = {k: v[0] for k, v in got.items()}
        ids: Any = {k: v[1] for k, v in sorted(got.items())}
    else:
        files, ids = one(data_files)
    return Resolved(files, ids, tuple(sorted(pins.values(), key=lambda p: (p.repo, p.revision))))


def content_id(data: bytes, like: str) -> str:
    """The Hub's content id of `data`, of the kind `like` is: the LFS sha256 (64 hex
    digits), else the git blob id. A Ray worker checks the bytes a Hub shard's task brought
    against the id the driver keyed (it has no Hub cache of its own to read it from)."""
    import hashlib

    if len(like) == 64:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def local_file(files: Any, ids: Any, name: str, ident: str) -> str | None:
    """The path in the cache's snapshot of the Hub file `[name, ident]`, from a load's
    resolved `files` and their `ids` (`Resolved`: the same shape; a split dict's ids in
    sorted order), or None."""
    pairs: list[tuple[Any, Any]] = (
        [(files[k], ids[k]) for k in files if k in ids]
        if isinstance(files, Mapping) and isinstance(ids, Mapping)
        else [(files, ids)]
    )
    for fs, xs in pairs:
        for f, x in zip(fs or [], xs or [], strict=False):
            if list(x) == [name, ident]:
                return str(f)
    return None


def pins_json(pins: Iterable[Pin]) -> list[dict[str, str]]:
    return [p.as_json() for p in pins]


def ensure(paths: Iterable[str]) -> None:
    """Before a build reads Hub files: each snapshot path must lead to its blob. Online, a
    missing one is downloaded at its commit; offline, an error says what to do."""
    top = cache_dir()
    for full in paths:
        if os.path.exists(full):
            continue
        rel = os.path.relpath(full, top).split(os.sep)
        if len(rel) < 4 or rel[1] != "snapshots" or not rel[0].startswith("datasets--"):
            continue  # not a Hub file: the build's own error names it
        repo = "/".join(rel[0][len("datasets--") :].split("--", 1))
        commit, name = rel[2], "/".join(rel[3:])
        if offline():
            raise HubError(
                f"{PREFIX}{repo}/{name} at commit {commit} is not in the local Hub cache "
                f"(its snapshot names it, but its blob is gone): {fetch_advice(repo, commit)}."
            )
        _download(repo, commit, name)


# -- online only: one documented Hub call each (no test reaches the Hub) ---------------------


def _remote_commit(repo: str, revision: str) -> str:
    """GET /api/datasets/{repo}/revision/{revision} -> {"sha": "<commit>", ...}
    (`HfApi.dataset_info`), with the user's own token as huggingface_hub finds it."""
    from huggingface_hub import HfApi

    try:
        sha = HfApi().dataset_info(repo, revision=revision).sha
    except Exception as e:
        raise HubError(
            f"cannot resolve revision {revision!r} of the Hub dataset {repo}: "
            f"{type(e).__name__}: {e}. Check the name and your access (`huggingface-cli "
            f"login`), or set HF_HUB_OFFLINE=1 to use the local Hub cache."
        ) from None
    return str(sha)


def _remote_files(repo: str, commit: str) -> dict[str, str]:
    """GET /api/datasets/{repo}/tree/{commit}?recursive=true -> [{"type": "file", "path",
    "oid" (git blob id), "lfs": {"oid": sha256, ...} | absent}, ...] (`list_repo_tree`):
    each file's content id, the LFS sha256 else the blob id, without downloading it."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    try:
        tree = HfApi().list_repo_tree(repo, repo_type="dataset", revision=commit, recursive=True)
        return {
            f.path: (f.lfs.sha256 if f.lfs else f.blob_id) for f in tree if isinstance(f, RepoFile)
        }
    except Exception as e:
        raise HubError(
            f"cannot list the files of the Hub dataset {repo} at {commit}: "
            f"{type(e).__name__}: {e}. Set HF_HUB_OFFLINE=1 to use the local Hub cache."
        ) from None


def _download(repo: str, commit: str, name: str) -> None:
    """GET /datasets/{repo}/resolve/{commit}/{name} into the cache (`hf_hub_download`)."""
    from huggingface_hub import hf_hub_download

    hf_hub_download(repo, name, repo_type="dataset", revision=commit)
