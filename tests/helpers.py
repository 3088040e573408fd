"""Test helpers: real git repositories and fresh Python processes (started, or forked from a
server that imported `datasets` and hfbuild once: `Server`, `read_python`, `fork_python`)."""

from __future__ import annotations

import atexit
import itertools
import json
import os
import pathlib
import pickle
import random
import subprocess
import sys
import tempfile
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


class Server:
    """A tests/forkserver.py process: each `run` is a fresh child process."""

    def __init__(self, env: dict[str, str], plain: bool) -> None:
        here = pathlib.Path(__file__).with_name("forkserver.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(here), *(["--plain"] if plain else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def run(self, op: str, cwd: pathlib.Path, out: pathlib.Path, **kw: Any) -> tuple[int, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        req = {"op": op, "cwd": str(cwd), "out": str(out), **kw}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the fork server died (rc {self.proc.wait()})")
        rc = int(json.loads(line)["rc"])
        answer = None
        if out.exists():
            with out.open("rb") as f:
                answer = pickle.load(f)
        return rc, answer

    def log(self, out: pathlib.Path) -> str:
        p = pathlib.Path(str(out) + ".log")
        return p.read_text(errors="replace") if p.exists() else ""

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# This process's servers by name (`fork_python`), each started on first use: the server,
# its home, its hash seed.
_servers: dict[str, tuple[Server, pathlib.Path, int]] = {}
_outs = itertools.count()


def read_python(
    code: str,
    cwd: pathlib.Path | str,
    *,
    env: Mapping[str, str] | None = None,
    args: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `code` as `run_python` does (`cwd` first on sys.path, the test's environment and
    `env`, `args` after it in `sys.argv`), in a process forked from a server that imported
    `datasets` and hfbuild once and never runs project code (`fork_python`). For reading
    what a build left (results, keys, manifests), never for a claim about a process's start.
    Fails the test on an error, as `run_python` does."""
    full_env = {**os.environ, "PYTHONPATH": str(cwd), **(env or {})}
    return fork_python(code, cwd, full_env, args)


def fork_python(
    code: str,
    cwd: pathlib.Path | str,
    environ: Mapping[str, str],
    args: list[str] | None = None,
    *,
    server: str = "reader",
) -> subprocess.CompletedProcess[str]:
    """What `subprocess.run([python, "-c", code, *args], cwd=cwd, env=environ)` runs (`cwd`
    first on sys.path, `environ` the whole environment, set before `code` runs), in a
    process forked from a server that imported `datasets` and hfbuild once and never runs
    project code (tests/forkserver.py): a process of its own that has run no user code,
    without Python's and `datasets`' start-up (~1 s of CPU). Never for a claim about a
    process's start: the children share the server's hash seed, and what `datasets`,
    huggingface_hub and hfbuild read from the environment on import is the server's own
    (offline, its own HOME, so not the test's Hub cache: not for a project with a Hub stage;
    fsspec's `FSSPEC_*` settings, so not for code reaching the s3 fixture's server through
    fsspec; the observation hook installed: `HFBUILD_OBSERVE=0` needs a fresh process). Only what
    the code printed through `sys.stdout` is its stdout; its stderr and what its children
    wrote to the descriptors are the log (`stderr`). Fails the test on an error, with both.

    `server` names one of this process's servers, each started on first use with a hash
    seed of its own (drawn at random, never another server's): a driver forked from one and
    a worker recomputing its keys from another differ in their seeds as fresh processes do."""
    if server not in _servers:
        home = pathlib.Path(tempfile.mkdtemp(prefix=f"hfbuild-{server}-"))
        outside = {k: v for k, v in os.environ.items() if not k.startswith(("HFBUILD_", "HF_"))}
        taken = {seed for _, _, seed in _servers.values()}
        seed = 0
        while seed == 0 or seed in taken:
            seed = random.SystemRandom().randrange(2**32)
        server_env = {**outside, **offline_env(home), "PYTHONHASHSEED": str(seed)}
        _servers[server] = (Server(server_env, plain=False), home, seed)
        atexit.register(_servers[server][0].close)
    proc, home, seed = _servers[server]
    out = home / f"read-{next(_outs)}.pkl"
    rc, printed = proc.run(
        "script",
        pathlib.Path(cwd),
        out,
        env=dict(environ),
        environ=True,
        arg={"code": textwrap.dedent(code), "argv": [str(a) for a in args or ()]},
    )
    log = proc.log(out)
    out.unlink(missing_ok=True)
    pathlib.Path(f"{out}.log").unlink(missing_ok=True)
    if rc != 0:
        raise AssertionError(f"python (forked, hash seed {seed}) failed ({rc}):\n{printed}\n{log}")
    return subprocess.CompletedProcess(["<forked>"], rc, str(printed or ""), log)


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
