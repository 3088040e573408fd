"""Where a unit of work (`units.Unit`) is built: on this machine (the default) or on a Ray
cluster. The local executor (`local`) builds it here, the Ray one (`ray_executor`) builds it on
the cluster, publishes it to the remote cache, and fetches it.

Owns: the choice of executor (`--executor`, else $HFBUILD_EXECUTOR, else
`[tool.hfbuild] executor` in pyproject.toml, else local), and the message saying what to
install when Ray is chosen but missing.

Must never: import ray at module level (the local path and every up-to-date check stay free of
it), or fall back to another executor than the one chosen.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

from hfbuild.builds.local import LocalExecutor
from hfbuild.core import config
from hfbuild.core.errors import ConfigError

if TYPE_CHECKING:
    from hfbuild.builds.units import Executor

EXECUTORS = ("local", "ray")


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


def choose(root: str, explicit: str | None = None) -> Executor:
    """The executor to build the units of the project at `root` with."""
    if executor_name(root, explicit) == "local":
        return LocalExecutor()
    if importlib.util.find_spec("ray") is None:
        require_ray()  # the error naming what to install
    # The cluster is being connected to on a thread since the stage's store miss (`expect`).
    from hfbuild.builds.ray_executor import RayExecutor

    return RayExecutor()


def expect(root: str, explicit: str | None = None) -> None:
    """A stage the store lacks is about to be pulled from the remote or built: on the Ray
    executor, the connection started on a thread (`rayconnect.start`) while the remote is
    asked, so the job's first worker is up and warm sooner (~0.5-0.9 s a command); a stage
    the remote holds then connected for nothing (the exit's disconnect, ~0.3 s). Called
    only with a remote configured (without one, the Ray executor fails contacting none)."""
    try:
        ray = executor_name(root, explicit) == "ray"
    except ConfigError:  # said when an executor is chosen
        return
    if ray and importlib.util.find_spec("ray") is not None:
        from hfbuild.builds import rayconnect

        rayconnect.start()


def require_ray() -> None:
    """Raise a ConfigError naming what to install when Ray cannot be imported."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        from hfbuild.builds.rayconnect import missing

        raise missing(e) from e


def _configured(root: str) -> str | None:
    value = config.tool(root).get("executor")
    return str(value) if value else None
