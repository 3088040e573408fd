"""What a stage is, and what building it did: plain values shared by the pipeline, the task
layer and the builder.

Owns: `StageSpec` (a stage's kind, inputs, callable, arguments and options), `Report` (the
outcome of building one stage), how a row count is written for people, and a stored
manifest's rows per split in the result's own split order.
Must never: import anything of hfbuild's but `errors`, or do work: these are values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

LOAD_BUILDERS = frozenset({"parquet", "csv", "json", "text", "arrow"})


@dataclass(frozen=True)
class StageSpec:
    """What a stage is: its kind, inputs, callable, arguments and options."""

    name: str
    kind: str  # load | map | filter | apply
    inputs: tuple[str, ...] = ()
    fn: Callable[..., Any] | None = None
    fn_kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    file_deps: tuple[str, ...] = ()
    doc: str | None = None
    # The function as a `module:qualname` reference (refs.py), imported only when needed;
    # `fn` is then None.
    ref: str | None = None


class Report(NamedTuple):
    """What building a stage did."""

    stage: str
    fingerprint: str
    action: str  # "built" | "up to date" | "built elsewhere" | "pulled"
    rows: Any
    seconds: float
    shards: tuple[int, int] | None = None  # a sharded stage: (shards built now, shards in all)
    # The stored manifest of the entry `fingerprint` names, as this build published it or
    # found it intact (None when not at hand: the ledger reads it from the store); for a
    # shard a Ray task built as a row range of a pack, what its stage's list records of it.
    entry: Mapping[str, Any] | None = None

    def line(self) -> str:
        rows = rows_text(self.rows)
        if self.action == "built" and self.shards is not None:
            built, total = self.shards
            what = "shard" if total == 1 else "shards"
            return (
                f"{self.stage}: built {built:,} of {total:,} {what} ({rows}) "
                f"in {self.seconds:.2f} s"
            )
        if self.action == "pulled":
            return f"{self.stage}: pulled {rows} from the remote in {self.seconds:.2f} s"
        if self.action == "built":
            return f"{self.stage}: built {rows} in {self.seconds:.2f} s"
        return f"{self.stage}: {self.action} ({rows})"


def split_order(rows: Any) -> dict[str, Any]:
    """What a stored manifest records besides `rows` for a DatasetDict: its splits in the
    result's order (`splits`), which JSON written with sorted keys does not keep."""
    return {"splits": list(rows)} if isinstance(rows, dict) else {}


def stored_rows(doc: Mapping[str, Any]) -> Any:
    """A stored manifest's rows, a DatasetDict's in the order of its `splits` (the order
    its result gives them); a manifest written before `splits` existed keeps its key order."""
    rows, splits = doc.get("rows"), doc.get("splits")
    if isinstance(rows, dict) and isinstance(splits, list) and sorted(splits) == sorted(rows):
        return {s: rows[s] for s in splits}
    return rows


def rows_text(rows: Any) -> str:
    """`1,906 rows`, or `train 10, test 2 rows` for a DatasetDict."""
    if isinstance(rows, dict):
        return ", ".join(f"{k} {v:,}" for k, v in rows.items()) + " rows"
    return f"{rows:,} rows" if isinstance(rows, int) else "? rows"
