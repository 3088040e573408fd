"""Finding the pipeline a command works on: the `Pipeline` defined in a dodo.py.

Owns: importing dodo.py the way doit does (its directory as the working directory and first on
sys.path) and picking out its one `Pipeline`, with the doit task name it is exposed under;
the pipeline a no-import record describes (its shape), without the import.
Must never: build anything.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from typing import Any

from hfbuild.core.errors import HfbuildError
from hfbuild.core.spec import StageSpec
from hfbuild.pipeline import record
from hfbuild.pipeline.pipeline import Pipeline


def dodo_path(dodo: str | None = None) -> str:
    """The absolute path of the dodo file a command works on (`--dodo`, else ./dodo.py)."""
    return os.path.abspath(dodo or "dodo.py")


def recorded_pipeline(session: record.Session, modes: tuple[str, ...]) -> Pipeline | None:
    """The pipeline of `session`'s record when its entries for `modes` answer (every fact
    holds), without importing dodo.py; else None. The working directory becomes dodo.py's, as
    `load_pipeline` makes it."""
    if not all(session.answer(m) is not None for m in modes):
        return None
    entry = session.sources[modes[0]]
    os.chdir(os.path.dirname(session.dodo))
    return _from_record(session, entry["pipeline"])


def _from_record(session: record.Session, shape: dict[str, Any]) -> Pipeline:
    """The pipeline a record describes (`Pipeline.shape`), without dodo.py: its stages
    have no function."""
    pipe = Pipeline(
        shape["store"],
        root=shape["root"],
        name=shape["name"],
        remote=shape["remote"],
        lock=shape["lock"],
    )
    for s in shape["stages"]:
        options = {"builder": s["builder"]} if s["kind"] == "load" else {}
        if s.get("data_files") is not None:  # absent from older entries
            options["data_files"] = s["data_files"]
        ins = tuple(s["inputs"])
        pipe.define(StageSpec(s["name"], s["kind"], ins, None, {}, options, (), s["doc"], s["ref"]))
    pipe.use_record_only(session)
    return pipe


def load_pipeline(
    dodo: str | None = None, session: record.Session | None = None, modes: tuple[str, ...] = ()
) -> Pipeline:
    """The pipeline dodo.py defines, imported; with `session`, it answers from that record
    (and leaves one for `modes`) when it is the pipeline the record is of."""
    if session is not None:
        session.begin(*modes)  # the facts before the import
    record.cli_loading = True
    try:
        pipe = _load(dodo)
    finally:
        record.cli_loading = False
    if session is not None:
        pipe.use_record(session)
    return pipe


def _load(dodo: str | None) -> Pipeline:
    path = dodo_path(dodo)
    if not os.path.isfile(path):
        raise HfbuildError(
            f"no dodo file at {path}: run hfbuild in the directory holding your dodo.py, or "
            f"pass --dodo PATH."
        )
    directory = os.path.dirname(path)
    os.chdir(directory)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location("dodo", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["dodo"] = module
    try:
        spec.loader.exec_module(module)
    except HfbuildError:
        raise
    except Exception as e:
        raise HfbuildError(
            f"{path} failed to load: {type(e).__name__}: {e}. Run `doit list` to see the traceback."
        ) from e
    pipes = list({id(v): v for v in vars(module).values() if isinstance(v, Pipeline)}.values())
    if not pipes:
        raise HfbuildError(f"{path} defines no hfbuild.Pipeline at module level.")
    if len(pipes) > 1:
        names = ", ".join(k for k, v in vars(module).items() if isinstance(v, Pipeline))
        raise HfbuildError(
            f"{path} defines several pipelines ({names}); hfbuild commands work on one."
        )
    pipe = pipes[0]
    _learn_task_name(module)
    return pipe


def _learn_task_name(module: types.ModuleType) -> None:
    """Start the `task_*` generators that call `pipe.tasks()`, as doit would: that call
    records the task's basename (`preprocess`) for the commands' messages."""
    for name, fn in vars(module).items():
        code = getattr(fn, "__code__", None)
        if name.startswith("task_") and code is not None and "tasks" in code.co_names:
            gen = fn()
            if isinstance(gen, types.GeneratorType):
                with contextlib.suppress(Exception):  # a broken task is doit's to report
                    next(gen)
                gen.close()
