"""What a stage's key holds of each input: the input's result, not the input's key (early cutoff).

A consumer's key takes its input's *content*: the content hash of the input's stored result
and its *form* (the features of each split, the format, the splits' order: what a consumer
loading the result sees besides the rows, which the content hash leaves out), and, for a
sharded consumer, each input shard's content hash. So an input rebuilt for a comment, a
refactor or a package upgrade, whose result comes out the same, leaves its consumers' keys as
they were: they are up to date ("cut off"). A consumer's key can only be known once its input
is built: until then it is *pending* (`Manifest.pending`), never built or served under a key.

An entry published before results recorded their form (an old store, an old lock) has none:
its consumers are keyed by its fingerprint as before, so an old store keeps its keys until
the input is next built, and its consumers are then rebuilt once.

Owns: reading an input's identity (`Identity`) from its store entry's manifest or its lock
entry (both record `content_hash`, `form` and, for a sharded result, the shards' hashes),
and the form's digest (`form_digest`) from plain values.
Must never: import `datasets` (the up-to-date check computes keys), take an identity from
anything but the entry (or lock entry) of exactly the input's current fingerprint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from hfbuild.core import canonical

CONTENT = "content:"  # a sharded consumer's shard input is this prefix and the shard's hash


class Identity(NamedTuple):
    """An input's result as its consumers' keys hold it: its content hash and form, and its
    shards' content hashes by shard key (a sharded result; else empty). `form` is "" for an
    entry that did not record one (built before results did): keyed by fingerprint."""

    content: str
    form: str
    shards: Mapping[str, str]

    def part(self, fingerprint: str) -> Any:
        """The consumer manifest's `inputs` item for this input."""
        if not self.form:
            return fingerprint  # as before results recorded their form
        return {"content": self.content, "form": self.form}


# Given an input's manifest's fingerprint: its entry's stored manifest (or lock entry), or
# None when neither the store nor the lock has a result under exactly that key.
Lookup = Callable[[str], Mapping[str, Any] | None]


def identity(doc: Mapping[str, Any] | None) -> Identity | None:
    """The identity an entry's manifest (or a lock entry) records, or None without one."""
    if doc is None:
        return None
    content = doc.get("content_hash")
    if not isinstance(content, str):
        return None
    form = doc.get("form")
    return Identity(content, form if isinstance(form, str) else "", _shard_hashes(doc))


def _shard_hashes(doc: Mapping[str, Any]) -> dict[str, str]:
    from hfbuild.store.lockfile import shard_hashes

    return shard_hashes(doc)


def from_lock(stages: Callable[[], Mapping[str, Any]]) -> Lookup:
    """A lookup taking an input's result from the lock entry recording exactly that
    fingerprint (`stages` is called on the first lookup only: a run whose inputs are all
    in the store never reads it)."""
    by_fp: dict[str, Mapping[str, Any]] | None = None

    def lookup(fp: str) -> Mapping[str, Any] | None:
        nonlocal by_fp
        if by_fp is None:
            by_fp = {}
            for e in stages().values():
                if isinstance(e, dict) and isinstance(e.get("fingerprint"), str):
                    by_fp.setdefault(e["fingerprint"], e)
        e = by_fp.get(fp)
        return e if e is not None and identity(e) is not None else None

    return lookup


def first(*lookups: Lookup) -> Lookup:
    """The first of `lookups` that knows the fingerprint."""

    def lookup(fp: str) -> Mapping[str, Any] | None:
        for one in lookups:
            doc = one(fp)
            if doc is not None:
                return doc
        return None

    return lookup


def form_digest(form: Any) -> str:
    """The digest of a form given as plain JSON values (see `builder.form_of`)."""
    text = json.dumps(form, sort_keys=True, separators=(",", ":"), default=_unknown)
    return canonical.digest(text.encode())


def _unknown(o: Any) -> str:
    # A value JSON cannot hold (a format argument of a type of its own): by type, never by
    # repr (an object id), so the digest stays deterministic; the data decides the rest.
    return f"<{type(o).__module__}.{type(o).__qualname__}>"


def list_form(as_dict: bool, splits: list[str], shard_form: str) -> str:
    """The form of a result listing shards: its shards' common form (they share features:
    a load's are cast to what decides them, a filter keeps its input's, a map's are checked
    equal), whether it is a DatasetDict and its splits' order."""
    return form_digest({"list": shard_form, "dict": as_dict, "splits": splits})
