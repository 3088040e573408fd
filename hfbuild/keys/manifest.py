"""A stage's manifest and the keys it gives.

Owns: the `Manifest` value (the hashed `doc`, and what is reported beside it), its static
fingerprint (the xxh3-128 of its canonical JSON), the full key `f(static fingerprint,
observed [path, id])` of a stage whose builds read files at run time (`fullkey` decides which),
and a sharded stage's keys: its code key, each shard's key and the stage's key over its shards
in order (`shards` decides which stages are sharded, and from what).

Must never: import `datasets` or anything above the keys (a fingerprint is a pure function of
the manifest), or put an absolute path, time, host or object id into a key.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, NamedTuple

from hfbuild.core import canonical
from hfbuild.source.gitrepo import FileId

Observed = tuple[tuple[str, str], ...]  # sorted (repo-relative path, content id)


@dataclass(frozen=True)
class Manifest:
    """The canonical description of one stage. `doc` is hashed; the rest is reported only."""

    doc: Mapping[str, Any]
    dirty: tuple[FileId, ...] = ()
    incomplete: tuple[str, ...] = field(default=())
    # A load stage's data files as resolved when the fingerprint was taken (absolute paths):
    # the build reads exactly these, never a glob expanded again later.
    data_files: Any = None
    # Files the stage's builds were seen to read or import at run time, with their current
    # ids ((path, id), sorted): part of the key, not of `doc` (see `fullkey`).
    observed: tuple[tuple[str, str], ...] = ()
    # A sharded stage (shards.py decides which stages are): what each shard is built from,
    # and the key of the stage's
    # code that all its shards share (before what its builds read at run time).
    shards: tuple[ShardIn, ...] | None = None
    shard_code: str | None = None
    # Arguments naming an existing path outside the project, which is not keyed (argpaths.py):
    # warned about with the dirty files.
    outside: tuple[str, ...] = ()
    # The inputs whose current result is not built yet (inputid.py): the stage's key cannot
    # be known before they are (its `inputs` then hold their fingerprints under a marker, a
    # key never built or served).
    pending: tuple[str, ...] = ()
    # A load of Hub files: each revision it read and the commit it resolved to (hub.Pin, as
    # JSON), for the lock; not hashed (the files' content ids are).
    hub: tuple[Mapping[str, str], ...] = ()

    def to_json(self) -> str:
        return canonical.dumps(self.doc)

    @functools.cached_property
    def static_fingerprint(self) -> str:
        """The digest of `doc`: what the code says, before anything observed at run time.
        Computed once per manifest (a frozen dataclass; `doc` is never changed once built)."""
        return canonical.digest(self.to_json().encode())

    @functools.cached_property
    def fingerprint(self) -> str:
        """The stage's key: the static fingerprint, combined with the observed files' ids
        when its builds read any; for a sharded stage, the digest of its shards' keys."""
        if self.shards is not None:
            return stage_key(self)
        return full_key(self.static_fingerprint, self.observed)

    @functools.cached_property
    def shard_list(self) -> list[Shard]:
        """A sharded stage's shards in order, with their keys (see shards.py)."""
        return shard_list(self)


def full_key(static: str, observed: Observed) -> str:
    """The key of a result built from the static manifest and the files it read."""
    if not observed:
        return static
    doc = {"static": static, "observed": [list(p) for p in sorted(observed)]}
    return canonical.digest(canonical.dumps(doc).encode())


class ShardIn(NamedTuple):
    """What one shard is built from: its split, its input's key (a file's content id, or the
    input stage's shard key, which the build loads), its label (the data file's path;
    reported, never hashed), for offset-dependent transforms a digest of the input shards
    before it in its split and, for a transform, its input shard's content (`inputid`: what
    its key holds instead of the input shard's key; "" for an input that did not record its
    form, keyed by the input shard's key as before)."""

    split: str
    input: str
    label: str
    before: str = ""
    content: str = ""


class Shard(NamedTuple):
    """One shard of a stage: its split, key, label, position (`pos`) in its split, input key,
    the digest of the input shards before it (`with_indices` only, else "") and its input
    shard's content (see `ShardIn`)."""

    split: str
    key: str
    label: str
    pos: int
    input: str
    before: str = ""
    content: str = ""

    @property
    def keyed_input(self) -> str:
        """What the shard's key holds of its input: its content, else its key."""
        return self.content or self.input


def _digest(doc: Any) -> str:
    return canonical.digest(canonical.dumps(doc).encode())


def code_key(m: Manifest) -> str:
    """The key every shard of the stage shares: its code, arguments and options, plus the
    files its builds read at run time."""
    assert m.shard_code is not None
    return full_key(m.shard_code, m.observed)


def shard_list(m: Manifest) -> list[Shard]:
    """The stage's shards in order, with their keys."""
    assert m.shards is not None
    return list(_keyed(code_key(m), m.shards)[0])


@functools.lru_cache(maxsize=16)
def _keyed(code: str, ins: tuple[ShardIn, ...]) -> tuple[tuple[Shard, ...], str]:
    """The shards with their keys, and the stage's key, for a code key and shard inputs:
    a pure function of its arguments, kept for the copies of one manifest that differ only
    in what is not keyed (a build makes a few per stage: each would otherwise digest every
    shard's key again)."""
    out: list[Shard] = []
    index: dict[str, int] = {}
    tail = f',"shard":{_json_str(code)}}}'  # `shard_key`'s text, its code's part once
    digest = canonical.digest
    for s in ins:
        i = index.get(s.split, 0)
        index[s.split] = i + 1
        b = _json_str(s.before) if s.before else "null"
        text = f'{{"before":{b},"input":{_json_str(s.content or s.input)}{tail}'
        out.append(Shard(s.split, digest(text.encode()), s.label, i, s.input, s.before, s.content))
    stage = _digest({"sharded": code, "shards": [[s.split, s.key] for s in out]})
    return tuple(out), stage


def shard_key(code: str, input_key: str, before: str = "") -> str:
    """One shard's key: the stage's code key (`code_key`), its input's key and, for
    offset-dependent transforms, the digest of the input keys before it: the digest of
    `canonical.dumps({"shard": code, "input": input_key, "before": before or None})`, that
    text written directly (keys in sorted order, each string by json's own encoder, as
    `json.dumps(..., sort_keys=True, separators=(",", ":"))` writes them): a stage of
    thousands of shards computes one per shard in every run, no-op included."""
    b = _json_str(before) if before else "null"
    text = f'{{"before":{b},"input":{_json_str(input_key)},"shard":{_json_str(code)}}}'
    return canonical.digest(text.encode())


def stage_key(m: Manifest) -> str:
    """A sharded stage's fingerprint: its code key and its ordered shard keys."""
    assert m.shards is not None
    return _keyed(code_key(m), m.shards)[1]
