"""`hfbuild build [STAGE...] [--executor local|ray]`: build stages without doit.

The same build as `doit run` (store, else remote, else build; the lock updated), for one
command line that chooses where missing entries are built. Under doit, the executor is chosen
with HFBUILD_EXECUTOR or `[tool.hfbuild] executor`.
"""

from __future__ import annotations

from collections.abc import Sequence

from hfbuild.builds.executor import executor_name
from hfbuild.builds.stage import build as build_stage
from hfbuild.pipeline.pipeline import Pipeline


def build(pipe: Pipeline, stages: Sequence[str], executor: str | None) -> int:
    """Build the stages (default: all, in definition order) and print one line each."""
    name = executor_name(pipe.root, executor)  # an unknown name fails before any work
    for s in stages:
        pipe[s]  # an unknown stage is a clear error
    for stage in list(stages) or [s.name for s in pipe]:
        print(build_stage(pipe, stage, executor=name).line(), flush=True)
    return 0
