"""A unit of work, and what an executor that builds units is.

A *unit of work* is one entry to build: a stage's spec, the manifest whose key it is built
under, and the keys of the entries it reads. A whole stage is one unit; on the Ray executor a
sharded stage is split into one unit per missing shard (`shardunits`), whose only input is
its input shard (or, for a load, its one data file). An executor turns a unit into a
published entry in the local store (`Place.store`).

Owns: the `Unit` value and the `Executor` interface that the stage build (`build`), the local
executor (`local`), the shard units (`shardunits`) and the Ray executor (`ray_executor`)
depend on instead of on each other.

Must never: import an executor, a builder, or anything that builds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from hfbuild.core.spec import Report, StageSpec
    from hfbuild.keys.manifest import Manifest, Shard
    from hfbuild.keys.place import Place


@dataclass(frozen=True)
class Unit:
    """One entry to build: `spec`'s transform under `manifest`'s key, reading the entries
    `inputs` names (input stage name -> its manifest, whose fingerprint is the key read).
    With `shard`, only that shard of the sharded stage `manifest` describes: its key is the
    shard's, it reads only its input shard (a load shard: its data file), and `offset` is the
    number of rows of the input shards before it in its split (`with_indices` only)."""

    spec: StageSpec
    manifest: Manifest
    inputs: Mapping[str, Manifest]
    shard: Shard | None = None
    offset: int = 0

    @property
    def key(self) -> str:
        """The key the unit is expected to be published under (what it reads at run time may
        still add to it, see `fullkey`)."""
        return self.shard.key if self.shard is not None else self.manifest.fingerprint

    @property
    def input_keys(self) -> tuple[str, ...]:
        """The keys of the entries the unit reads, in the spec's order."""
        if self.shard is not None:
            return () if self.spec.kind == "load" else (self.shard.input,)
        return tuple(self.inputs[i].fingerprint for i in self.spec.inputs)


class Executor(Protocol):
    def build(self, place: Place, unit: Unit) -> Report:
        """Build `unit` and publish it in `place.store`, with the store's lock for the unit's
        static fingerprint held by the caller."""
        ...

    def build_all(self, place: Place, units: Sequence[Unit], label: str) -> list[Report]:
        """Build several independent units of one stage (`label`), in any order or at once;
        their reports in the order given."""
        ...
