"""Test helpers: real git repositories and fresh Python processes."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from typing import Any

PYTHON = sys.executable


def offline_env(home: pathlib.Path) -> dict[str, str]:
    """The environment a test runs in: offline, a pinned git identity, HOME and every cache
    under `home` (its .gitconfig written), so nothing touches ~/.cache."""
    (home / ".gitconfig").write_text(
        '[init]\n\tdefaultBranch = main\n[protocol "file"]\n\tallow = always\n'
    )
    return {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "HF_HOME": str(home / "hf"),
        "HF_DATASETS_CACHE": str(home / "hf" / "datasets"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"),
    }


def git(cwd: pathlib.Path | str, *args: str, check: bool = True) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, check=False, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout.strip()


class Repo:
    """A real git repository in a temporary directory, driven through the git CLI."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    @classmethod
    def init(cls, path: pathlib.Path) -> Repo:
        path.mkdir(parents=True, exist_ok=True)
        git(path, "init", "-q", "-b", "main")
        return cls(path)

    def write(self, files: Mapping[str, str], *, commit: str | None = None) -> Repo:
        """Write files (dedented), and commit all changes when `commit` is a message."""
        for name, text in files.items():
            p = self.path / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(textwrap.dedent(text))
        if commit is not None:
            self.commit(commit)
        return self

    def commit(self, message: str = "commit") -> str:
        git(self.path, "add", "-A")
        git(self.path, "commit", "-q", "--allow-empty", "-m", message)
        return git(self.path, "rev-parse", "HEAD")

    def git(self, *args: str) -> str:
        return git(self.path, *args)

    def clone(self, dest: pathlib.Path, *extra: str) -> Repo:
        dest.parent.mkdir(parents=True, exist_ok=True)
        git(dest.parent, "clone", "-q", *extra, f"file://{self.path}", str(dest))
        return Repo(dest)


def run_python(
    code: str,
    cwd: pathlib.Path | str,
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    args: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter with `cwd` first on sys.path."""
    full_env = {**os.environ, "PYTHONPATH": str(cwd), **(env or {})}
    out = subprocess.run(
        [PYTHON, "-c", textwrap.dedent(code), *(args or [])],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"python failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


FINGERPRINT_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("always")
import importlib, hfbuild
spec = json.loads(sys.argv[1])
mod = importlib.import_module(spec["module"])
fn = getattr(mod, spec["name"])
with warnings.catch_warnings(record=True) as caught:
    fp = hfbuild.fingerprint(fn, spec.get("kwargs"))
print(json.dumps({"fp": fp, "warnings": [str(w.message) for w in caught
                  if w.category is hfbuild.DirtyTreeWarning]}))
"""


def fingerprint_in_subprocess(
    cwd: pathlib.Path,
    module: str,
    name: str,
    kwargs: Any = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The fingerprint of `module.name(**kwargs)` computed by a fresh interpreter in `cwd`."""
    spec = json.dumps({"module": module, "name": name, "kwargs": kwargs})
    out = run_python(FINGERPRINT_SCRIPT, cwd, env=env, args=[spec])
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


HFBUILD = str(pathlib.Path(sys.executable).parent / "hfbuild")


def run_hfbuild(repo: Repo, *args: str) -> subprocess.CompletedProcess[str]:
    """The `hfbuild` command in `repo`, as a user runs it (transform call logs discarded)."""
    return subprocess.run(
        [HFBUILD, *args],
        cwd=repo.path,
        capture_output=True,
        text=True,
        env={**os.environ, "CALL_LOG": os.devnull},
        check=False,
    )


def same(a: Any, b: Any) -> bool:
    """Type-exact equality, what a canonical encoding must distinguish: NaN equals NaN, -0.0
    differs from 0.0, 1 differs from True and 1.0, arrays compare by dtype, shape and bytes."""
    import dataclasses
    import enum
    import math

    import numpy as np

    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return bool(a.tobytes() == b.tobytes())
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, enum.Enum):
        return a is b
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            any(same(k, k2) and same(v, b[k2]) for k2 in b) for k, v in a.items()
        )
    if isinstance(a, (set, frozenset)):
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)
    return bool(a == b)
