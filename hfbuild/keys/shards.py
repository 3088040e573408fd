"""Shards: one input data file of a load stage, and the row-local stages built file by file.

A load stage over several data files is *sharded*: each file is one shard, loaded by itself.
A `map`/`filter` over a sharded input is sharded too (unless `sharded=False`): it runs shard by
shard, so batches never span files, in a full build as in an incremental one. Each shard has
its own key and its own store entry; a stage's result is an ordered list of shard entries.

Keys:
- the stage's *code key* is its static fingerprint without the input (a load: without its
  files' ids), combined with what its builds read at run time (`fullkey`): one key shared by
  all the stage's shards, so the observed files count for every shard;
- a shard's key is `digest(code key, the input shard's content, [the contents before it])`:
  a load shard's input is its file's content id, a transform shard's the content hash of its
  input shard's result (`inputid`: a rebuilt input shard with the same result leaves the key
  as it was; an input built before results recorded their form: the input shard's key); the
  contents before it enter only where the output depends on the row offset
  (`with_indices`), so an inserted file rebuilds only the shards after it;
- the stage's fingerprint is `digest(code key, ordered [split, shard key])`.

Owns: deciding which stages are sharded, and the per-shard inputs of a manifest. The keys
above are computed from them in `manifest.py` (a `Manifest`'s fingerprint and shard list);
the combined content hash of a sharded result is `content.combined_hash`.
Must never: import `datasets` (the up-to-date path computes these keys), or put a path in a key
(a shard's label, the file's path, is reported only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hfbuild.core import canonical
from hfbuild.keys.inputid import CONTENT, Identity
from hfbuild.keys.manifest import Manifest, Shard, ShardIn

if TYPE_CHECKING:
    from hfbuild.core.spec import StageSpec

OPTION = "sharded"  # the stage option that opts out (`sharded=False`)
# A pending input (not built yet, see `inputid`): its fingerprint under this marker in the
# consumer's `inputs`, its shards' keys after it; such a key is never built or served.
PENDING = "pending:"


def _digest(doc: Any) -> str:
    return canonical.digest(canonical.dumps(doc).encode())


# -- which stages are sharded, and from what ---------------------------------------------------


def wanted(spec: StageSpec) -> bool:
    """The stage does not opt out (`sharded=False`)."""
    return spec.options.get(OPTION, True) is not False


def for_load(spec: StageSpec, m: Manifest) -> Manifest:
    """A load stage's manifest, sharded by data file when it has more than one file (and
    neither opts out nor selects a slice of a split)."""
    if not wanted(spec):
        return m
    data = m.doc.get("data") or {}
    files = data.get("files")
    split = spec.options.get("split")
    if split is not None and (not isinstance(split, str) or "[" in split):
        return m
    groups: list[tuple[str, Any]]
    if isinstance(files, Mapping):
        order = data.get("splits") or list(files)  # the splits in datasets' order
        groups = [(str(k), files[k]) for k in order if k in files]
        if split is not None:
            groups = [(k, v) for k, v in groups if k == split]
    elif isinstance(files, list):
        groups = [(split or "train", files)]
    else:
        return m
    ins = [ShardIn(s, str(f[1]), str(f[0])) for s, fs in groups for f in fs]
    if len(ins) < 2:
        return m
    decider = features_decider(spec, data, files)
    if decider is None:
        return m
    return dataclasses.replace(m, shards=tuple(ins), shard_code=load_shard_code(m.doc, decider))


def load_shard_code(doc: Mapping[str, Any], decider: str) -> str:
    """A sharded load's code key before run-time reads: `load_code`, with what decides
    its shards' features when that is a data file (`features_decider`)."""
    return load_code(doc) if not decider else _digest([load_code(doc), decider])


def features_decider(spec: StageSpec, data: Mapping[str, Any], files: Any) -> str | None:
    """What decides the features of a sharded load's every shard, as `datasets` decides
    them for the whole load: "" when the stage gives `features=` (every table is cast to
    them, each by itself), the first data file's content id for parquet (datasets takes
    the features of the first file of its first split, in its split order, and casts every
    table to them; a shard is loaded with those features, and the id is in every shard's
    key). None where a file's load alone can differ from its part of the whole load: json,
    csv, text and arrow without `features=` (the schema is the first table written, a
    table of one row is buffered with its neighbours), so the stage is built whole."""
    if spec.options.get("features") is not None:
        return ""
    if data.get("builder") != "parquet":
        return None
    first = first_file(data, files)
    return None if first is None else str(first[1])


def first_file(data: Mapping[str, Any], files: Any) -> Any:
    """The [name, id] of the load's first data file in datasets' order (its first split's
    first file, whatever `split=` selects: datasets prepares every split), or None."""
    if isinstance(files, Mapping):
        order = data.get("splits") or list(files)
        for k in order:
            if files.get(k):
                return files[k][0]
        return None
    return files[0] if files else None


def load_code_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A load stage's manifest without its files' ids and its splits' order: what its
    shards' code key hashes (a shard loads one file into its split whatever the order; the
    stage's key, over its shards in order, has the order)."""
    data = {k: v for k, v in (doc.get("data") or {}).items() if k != "splits"}
    return {**doc, "data": {**data, "files": None}}


def load_code(doc: Mapping[str, Any]) -> str:
    """A sharded load's code key before what its builds read at run time: the digest of
    its manifest without its files (so it stays the same when a file is added)."""
    return _digest(load_code_doc(doc))


