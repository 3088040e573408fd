"""Issue #10's big-repo shape: 20,000 files, 20 stages whose closures hold ~200 modules each.

Run: `.venv/bin/python bench/scale_repo.py` (or through bench/bench_scale.py). It builds, in a
temporary directory, a committed git repository of 20,000 files: ~19,400 data files, a shared
library package `lib/` of 180 modules importing each other as a binary tree (and a few stdlib
modules each), and 20 stage packages `stages/s<k>/` of 20 modules each, chained, the last one
importing the shared tree, so each stage's closure holds ~200 files. `dodo.py` defines a load
stage and 20 map stages, one per stage package. After one cold build, it measures (medians of
5 fresh processes, each anchor interleaved with its figure in the same loop):

- no-op `doit run preprocess`, against `python -c 'import doit, dodo'` (target ≤ 0.30 s and
  ≤ 1.25x that anchor);
- doit alone running the same 21 task names, all up to date (`uptodate: [True]`), over the
  same loaded pipeline, against the same anchor: the part of the no-op that is doit's own
  (plugin discovery through every installed distribution's entry points, its database);
- `hfbuild status`, against `python -c 'import dodo'` (target ≤ 0.30 s);
- the first `hfbuild.fingerprint` of a stage function with a 200-file closure in a fresh
  process, against importing those 200 modules (target ≤ 60 ms).

A second no-op runs before measuring, so the store's code cache holds what a no-op reads (the
cold build's files are younger than the 2 s racy window, so it cannot record them all).

`run(tmpdir, clock=...)` returns (figure, seconds, anchor, anchor seconds) tuples; `__main__`
prints them. `--clock cpu` reports the child processes' user + system time instead of elapsed
time (a check on a run made on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

PY = sys.executable
BIN = pathlib.Path(PY).parent
TOTAL_FILES = 20_000
SHARED = 180  # modules in the shared chain
STAGES = 20
PER_STAGE = 20  # modules per stage package
REPEAT = 5

_STDLIB_IMPORTS = [
    "import os",
    "import re",
    "import json",
    "import collections",
    "from typing import Any",
    "import functools",
    "import itertools",
    "from dataclasses import dataclass",
]


def _lib_module(i: int) -> str:
    head = "\n".join(_STDLIB_IMPORTS[j % len(_STDLIB_IMPORTS)] for j in (i, i + 3, i + 5))
    # A binary tree of imports (depth ~8): a chain of 180 would exceed the recursion limit.
    nxt = "".join(f"from lib import m{j:03d}\n" for j in (2 * i + 1, 2 * i + 2) if j < SHARED)
    return (
        f"{head}\n{nxt}\n\nCONST_{i} = {i}\n\n\n"
        f"def f{i}(x: int) -> int:\n    return x + CONST_{i}\n"
    )


def _stage_module(k: int, i: int) -> str:
    nxt = f"from . import m{i + 1:02d}\n" if i + 1 < PER_STAGE else "from lib import m000\n"
    return f"import re\nimport json\n{nxt}\n\ndef g{i}(x: int) -> int:\n    return x * {k + 1}\n"


def _stage_init(k: int) -> str:
    return (
        "from . import m00\n\n\n"
        "def transform(batch):\n"
        f'    return {{"v{k}": [len(t) + {k} for t in batch["text"]]}}\n'
    )


DODO = """
from hfbuild import Pipeline
{imports}

pipe = Pipeline()
raw = pipe.load("raw", "json", data_files="rows.jsonl", split="train")
{stages}


def task_preprocess():
    yield from pipe.tasks()
