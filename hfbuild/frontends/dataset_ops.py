"""Drop-in replacements for `Dataset.map` and `Dataset.filter` with hfbuild's fingerprint.

Owns: calling `datasets` with `new_fingerprint=` set, split by split for a `DatasetDict`.
Must never: be imported by an up-to-date check (it is the one place besides building that
touches `datasets` objects' methods).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hfbuild.core.errors import HfbuildError
from hfbuild.keys.fingerprint import fingerprint


def _apply(
    op: str,
    ds: Any,
    fn: Callable[..., Any],
    fn_kwargs: Mapping[str, Any] | None,
    file_deps: Sequence[str | os.PathLike[str]],
    kwargs: dict[str, Any],
) -> Any:
    if "new_fingerprint" in kwargs:
        raise HfbuildError(
            f"hfbuild.{op} computes new_fingerprint itself; drop that argument, or call "
            f"ds.{op} directly to use your own."
        )
    if hasattr(ds, "column_names") and isinstance(ds, Mapping):  # a DatasetDict
        if kwargs.pop("with_split", False):
            raise HfbuildError(
                f"hfbuild.{op} does not support with_split=True: call it on each split."
            )
        dict_type: Any = type(ds)
        return dict_type(
            {
                split: _apply(op, d, fn, fn_kwargs, file_deps, dict(kwargs))
                for split, d in ds.items()
            }
        )
    fp = fingerprint(fn, fn_kwargs, parent=ds, kind=op, options=kwargs, file_deps=file_deps)
    method = getattr(ds, op)
    return method(fn, fn_kwargs=dict(fn_kwargs or {}), new_fingerprint=fp, **kwargs)


def map(
    ds: Any,
    fn: Callable[..., Any],
    fn_kwargs: Mapping[str, Any] | None = None,
    *,
    file_deps: Sequence[str | os.PathLike[str]] = (),
    **kwargs: Any,
) -> Any:
    """`ds.map(fn, fn_kwargs=..., **kwargs)` with a fingerprint that follows the code."""
    return _apply("map", ds, fn, fn_kwargs, file_deps, kwargs)


def filter(
    ds: Any,
    fn: Callable[..., Any],
    fn_kwargs: Mapping[str, Any] | None = None,
    *,
    file_deps: Sequence[str | os.PathLike[str]] = (),
    **kwargs: Any,
) -> Any:
    """`ds.filter(fn, fn_kwargs=..., **kwargs)` with a fingerprint that follows the code."""
    return _apply("filter", ds, fn, fn_kwargs, file_deps, kwargs)
