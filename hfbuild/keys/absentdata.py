"""Load stages whose data files are absent from the checkout (git-ignored, fetched by another
tool, or kept in object storage): what `hfbuild verify` can still check without them.

Owns: standing in for the absent part of such a stage's data identity with the files
hfbuild.lock records under the patterns that match nothing (after checking that the recorded
files fit the stage's `data_files` patterns; files that are present are hashed as usual), so
every other part of every stage (code, arguments, options, packages, and everything
downstream, whose inputs are fingerprints) is still compared with the lock; the list of
stages whose data was not checked; and confirming a locked data identity from a remote's
stored manifest, without downloading any data.

Must never: stand in when the lock records no data for the stage, or records files the
stage's patterns cannot name (both are errors); let a stage whose data was not checked pass
without being listed; read a remote entry's data.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from hfbuild.core.errors import MissingDataError
from hfbuild.source.datafiles import expand


class Unchecked(NamedTuple):
    """A load stage whose data files are absent: its data identity came from the lock."""

    stage: str
    missing: tuple[str, ...]  # the data_files patterns that match no file
    fingerprint: str  # the stage's fingerprint as the lock records it
    manifest: Mapping[str, Any]  # the lock's manifest of the stage
    content_hash: Any
    confirmed_by: str | None = None  # a remote holding the result built from that data
    remote_note: str | None = None  # why a configured remote could not confirm it

    def describe(self, lock_name: str) -> str:
        pats = ", ".join(self.missing)
        verb = "matches" if len(self.missing) == 1 else "match"
        if self.confirmed_by:
            return (
                f"load stage {self.stage!r}: its data files are absent ({pats} {verb} no file); "
                f"the remote {self.confirmed_by} holds the result built from the data "
                f"{lock_name} records (fingerprint {self.fingerprint}), so that data identity "
                f"is taken from the remote."
            )
        why = f" ({self.remote_note})" if self.remote_note else ""
        return (
            f"data not checked: load stage {self.stage!r}: {pats} {verb} no file in this "
            f"checkout, so its data identity was taken from {lock_name} unchecked{why}. "
            f"Fetch the data to check it, or configure a remote holding its result."
        )


def _patterns(data_files: Any) -> dict[str | None, list[str]]:
    """`data_files` as {split: [pattern, ...]}; the split is None for a plain list."""

    def one(spec: Any) -> list[str]:
        return [os.fspath(spec)] if isinstance(spec, (str, os.PathLike)) else list(spec)

    if isinstance(data_files, Mapping):
        return {str(k): one(v) for k, v in data_files.items()}
    return {None: one(data_files)}


def _exists(pattern: str, root: str) -> bool:
    try:
        expand(pattern, root, "")
    except MissingDataError:
        return False
    return True


def _name_pattern(pattern: str, root: str) -> str:
    """A pattern in the namespace of recorded file names (repo-relative posix paths, or
    `<outside>/<basename>` for files outside the project, as `datafiles.file_identity`)."""
    full = os.path.normpath(pattern if os.path.isabs(pattern) else os.path.join(root, pattern))
    rel = os.path.relpath(full, root)
    if rel == os.curdir or rel.startswith(os.pardir):
        return f"<outside>/{os.path.basename(full)}"
    return rel.replace(os.sep, "/")


def _matches(parts: list[str], name: list[str]) -> bool:
    """glob's rules per path segment, `**` spanning any number of segments (recursive=True)."""
    if not parts:
        return not name
    if parts[0] == "**":
        return any(_matches(parts[1:], name[i:]) for i in range(len(name) + 1))
    return bool(name) and fnmatch.fnmatchcase(name[0], parts[0]) and _matches(parts[1:], name[1:])


def matches(pattern: str, name: str) -> bool:
    """Whether the data-file pattern (already in name space) names the recorded file."""
    return _matches(pattern.split("/"), name.split("/"))