def transform_inputs(
    spec: StageSpec, parent: Manifest, ident: Identity | None = None
) -> tuple[ShardIn, ...] | None:
    """The shard inputs of a map/filter over `parent`, or None when it is not sharded. Each
    holds its input shard's content from `ident`, the parent's result (`inputid`); without
    one (the parent not built yet: the stage is pending, never built under these keys) a
    marker of the input shard's key; with one that recorded no form, nothing (keyed by the
    input shard's key, as before)."""
    # `getattr`: a stand-in that knows only the input's fingerprint (a Ray worker's) has none.
    if spec.kind not in ("map", "filter") or getattr(parent, "shards", None) is None:
        return None
    if not wanted(spec):
        return None
    if not row_local(spec.options):
        return None
    offsets = bool(spec.options.get("with_indices"))
    out = []
    before: dict[str, str] = {}
    for s in parent.shard_list:
        prev = before.get(s.split, "")
        if ident is None:
            content = PENDING + s.key
        elif ident.form:
            content = CONTENT + ident.shards[s.key]
        else:
            content = ""
        out.append(ShardIn(s.split, s.key, s.label, prev if offsets else "", content))
        if offsets:
            before[s.split] = _digest([prev, content or s.key])
    return tuple(out)


def row_local(options: Mapping[str, Any]) -> bool:
    """Whether a map's or filter's output over a shard is its part of the output over the
    whole input, whatever the shards: not for a batched one (which rows share a batch is
    decided at the global offsets `datasets` cuts batches at, `batch_size` or its default
    of 1,000, within each of `num_proc` contiguous parts), nor one that sees its process's
    rank (`with_rank`: datasets splits the whole input into `num_proc` parts). Those are
    built whole."""
    return not options.get("batched") and not options.get("with_rank")


INPUT_MARKER = "shards"  # a sharded transform's manifest `inputs`: the shards carry them


def is_dict(spec_options: Mapping[str, Any]) -> bool:
    """Whether a sharded load's result is a DatasetDict (no `split=` chosen)."""
    return spec_options.get("split") is None


def changes(
    new: Sequence[Shard],
    present: Callable[[str], bool],
    old: Any = None,
    old_inputs: Mapping[str, tuple[str, str | None]] | None = None,
) -> list[str]:
    """What `explain` and `status` say of a sharded stage that is not built, most telling
    first: that its code or arguments changed (`K of N shards built again for its changed
    code or arguments`: shards the store lacks whose input is the one their label had in
    the last build), then `3 of 1,001 shards new: data/part-1000.parquet (added), ...`
    (the shards the store lacks whose input changed: `old`, the `[split, key, label]` rows
    of its last build, tells added from changed; `old_inputs`, label -> (what its key held
    of its input, the digest of the inputs before it or None when unknown) of that build),
    then the files its
    last build had that are gone. [] when every shard is in the store."""
    rows = [r for r in old if isinstance(r, list) and len(r) >= 3] if isinstance(old, list) else []
    old_labels = {str(r[2]) for r in rows}
    was = old_inputs or {}

    def same_input(s: Shard) -> bool:
        prev = was.get(s.label)
        return prev is not None and prev[0] == s.keyed_input and prev[1] in (None, s.before)

    old_keys = {str(r[2]): str(r[1]) for r in rows}
    missing = [s for s in new if not present(s.key)]
    recoded = [s for s in missing if same_input(s) and old_keys.get(s.label) != s.key]
    fresh = [s for s in missing if s not in recoded]
    lines = []
    if recoded:
        lines.append(
            f"its code, arguments or the files it reads changed: {len(recoded):,} of "
            f"{len(new):,} shards built again for it"
        )
    if fresh:

        def why(s: Shard) -> str:
            if not rows:
                return s.label
            if s.label not in old_labels:
                return f"{s.label} (added)"
            if old_keys.get(s.label) == s.key:
                return f"{s.label} (not in the store)"
            prev = was.get(s.label)
            moved = prev is not None and prev[0] == s.keyed_input
            return f"{s.label} ({'rows before it changed' if moved else 'changed'})"

        more = f", and {len(fresh) - 5:,} more" if len(fresh) > 5 else ""
        listing = ", ".join(why(s) for s in fresh[:5])
        lines.append(f"{len(fresh):,} of {len(new):,} shards new: {listing}{more}")
    gone = sorted(old_labels - {s.label for s in new})
    if gone:
        more = f", and {len(gone) - 5:,} more" if len(gone) > 5 else ""
        lines.append(f"{len(gone):,} removed: {', '.join(gone[:5])}{more}")
    return lines


def manifest_inputs(
    spec: StageSpec, done: Mapping[str, Manifest], ids: Mapping[str, Identity | None]
) -> Any:
    """A stage's manifest `inputs`: what it holds of each input's result (`ids`, see
    `inputid`; a pending input's fingerprint under a marker), or, for a sharded transform
    (whose shards carry their inputs' contents, so that its code key stays the same when a
    file is added), a marker with the input's form."""
    parent = done[spec.inputs[0]] if spec.inputs else None
    if parent is not None and transform_inputs(spec, parent) is not None:
        ident = ids[spec.inputs[0]]
        if ident is None:
            return {PENDING: parent.fingerprint}
        return {INPUT_MARKER: ident.form} if ident.form else INPUT_MARKER
    return [
        {PENDING: done[i].fingerprint} if ids[i] is None else ids[i].part(done[i].fingerprint)  # type: ignore[union-attr]
        for i in spec.inputs
    ]


def attach(
    spec: StageSpec,
    m: Manifest,
    done: Mapping[str, Manifest],
    ids: Mapping[str, Identity | None],
) -> Manifest:
    """`m` with its shards, when the stage is sharded."""
    if spec.kind == "load":
        return for_load(spec, m)
    if spec.kind in ("map", "filter"):
        ins = transform_inputs(spec, done[spec.inputs[0]], ids[spec.inputs[0]])
        if ins is not None:
            return dataclasses.replace(m, shards=ins, shard_code=m.static_fingerprint)
    return m
