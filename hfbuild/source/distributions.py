"""Installed distributions: which ones provide a module, and at which version.

Owns: the `name==version` of the distributions a top-level module name comes from (read from
the `<name>-<version>.dist-info` directory names on `sys.path`, the first one winning as for
imports; else `importlib.metadata`, only for a module that is installed at all); the runtime
distributions every stage's key holds (`runtime_packages`: datasets, pyarrow, Python's
major.minor); those that never enter a key (`UNTRACKED_DISTRIBUTIONS`: hfbuild's own).

Must never: import a distribution's modules to learn its version, read a distribution's files.
"""

from __future__ import annotations

import functools
import os
import re
import sys

# Distributions whose version must not enter fingerprints: hfbuild's own version is recorded
# in the stored manifest, not hashed (its manifest schema version is). `datasets` used to be
# here; it is in every key now (see `runtime_packages` and ARCHITECTURE.md).
UNTRACKED_DISTRIBUTIONS = frozenset({"hfbuild"})
# What runs every stage, whatever its code imports: datasets' builders, its map/filter loop
# and type inference, pyarrow's conversion and writing, and the interpreter (its Unicode
# database changes with the minor version).
RUNTIME_DISTRIBUTIONS = ("datasets", "pyarrow")


_SEPARATORS = re.compile(r"[-_.]+")


@functools.lru_cache(maxsize=1)
def _dist_info_dirs() -> dict[str, str]:
    """Canonical distribution name -> version, read from the `<name>-<version>.dist-info`
    directory names pip writes on sys.path: a directory listing, instead of importlib.metadata's
    50 ms import. The first entry on sys.path wins, as for imports."""
    found: dict[str, str] = {}
    for d in sys.path:
        try:
            names = os.listdir(d or os.curdir)
        except OSError:
            continue
        for n in names:
            if n.endswith(".dist-info"):
                name, _, version = n[: -len(".dist-info")].partition("-")
                found.setdefault(_canonical_dist(name), version)
    return found


def runtime_packages() -> frozenset[str]:
    """`name==version` of what runs every stage: datasets, pyarrow, and Python's
    major.minor as `python==3.11`. Read from dist-info names, without importing them."""
    found = _dist_info_dirs()
    out = {f"{d}=={found[d]}" for d in RUNTIME_DISTRIBUTIONS if d in found}
    return frozenset({*out, f"python=={sys.version_info[0]}.{sys.version_info[1]}"})


@functools.cache
def distributions(top: str) -> tuple[tuple[str, str], ...]:
    """The installed distributions providing top-level module `top`, with versions."""
    fast = _dist_info_dirs().get(_canonical_dist(top))
    if fast:  # the common case: the distribution is named like its module
        return ((_canonical_dist(top), fast),)
    import importlib.metadata
    import importlib.util

    # The full scan below reads every installed distribution (~0.2 s): only pay it for a
    # module that is installed at all (an optional `try: import x` usually is not).
    try:
        if importlib.util.find_spec(top) is None:
            return ()
    except (ImportError, ValueError):
        return ()

    out = []
    for n in sorted(set(_packages_distributions().get(top, []))):
        try:
            out.append((_canonical_dist(n), importlib.metadata.version(n)))
        except importlib.metadata.PackageNotFoundError:
            continue
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    import importlib.metadata

    return dict(importlib.metadata.packages_distributions())


def _canonical_dist(name: str) -> str:
    return _SEPARATORS.sub("-", name).lower()
