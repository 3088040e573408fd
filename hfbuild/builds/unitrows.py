"""The input rows of a batched stage's units, as a build by units reads them.

Owns: the rows `start` to `stop` of an input split that one batch-aligned unit reads
(`UnitRows.rows_of`): the input list's shards with rows indexed once a build (where each
starts in its split, by bisection per unit); each unit's rows as the concatenation of the
input shards holding them, or the whole split's where those shards' features differ from
its first's (whose features are read from its files' schemas, not its rows: that shard
is often a row of a pack of a million rows, which this build reads nothing else of); the
units of one build whose shards are all rows of one pack read from one load of that pack's
rows they need (the same rows and features as a load of the unit's own
shards: one pack, one schema, one `dataset_info.json`), each a slice of it.

Must never: load input shards outside the rows from the first unit to build to the last (an
append builds one or two units of thousands of input shards), publish or print.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any, NamedTuple

from hfbuild.store.entry import row_base, row_indexed, row_pack
from hfbuild.store.indexed import INDICES_FILE


class _Split(NamedTuple):
    """One split of the input list: its first shard with rows (a list of none or one), that
    shard's features, its shards with rows in order, the row each starts at, and for each
    the pack holding it when it is a plain packed row (no indices, its files listed)."""

    head: list[list[Any]]
    features: Any
    rows: list[list[Any]]
    starts: list[int]
    packs: list[str | None]


class UnitRows:
    """The rows units read from the input list `parent_fp` (its rows `listed`), for the
    units `todo` of one build."""

    def __init__(self, store: Any, parent_fp: str, listed: Sequence[Any], todo: Sequence[Any]):
        self._store = store
        self._fp = parent_fp
        self._listed = listed
        self._splits: dict[str, _Split] = {}
        self._span: dict[str, tuple[int, int]] = {}  # per split: the rows the todo units read
        for u in todo:
            lo, hi = self._span.get(u.split, (u.start, u.stop))
            self._span[u.split] = (min(lo, u.start), max(hi, u.stop))
        self._runs: dict[tuple[str, str], tuple[Any, int, int, int] | None] = {}

    def rows_of(self, u: Any) -> Any:
        """Rows `u.start` to `u.stop` of the input's split `u.split`, from the input shards
        holding them only (loading the whole input would map every shard of it)."""
        s = self._split(u.split)
        lo = max(bisect.bisect_right(s.starts, u.start) - 1, 0)
        hi = bisect.bisect_left(s.starts, u.stop)
        first = -1
        at_first = -1
        rows: list[list[Any]] = []
        for k in range(lo, hi):
            at, row = s.starts[k], s.rows[k]
            if at < u.stop and at + int(row[4]["rows"]) > u.start:
                if first < 0:
                    first, at_first = at, k
                rows.append(row)
        # The slice's fingerprint is given: datasets would otherwise hash the call's
        # arguments (~1 ms a unit). It reaches no result: the unit's map or filter is given
        # its own (`builder.run_stage`).
        named = {"new_fingerprint": "rows-of-" + str(u.key)[:56]}
        run = self._run(u.split, s, at_first, at_first + len(rows)) if rows else None
        if run is not None:
            part, begin = run
            features = part.features
            at = u.start - begin
        else:
            part = self._store.load_listed(self._fp, u.split, rows)
            features = part.features
            at = u.start - first
        if rows[:1] != s.head and s.features != features:
            # Shards of other types: the whole split's concatenation decides them, as served.
            whole = self._store.load(self._fp)
            split = whole[u.split] if isinstance(whole, dict) else whole
            return split.select(range(u.start, u.stop), **named)
        return part.select(range(at, at + (u.stop - u.start)), **named)

    def together(self, units: Sequence[Any]) -> Any | None:
        """The rows of consecutive units of one split (`units[0].start` to
        `units[-1].stop`) as one slice, when they all lie in one pack whose features are
        the split's first shard's (what `rows_of` gives each of them); else None."""
        first, last = units[0], units[-1]
        s = self._split(first.split)
        lo = max(bisect.bisect_right(s.starts, first.start) - 1, 0)
        hi = bisect.bisect_left(s.starts, last.stop)
        ks = [
            k
            for k in range(lo, hi)
            if s.starts[k] < last.stop and s.starts[k] + int(s.rows[k][4]["rows"]) > first.start
        ]
        run = self._run(first.split, s, ks[0], ks[-1] + 1) if ks else None
        if run is None or run[0].features != s.features:
            return None
        part, begin = run
        named = {"new_fingerprint": "rows-of-" + str(first.key)[:56]}
        return part.select(range(first.start - begin, last.stop - begin), **named)

    def _split(self, split: str) -> _Split:
        got = self._splits.get(split)
        if got is not None:
            return got
        rows: list[list[Any]] = []
        starts: list[int] = []
        at = 0
        for row in self._listed:
            if str(row[0]) != split:
                continue
            n = int(row[4]["rows"])
            if n:
                rows.append(row)
                starts.append(at)
            at += n
        head = rows[:1]
        features = self._store.listed_features(self._fp, split, head)
        got = _Split(head, features, rows, starts, [_plain_pack(r) for r in rows])
        self._splits[split] = got
        return got

    def _run(self, split: str, s: _Split, i: int, j: int) -> tuple[Any, int] | None:
        """When rows `i` to `j` of the split's shards with rows are all rows of one pack: the
        rows of that pack the build's units read (consecutive shards of the split, one
        load for them all) with the row of the split it starts at; else None."""
        owner = s.packs[i]
        if owner is None or any(p != owner for p in s.packs[i:j]):
            return None
        key = (split, owner)
        if key not in self._runs:
            lo, hi = self._span[split]
            a = max(bisect.bisect_right(s.starts, lo) - 1, 0)
            b = bisect.bisect_left(s.starts, hi)
            mine = [k for k in range(a, b) if s.packs[k] == owner]
            if mine and mine == list(range(mine[0], mine[-1] + 1)):
                part = self._store.load_listed(self._fp, split, s.rows[mine[0] : mine[-1] + 1])
                self._runs[key] = (part, s.starts[mine[0]], mine[0], mine[-1] + 1)
            else:
                self._runs[key] = None
        run = self._runs[key]
        if run is None or not (run[2] <= i and j <= run[3]):
            return None
        return run[0], run[1]


def _plain_pack(row: list[Any]) -> str | None:
    """The pack holding a listed shard's rows when the row is a plain packed row (its files
    listed, no indices): what `Store.load_listed` reads as a slice of the pack's table."""
    pack = row_pack(row)
    if pack is None or len(row) < 4 or not isinstance(row[3], dict) or INDICES_FILE in row[3]:
        return None
    if row_base(row) is not None or row_indexed(row):
        return None
    return pack[0]
