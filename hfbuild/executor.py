"""Where a unit of work is built: on this machine (the default) or on a Ray cluster.

A *unit of work* is one entry to build: a stage's spec, the manifest whose key it is built
under, and the keys of the entries it reads. A whole stage is one unit; on the Ray executor a
sharded stage is split into one unit per missing shard (`shardunits`), whose only input is
its input shard (or, for a load, its one data file). An executor turns a unit into a
published entry in the local store: the local one builds it here, the Ray one
(`ray_executor`) builds it on the cluster, publishes it to the remote cache, and fetches it.

Owns: the `Unit` value, the choice of executor (`--executor`, else $HFBUILD_EXECUTOR, else
`[tool.hfbuild] executor` in pyproject.toml, else local), and the message saying what to
install when Ray is chosen but missing.

Must never: import ray at module level (the local path and every up-to-date check stay free of
it), or fall back to another executor than the one chosen.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from hfbuild import config
from hfbuild.errors import ConfigError

if TYPE_CHECKING:
    from hfbuild.fingerprint import Manifest
    from hfbuild.pipeline import Pipeline
    from hfbuild.shards import Shard
    from hfbuild.spec import Report, StageSpec

EXECUTORS = ("local", "ray")


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
    def build(self, pipe: Pipeline, unit: Unit) -> Report:
        """Build `unit` and publish it in `pipe.store`, with the store's lock for the unit's
        static fingerprint held by the caller."""
        ...

    def build_all(self, pipe: Pipeline, units: Sequence[Unit], label: str) -> list[Report]:
        """Build several independent units of one stage (`label`), in any order or at once;
        their reports in the order given."""
        ...


class LocalExecutor:
    """Builds units in this process, one after another (`datasets` may still use `num_proc`
    workers)."""

    def build(self, pipe: Pipeline, unit: Unit) -> Report:
        if unit.shard is not None:
            from hfbuild.shardunits import build_shard_here

            return build_shard_here(pipe, unit)
        from hfbuild.build import build_here

        return build_here(pipe, unit.spec, unit.manifest, unit.inputs)

    def build_all(self, pipe: Pipeline, units: Sequence[Unit], label: str) -> list[Report]:
        return [self.build(pipe, u) for u in units]


def executor_name(root: str, explicit: str | None = None) -> str:
    """The chosen executor's name: `explicit`, else $HFBUILD_EXECUTOR, else `[tool.hfbuild]
    executor` in the project's pyproject.toml, else "local"."""
    name = explicit or os.environ.get("HFBUILD_EXECUTOR", "").strip() or _configured(root)
    name = (name or "local").strip().lower()
    if name not in EXECUTORS:
        raise ConfigError(
            f"unknown executor {name!r}: use one of {', '.join(EXECUTORS)} (from --executor, "
            f"HFBUILD_EXECUTOR or [tool.hfbuild] executor)."
        )
    return name


def choose(pipe: Pipeline, explicit: str | None = None) -> Executor:
    """The executor to build `pipe`'s units with."""
    if executor_name(pipe.root, explicit) == "local":
        return LocalExecutor()
    require_ray()
    from hfbuild.ray_executor import RayExecutor

    return RayExecutor()


def require_ray() -> None:
    """Raise a ConfigError naming what to install when Ray cannot be imported."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"the Ray executor needs Ray, which cannot be imported here ({e}). Install it "
            f"into this environment: pip install 'hfbuild[ray]' (or pip install ray), or "
            f"choose the local executor (unset HFBUILD_EXECUTOR)."
        ) from e


def _configured(root: str) -> str | None:
    value = config.tool(root).get("executor")
    return str(value) if value else None
