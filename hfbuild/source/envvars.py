"""Environment variables in a stage's key.

Owns: turning the names of the environment variables a stage's code reads (found by the static scan
in `closure`, by literal name) into the manifest's `env` part: each name with its value, `None` when
it is unset (so an unset variable and an empty one differ), or, for a name that looks secret
(`*TOKEN*`, `*KEY*`, `*SECRET*`, `*PASSWORD*`), `{"secret": <salted scrypt hash>}`. Also owns the
project's settings for them in `[tool.hfbuild]` of pyproject.toml: `untracked-env` (names whose
value does not change the output, such as a log path) and `secret-salt`.

Also owns how a variable read at run time (`observe.py` records it: a computed name) is
entered among the files a build read (`env://NAME` with the id of its value, keyed like the
literal names), and the mark of a build that copied the whole environment.

Must never: put a secret's value into anything it returns (manifests are stored, pushed and
shown), or read a variable the code does not read by name (an unrelated variable must never
change a key; a copy of the whole environment keys none).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from hfbuild.core import config
from hfbuild.core.errors import ConfigError
from hfbuild.store.paths import OBSERVED

_SECRET = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)
SALT_VARIABLE = "HFBUILD_SECRET_SALT"


def is_secret(name: str) -> bool:
    """True for a variable whose value must never be shown or stored in clear."""
    return _SECRET.search(name) is not None


def env_part(names: Iterable[str], root: str) -> list[list[Any]]:
    """The manifest's `env` part: `[name, value]` pairs sorted by name, for every name the
    code reads except the project's `untracked-env`; the value is `None` when unset and a
    salted hash for a secret."""
    wanted = sorted(set(names))
    if not wanted:
        return []
    settings = project_settings(root)
    out: list[list[Any]] = []
    for name in wanted:
        if name in settings.untracked:
            continue
        value = os.environ.get(name)
        if value is not None and is_secret(name):
            out.append([name, {"secret": secret_hash(name, value, settings.salt)}])
        else:
            out.append([name, value])
    return out


# Variables read at run time (observe.py) are recorded among the files a build read, each as
# `env://NAME` (`OBSERVED`: the store's, which decides what an observed entry may be) with its
# value's id: git and snapshots never produce a path with an empty part, so no file is taken
# for a variable. `env://` alone (a variable cannot have an empty name) records that the build
# copied or iterated the whole environment.
COPIED = ""  # the name observe.py records for a copy of the whole environment
COPIED_ID = "copied"


def observed_entry(name: str) -> str:
    """The observed-files entry of a variable read at run time (`COPIED`: "")."""
    return OBSERVED + name


def observed_name(entry: str) -> str | None:
    """The variable an observed-files entry names, or None when it names a file."""
    return entry[len(OBSERVED) :] if entry.startswith(OBSERVED) else None


def observed_id(name: str, environ: Mapping[str, str], root: str) -> str:
    """A variable's id among the observed files: the JSON of its value (`null` when unset),
    a salted hash for a secret, as in the `env` part; `copied` for the copy mark."""
    if not name:
        return COPIED_ID
    value = environ.get(name)
    if value is not None and is_secret(name):
        return secret_hash(name, value, project_settings(root).salt)
    return json.dumps(value)


def observed_value(entry_id: str) -> str:
    """How `explain` shows an observed variable's id: its value's repr, "unset", or
    "<secret>" (never a secret's hash)."""
    if entry_id.startswith("scrypt:"):
        return "<secret>"
    try:
        value = json.loads(entry_id)
    except ValueError:
        return entry_id
    return "unset" if value is None else repr(value)


def observed_keyed(names: Iterable[str], static: Iterable[str], root: str) -> list[str]:
    """The variables a build read at run time that its key must hold: not those its static
    `env` part holds already, nor the project's `untracked-env`."""
    skip = set(static) | project_settings(root).untracked
    return sorted(n for n in set(names) if n not in skip)


def secret_hash(name: str, value: str, project_salt: str) -> str:
    """A secret's value as it enters a key: scrypt (memory-hard, about 50 ms) of the value,
    salted with the project's salt and the variable's name. See ARCHITECTURE.md for why the
    salt is what it is."""
    salt = os.environ.get(SALT_VARIABLE) or project_salt
    return _scrypt(name, value, salt)


@functools.lru_cache(maxsize=64)
def _scrypt(name: str, value: str, salt: str) -> str:
    material = b"\0".join([b"hfbuild-env-v1", salt.encode(), name.encode()])
    return "scrypt:" + hashlib.scrypt(value.encode(), salt=material, n=2**14, r=8, p=1).hex()


class Settings:
    """The `[tool.hfbuild]` settings this module reads."""

    def __init__(self, untracked: frozenset[str], salt: str) -> None:
        self.untracked = untracked
        self.salt = salt


def project_settings(root: str) -> Settings:
    path = os.path.join(root, "pyproject.toml")
    doc = config.pyproject(root)
    tool = config.tool(root)
    untracked = tool.get("untracked-env", [])
    if not isinstance(untracked, list) or not all(isinstance(n, str) for n in untracked):
        raise ConfigError(
            f"{path}: [tool.hfbuild] untracked-env must be a list of variable names, "
            f'like untracked-env = ["LOG_FILE"].'
        )
    salt = tool.get("secret-salt")
    if salt is None:
        # The project's own name: the same in every clone, different between projects.
        salt = doc.get("project", {}).get("name", "")
    if not isinstance(salt, str):
        raise ConfigError(f"{path}: [tool.hfbuild] secret-salt must be a string.")
    return Settings(frozenset(untracked), salt)
