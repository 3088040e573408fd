"""Early cutoff (issue #19): a comment in the first stage's module of a 5-stage pipeline.

Run: `.venv/bin/python bench/bench_cutoff.py [--rows N] [--repeat K]`. In a temporary git
repository (load -> clean -> keep -> tok -> stats, each transform in a module of its own,
every stage a real `datasets` map or filter over N rows), built once; then K rounds, each
committing a new comment in clean's module and timing, in fresh processes:

- the first stage's own build: `doit run preprocess:clean` (clean alone is stale);
- the rebuild: another comment, then `doit run preprocess` (clean is rebuilt, and the
  three stages after it, whose input gave identical data, must be cut off).

Prints the medians of both and their ratio. Target (issue #19): the rebuild at most 1.2x
the first stage's own build (before early cutoff it rebuilt the whole chain). It also checks
that the rebuild ran clean's function only (a call log), so the figure is of a cutoff.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

PY = sys.executable

MODULES = {
    "clean": """
        import os

        def clean(batch):
            with open(os.environ["CALL_LOG"], "a") as f:
                f.write("clean\\n")
            return {"text": [t.strip().lower() for t in batch["text"]]}
        """,
    "keep": """
        import os

        def keep(batch):
            with open(os.environ["CALL_LOG"], "a") as f:
                f.write("keep\\n")
            return [len(t) > 12 for t in batch["text"]]
        """,
    "tok": """
        import os

        def tok(batch):
            with open(os.environ["CALL_LOG"], "a") as f:
                f.write("tok\\n")
            return {"words": [t.split() for t in batch["text"]]}
        """,
    "stats": """
        import os

        def stats(batch):
            with open(os.environ["CALL_LOG"], "a") as f:
                f.write("stats\\n")
            return {"n": [len(w) for w in batch["words"]]}
        """,
}

DODO = """
from hfbuild import Pipeline
from steps import clean, keep, stats, tok

pipe = Pipeline()
raw = pipe.load("raw", "parquet", data_files="data/corpus.parquet", split="train")
c = pipe.map("clean", raw, clean.clean, batched=True)
k = pipe.filter("keep", c, keep.keep, batched=True)
t = pipe.map("tok", k, tok.tok, batched=True)
s = pipe.map("stats", t, stats.stats, batched=True)


def task_preprocess():
    yield from pipe.tasks()
"""


def git(repo: pathlib.Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def doit(repo: pathlib.Path, env: dict[str, str], *args: str) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(
        [PY, "-m", "doit", "run", *args], cwd=repo, env=env, capture_output=True, text=True
    )
    took = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"doit run {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return took


def calls(log: pathlib.Path) -> list[str]:
    found = sorted(set(log.read_text().split())) if log.exists() else []
    log.unlink(missing_ok=True)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-cutoff-"))
    try:
        repo = work / "repo"
        (repo / "steps").mkdir(parents=True)
        (repo / "data").mkdir()
        git(repo, "init", "-q", "-b", "main")
        git(repo, "config", "user.email", "bench@example.com")
        git(repo, "config", "user.name", "bench")
        (repo / "steps" / "__init__.py").write_text("")
        for name, text in MODULES.items():
            (repo / "steps" / f"{name}.py").write_text(textwrap.dedent(text))
        (repo / "dodo.py").write_text(DODO)
        (repo / "pyproject.toml").write_text('[tool.hfbuild]\nuntracked-env = ["CALL_LOG"]\n')
        (repo / ".gitignore").write_text(".hfbuild/\n.doit.db*\n")
        texts = [
            f"  Row {i} Of The Corpus, With {'Some Words ' * (i % 9)} " for i in range(args.rows)
        ]
        pq.write_table(pa.table({"text": texts}), repo / "data" / "corpus.parquet")
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "project")
        log = work / "calls"
        env = {**os.environ, "CALL_LOG": str(log), "HF_DATASETS_OFFLINE": "1"}
        cold = doit(repo, env, "preprocess")
        calls(log)
        module = repo / "steps" / "clean.py"
        own: list[float] = []
        rebuild: list[float] = []
        n = 0

        def comment() -> None:
            nonlocal n
            n += 1
            module.write_text(f"# comment {n}\n" + module.read_text())
            git(repo, "commit", "-q", "-am", f"comment {n}")

        for _ in range(args.repeat):
            comment()
            own.append(doit(repo, env, "preprocess:clean"))
            assert calls(log) == ["clean"]
            comment()
            rebuild.append(doit(repo, env, "preprocess"))
            ran = calls(log)
            if ran != ["clean"]:
                raise SystemExit(f"the rebuild ran {ran}, not clean alone: no cutoff")
        a, b = statistics.median(own), statistics.median(rebuild)
        print(f"rows: {args.rows:,}; cold build of the 5 stages: {cold:.2f} s")
        print(f"first stage's own build (doit run preprocess:clean): {a:.2f} s")
        print(f"rebuild after a comment (doit run preprocess):       {b:.2f} s")
        print(f"(medians of {len(own)} rounds each)")
        print(f"ratio: {b / a:.3f}  (target <= 1.2)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