"""


def make_repo(root: pathlib.Path, per_dir: int = 500) -> None:
    """The 20,000-file committed repository described in the module docstring; its data
    files `per_dir` to a directory (`bench_observe.py` takes 10: ~2,000 directories)."""
    root.mkdir(parents=True)
    files: dict[str, str] = {"lib/__init__.py": ""}
    for i in range(SHARED):
        files[f"lib/m{i:03d}.py"] = _lib_module(i)
    files["stages/__init__.py"] = ""
    for k in range(STAGES):
        files[f"stages/s{k:02d}/__init__.py"] = _stage_init(k)
        for i in range(PER_STAGE):
            files[f"stages/s{k:02d}/m{i:02d}.py"] = _stage_module(k, i)
    imports = "\n".join(f"from stages import s{k:02d}" for k in range(STAGES))
    stages = "\n".join(
        f'pipe.map("st{k:02d}", raw, s{k:02d}.transform, batched=True)' for k in range(STAGES)
    )
    files["dodo.py"] = DODO.format(imports=imports, stages=stages)
    files["rows.jsonl"] = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20))
    files[".gitignore"] = ".hfbuild/\n.doit.db*\n__pycache__/\n"
    n_data = TOTAL_FILES - len(files)
    for i in range(n_data):
        files[f"assets/d{i // per_dir:02d}/f{i:05d}.txt"] = f"asset {i}\n"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    env = _env(root)
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "scale repo"],
    ):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)


def _env(root: pathlib.Path) -> dict[str, str]:
    # Bytecode caching as users have it (PYTHONDONTWRITEBYTECODE would recompile all modules).
    inherited = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {
        **inherited,
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.com",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.com",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(root.parent / "hf-home"),
        "PYTHONPATH": str(root),
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "HFBUILD_NO_REMOTE": "1",
    }


# "wall": elapsed time (the figures the targets are stated in); "cpu": user + system time of
# the child process.
CLOCK = {"kind": "wall"}


def _timed(cmd: list[str], root: pathlib.Path, env: dict[str, str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    if CLOCK["kind"] == "cpu":
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed


# doit itself on the same pipeline: dodo.py loaded, then the same task names, each up to date.
DOIT_ALONE = """
import dodo


def _noop():
    return None


def task_preprocess():
    for spec in dodo.pipe.specs:
        yield {"name": spec.name, "actions": [_noop], "uptodate": [True], "verbosity": 2}
"""


FINGERPRINT = """
import sys, time, warnings
t0 = time.perf_counter()
from stages import s00
t1 = time.perf_counter()
import hfbuild
t2 = time.perf_counter()
hfbuild.fingerprint(s00.transform, {}, parent="0" * 32, options={"batched": True})
t3 = time.perf_counter()
print(t1 - t0, t3 - t2)
"""


def run(
    tmpdir: str | os.PathLike[str], *, clock: str = "wall"
) -> list[tuple[str, float, str, float]]:
    """Build the repository under `tmpdir`, build its pipeline once, and measure."""
    CLOCK["kind"] = clock
    root = pathlib.Path(tmpdir) / "scale"
    make_repo(root)
    (root / "doit_alone.py").write_text(DOIT_ALONE)
    env = _env(root)
    doit = [str(BIN / "doit"), "run", "preprocess"]
    alone_cmd = [str(BIN / "doit"), "-f", "doit_alone.py", "run", "preprocess"]
    subprocess.run(doit, cwd=root, env=env, check=True, capture_output=True)
    time.sleep(2.1)  # past the racy window: the next no-op records what later ones reuse
    subprocess.run(doit, cwd=root, env=env, check=True, capture_output=True)
    subprocess.run(alone_cmd, cwd=root, env=env, check=True, capture_output=True)
    status = [str(BIN / "hfbuild"), "status"]
    noop, anchor_noop, alone, st, anchor_st, fp, anchor_fp = ([] for _ in range(7))
    for _ in range(REPEAT):
        anchor_noop.append(_timed([PY, "-c", "import doit, dodo"], root, env))
        noop.append(_timed(doit, root, env))
        alone.append(_timed(alone_cmd, root, env))
        anchor_st.append(_timed([PY, "-c", "import dodo"], root, env))
        st.append(_timed(status, root, env))
        out = subprocess.run(
            [PY, "-c", FINGERPRINT], cwd=root, env=env, capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"fingerprint failed:\n{out.stderr}")
        imp, call = (float(x) for x in out.stdout.split())
        anchor_fp.append(imp)
        fp.append(call)
    med = statistics.median
    return [
        ("no-op doit run preprocess (20k files)", med(noop), "import doit, dodo", med(anchor_noop)),
        ("doit alone, same 21 tasks up to date", med(alone), "import doit, dodo", med(anchor_noop)),
        ("hfbuild status (20k files)", med(st), "import dodo", med(anchor_st)),
        ("first fingerprint, 200-file closure", med(fp), "import 200 modules", med(anchor_fp)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hfbuild-scale-") as tmp:
        for name, secs, anchor, anchor_secs in run(tmp, clock=args.clock):
            print(
                f"{name:40s} {secs * 1e3:8.1f} ms   {anchor:20s} {anchor_secs * 1e3:8.1f} ms"
                f"   ratio {secs / anchor_secs:5.2f}"
            )


if __name__ == "__main__":
    sys.exit(main())
