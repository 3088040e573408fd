"""hfbuild.lock: the committed record of what every stage was built from and what it produced.

Owns: reading, writing and merging the lock at the repository root. One entry per stage
(fingerprint, input stages, the full manifest, output rows and content hash, the dirty
files it was built from and the files it read at run time, if any), as sorted, indented
JSON so one stage's change is one small diff. Writes are atomic and serialized by a file
lock, so concurrent builds do not lose entries.

Must never: be the basis of a freshness decision (the store is), or import datasets.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from hfbuild.errors import HfbuildError

LOCK_NAME = "hfbuild.lock"
SCHEMA = 1


class LockError(HfbuildError):
    """hfbuild.lock cannot be read."""


def dumps(stages: Mapping[str, Any]) -> str:
    doc = {"hfbuild": SCHEMA, "stages": dict(sorted(stages.items()))}
    return json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def loads(text: str, where: str = LOCK_NAME) -> dict[str, Any]:
    """The stages of a lock document."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        hint = " (an unresolved merge conflict?)" if "<<<<<<<" in text else ""
        raise LockError(
            f"{where} is not valid JSON{hint}: {e}. Regenerate it with `doit run preprocess`, "
            f"which rewrites every entry."
        ) from e
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), dict):
        raise LockError(f"{where} is not an hfbuild lock (no 'stages' object).")
    stages: dict[str, Any] = doc["stages"]
    return stages


def read(path: str) -> dict[str, Any]:
    """The stages recorded in the lock at `path`; empty when there is no lock yet."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except ValueError:
        # Corrupt bytes are handled like invalid JSON: regenerable, never fatal for a build.
        return {}
    try:
        return loads(text, path)
    except LockError:
        return {}


def entry(
    manifest: Mapping[str, Any],
    fingerprint: str,
    inputs: Mapping[str, str],
    stored: Mapping[str, Any],
    dirty: list[str],
) -> dict[str, Any]:
    """A stage's lock entry; `stored` is the store entry's manifest (rows, content hash)."""
    e: dict[str, Any] = {
        "fingerprint": fingerprint,
        "inputs": dict(inputs),
        "manifest": manifest,
        "rows": stored.get("rows"),
        "content_hash": stored.get("content_hash"),
    }
    if dirty:
        e["dirty"] = sorted(dirty)
    if stored.get("observed"):
        # Files the build read at run time: with the static fingerprint, a clone without the
        # store (CI, or one pulling from a remote) computes the same key (see fullkey.py).
        e["static_fingerprint"] = stored.get("static_fingerprint")
        e["observed"] = stored["observed"]
    return e


@contextlib.contextmanager
def _locked(lock_dir: str) -> Iterator[None]:
    from filelock import FileLock

    os.makedirs(lock_dir, exist_ok=True)
    with FileLock(os.path.join(lock_dir, "hfbuild-lockfile.lock")):
        yield


def update(path: str, lock_dir: str, updates: Mapping[str, Any], keep: set[str]) -> bool:
    """Set the entries in `updates`, drop entries of stages not in `keep`, and rewrite the
    file only if its text changes. Returns whether it did."""
    from hfbuild.store import write_text_atomic

    with _locked(lock_dir):
        stages = read(path)
        new = {k: v for k, v in stages.items() if k in keep}
        new.update(updates)
        text = dumps(new)
        try:
            with open(path, encoding="utf-8") as f:
                if f.read() == text:
                    return False
        except (OSError, ValueError):
            pass
        write_text_atomic(path, text)
        return True
