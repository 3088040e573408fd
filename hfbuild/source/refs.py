"""`module:qualname` references to stage functions (issue #20 item 2).

A stage may name its function as entry points do, `"embed.model:embed"`, instead of passing the
function object: dodo.py then does not import the transform's module, so `doit run` and the
commands can answer from the no-import record (`record.py`) without running its import.

Owns: checking a reference's form when a stage is defined (no import), and the stage's function:
the object itself, or the reference imported (`importlib.import_module`, then the qualname's
attributes), when a stage must be fingerprinted afresh or built.
Must never: import a module when a stage is defined or when its answer comes from the record;
turn an import failure into anything but a `StageError` naming the stage and the reference.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from hfbuild.core.errors import StageError
from hfbuild.core.spec import StageSpec

_REF = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
)


def check(ref: str, stage: str) -> str:
    """`ref` when it has the form `module:qualname`, else a `StageError` saying so."""
    if not _REF.match(ref):
        raise StageError(
            f"stage {stage!r}: {ref!r} is not a function reference: write it as "
            f"'module:qualname' (like 'embed.model:embed'), or pass the function itself."
        )
    return ref


def qualname(spec: StageSpec) -> str:
    """The function's qualified name, without importing it."""
    if spec.ref is not None:
        return spec.ref.partition(":")[2]
    return str(getattr(spec.fn, "__qualname__", ""))


def function(spec: StageSpec) -> Callable[..., Any] | None:
    """The stage's function: the object given, or the reference imported now."""
    if spec.ref is None:
        return spec.fn
    module, _, name = spec.ref.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except Exception as e:
        raise StageError(
            f"stage {spec.name!r}: importing {module!r} for {spec.ref!r} failed: "
            f"{type(e).__name__}: {e}. The module must be importable from the directory of "
            f"dodo.py (or sys.path)."
        ) from e
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise StageError(
                f"stage {spec.name!r}: module {module!r} has no {name!r} (from {spec.ref!r})."
            ) from None
    if not callable(obj):
        raise StageError(f"stage {spec.name!r}: {spec.ref!r} names {obj!r}, which is not callable")
    return obj  # type: ignore[no-any-return]