class LockedData:
    """Stands in for absent data with the lock's record; collects what was not checked."""

    def __init__(self, recorded: Mapping[str, Any], lock_name: str) -> None:
        self.recorded = recorded
        self.lock_name = lock_name
        self.unchecked: list[Unchecked] = []

    def files(
        self, stage: str, data_files: Any, root: str, identify: Callable[[str], list[str]]
    ) -> Any:
        """The data part `files` of `stage`'s manifest: for each pattern that matches files,
        their identities (`identify`, as for any load stage); for each that matches none, the
        files the lock records under it, after checking the record fits the stage's patterns.
        Raises MissingDataError when the lock cannot stand in."""
        missing = [
            p for pats in _patterns(data_files).values() for p in pats if not _exists(p, root)
        ]
        entry = self.recorded.get(stage)
        manifest = entry.get("manifest") if isinstance(entry, dict) else None
        data = manifest.get("data") if isinstance(manifest, dict) else None
        files = data.get("files") if isinstance(data, dict) else None
        gone = ", ".join(missing) + (" matches" if len(missing) == 1 else " match")
        if files is None:
            raise MissingDataError(
                f"load stage {stage!r}: {gone} no file, and {self.lock_name} records no "
                f"data for it, so neither it nor anything downstream can be checked. Fetch the "
                f"data, build (`doit run`) and commit {self.lock_name}."
            )
        why = _misfit(_patterns(data_files), files, root)
        if why is not None:
            raise MissingDataError(
                f"load stage {stage!r}: {gone} no file, and the files {self.lock_name} "
                f"records for it do not fit its data_files ({why}): data_files changed since "
                f"the lock was written. Fetch the data, rebuild and commit {self.lock_name}."
            )
        assert isinstance(entry, dict) and isinstance(manifest, dict)
        patterns = _patterns(data_files)
        if None in patterns:
            out: Any = _compose(patterns[None], files, root, identify)
        else:
            out = {s: _compose(patterns[s], files[s], root, identify) for s in sorted(files)}
        self.unchecked.append(
            Unchecked(
                stage,
                tuple(missing),
                str(entry.get("fingerprint")),
                manifest,
                entry.get("content_hash"),
            )
        )
        return out


def _compose(
    patterns: list[str], recorded: list[Any], root: str, identify: Callable[[str], list[str]]
) -> list[Any]:
    """One split's file identities in `resolve_data_files` order (pattern by pattern, each
    sorted, a file named twice listed twice): present files identified, absent ones from
    the record."""
    out: list[Any] = []
    for p in patterns:
        try:
            items = [identify(f) for f in expand(p, root, "")]
        except MissingDataError:
            spaced = _name_pattern(p, root)
            items = [f for f in recorded if matches(spaced, f[0])]
        out.extend(items)
    return out


def _misfit(patterns: dict[str | None, list[str]], files: Any, root: str) -> str | None:
    """Why the recorded `files` could not have come from `patterns` (None when they could):
    the same splits, every recorded file named by a pattern, every pattern naming a file."""
    if None in patterns:
        if not isinstance(files, list):
            return "the lock records splits, the stage names none"
        recorded: dict[str | None, Any] = {None: files}
    else:
        if not isinstance(files, dict):
            return "the stage names splits, the lock records none"
        if set(files) != set(patterns):
            return f"splits {sorted(map(str, patterns))} vs recorded {sorted(files)}"
        recorded = dict(files)
    for split, pats in patterns.items():
        names = [f[0] for f in recorded[split] if isinstance(f, list) and f]
        if len(names) != len(recorded[split]):
            return "the lock's file list is malformed"
        spaced = [_name_pattern(p, root) for p in pats]
        for n in names:
            if not any(matches(p, n) for p in spaced):
                return f"{n} is named by none of {', '.join(pats)}"
        for p, s in zip(pats, spaced, strict=True):
            if not any(matches(s, n) for n in names):
                return f"{p} names none of the recorded files"
    return None


def confirm(unchecked: list[Unchecked], remote: Any) -> list[Unchecked]:
    """Each unchecked stage, confirmed when `remote` (a `remote.Remote`, or None) holds a
    complete entry for the locked fingerprint whose manifest and content hash are the lock's:
    the result built from exactly the data the lock names exists there. Reads manifests only."""
    from hfbuild.store import listform
    from hfbuild.store.remotereach import RemoteError

    if remote is None:
        return unchecked
    out = []
    for u in unchecked:
        try:
            doc = remote.read_manifest(u.fingerprint)
        except RemoteError as e:
            out.append(u._replace(remote_note=f"the remote could not be read: {e}"))
            continue
        if doc is None:
            note = f"the remote {remote.url} holds no result for fingerprint {u.fingerprint}"
            out.append(u._replace(remote_note=note))
        elif (
            not listform.digest_holds(doc)
            or doc.get("manifest") != u.manifest
            or doc.get("content_hash") != u.content_hash
        ):
            note = f"the remote's entry {u.fingerprint} does not match the lock"
            out.append(u._replace(remote_note=note))
        else:
            out.append(u._replace(confirmed_by=remote.url))
    return out
