"""The project's hfbuild settings: the `[tool.hfbuild]` table of its pyproject.toml.

Owns: reading and parsing pyproject.toml (once per version of the file in a process) and
handing out the `[tool.hfbuild]` table and the `[project]` name; an unreadable file is a
`ConfigError` naming it. What each setting means is its reader's (`remote`, `executor`,
`envvars`).
Must never: interpret a setting, or read anything but the project's own pyproject.toml.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping
from typing import Any

from hfbuild.core.errors import ConfigError


def pyproject(root: str) -> Mapping[str, Any]:
    """The whole parsed pyproject.toml at `root` (empty when there is none)."""
    path = os.path.join(root, "pyproject.toml")
    try:
        st = os.stat(path)
    except OSError:
        return {}
    return _parse(path, st.st_ino, st.st_mtime_ns, st.st_size)


def tool(root: str) -> Mapping[str, Any]:
    """The `[tool.hfbuild]` table (empty when there is none)."""
    table = pyproject(root).get("tool", {}).get("hfbuild", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{os.path.join(root, 'pyproject.toml')}: [tool.hfbuild] is not a table.")
    return table


@functools.lru_cache(maxsize=8)
def _parse(path: str, ino: int, mtime_ns: int, size: int) -> Mapping[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
    try:
        with open(path, "rb") as f:
            doc: Mapping[str, Any] = tomllib.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}): fix its syntax.") from e
    return doc
