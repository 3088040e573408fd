"""A 5-stage pipeline three ways: hfbuild under doit, DVC, and a plain datasets script.

Run: `make bench`, or `.venv/bin/python bench/bench_pipeline.py [--rows N] [--repeat K]` after
`pip install -e '.[bench]'` (DVC is the anchor). Everything runs in one go, in a temporary git
repository, each tool in its own fresh processes, and prints:

- the no-op time (nothing changed; median of K runs) of `doit run preprocess`, `dvc repro`
  and the plain script rerunning its map chain from datasets' cache. Target (issue #3): hfbuild
  at most 0.5x DVC.
- the cold build time of hfbuild and of the plain script. Target: hfbuild at most 1.10x.
- bytes written by each cold build against the bytes of its final results (write
  amplification).
"""

from __future__ import annotations

import argparse
import json
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
BIN = pathlib.Path(PY).parent

TRANSFORMS = """
import re

_WORD = re.compile(r"[a-z]+")


def normalize(batch):
    return {"text": [t.lower().strip() for t in batch["text"]]}


def count_words(batch):
    return {"n_words": [len(_WORD.findall(t)) for t in batch["text"]]}


def long_enough(batch, min_words):
    return [n >= min_words for n in batch["n_words"]]


def char_stats(batch):
    return {"n_chars": [len(t) for t in batch["text"]],
            "n_vowels": [sum(t.count(v) for v in "aeiou") for t in batch["text"]]}
"""

DODO = """
from hfbuild import Pipeline
import transforms as t

pipe = Pipeline()
raw = pipe.load("raw", "parquet", data_files="data/corpus.parquet", split="train")
norm = pipe.map("norm", raw, t.normalize, batched=True)
words = pipe.map("words", norm, t.count_words, batched=True)
kept = pipe.filter("kept", words, t.long_enough, {"min_words": 4}, batched=True)
stats = pipe.map("stats", kept, t.char_stats, batched=True)


def task_preprocess():
    yield from pipe.tasks()
"""

PLAIN = """
import sys
import datasets
import transforms as t

ds = datasets.load_dataset("parquet", data_files="data/corpus.parquet", split="train",
                           cache_dir=sys.argv[1])
ds = ds.map(t.normalize, batched=True)
ds = ds.map(t.count_words, batched=True)
ds = ds.filter(t.long_enough, fn_kwargs={"min_words": 4}, batched=True)
ds = ds.map(t.char_stats, batched=True)
print(len(ds))
"""

DVC_STAGE = """
import sys
import datasets
import transforms as t

name = sys.argv[1]
if name == "raw":
    ds = datasets.load_dataset("parquet", data_files="data/corpus.parquet", split="train",
                               cache_dir="dvc-hf-cache")
else:
    ds = datasets.load_from_disk(f"out/{sys.argv[2]}")
    if name == "norm":
        ds = ds.map(t.normalize, batched=True)
    elif name == "words":
        ds = ds.map(t.count_words, batched=True)
    elif name == "kept":
        ds = ds.filter(t.long_enough, fn_kwargs={"min_words": 4}, batched=True)
    elif name == "stats":
        ds = ds.map(t.char_stats, batched=True)
ds.save_to_disk(f"out/{name}")
"""


def dvc_yaml() -> str:
    chain = [
        ("raw", None),
        ("norm", "raw"),
        ("words", "norm"),
        ("kept", "words"),
        ("stats", "kept"),
    ]
    lines = ["stages:"]
    for name, prev in chain:
        deps = ["stage.py", "transforms.py"] + (
            ["data/corpus.parquet"] if prev is None else [f"out/{prev}"]
        )
        lines += [f"  {name}:", f"    cmd: {PY} stage.py {name} {prev or ''}", "    deps:"]
        lines += [f"      - {d}" for d in deps]
        lines += ["    outs:", f"      - out/{name}"]
    return "\n".join(lines) + "\n"


def make_corpus(path: pathlib.Path, rows: int) -> None:
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    words = [
        w
        for w in [
            "the",
            "quick",
            "brown",
            "fox",
            "jumps",
            "over",
            "a",
            "lazy",
            "dog",
            "while",
            "seven",
            "wizards",
            "quietly",
            "hex",
            "jumbo",
            "vexing",
            "pixies",
            "and",
            "sphinx",
            "of",
            "black",
            "quartz",
            "judge",
            "my",
            "vow",
        ]
    ]
    text = [
        " ".join(rng.choice(words) for _ in range(rng.randint(1, 30))).title() for _ in range(rows)
    ]
    pq.write_table(pa.table({"id": list(range(rows)), "text": text}), path)


def run(cmd: list[str], cwd: pathlib.Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return dt


def tree_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    if shutil.which("dvc", path=str(BIN)) is None:
        raise SystemExit("DVC is the anchor: pip install -e '.[bench]' first (make bench does)")

    work = pathlib.Path(tempfile.mkdtemp(prefix="hfbuild-bench-"))
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": str(work),
        "HF_DATASETS_CACHE": str(work / "hf-default-cache"),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "b",
        "GIT_AUTHOR_EMAIL": "b@b",
        "GIT_COMMITTER_NAME": "b",
        "GIT_COMMITTER_EMAIL": "b@b",
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    try:
        (work / "data").mkdir()
        make_corpus(work / "data" / "corpus.parquet", args.rows)
        (work / "transforms.py").write_text(textwrap.dedent(TRANSFORMS))
        (work / "dodo.py").write_text(textwrap.dedent(DODO))
        (work / "plain.py").write_text(textwrap.dedent(PLAIN))
        (work / "stage.py").write_text(textwrap.dedent(DVC_STAGE))
        (work / "dvc.yaml").write_text(dvc_yaml())
        (work / ".gitignore").write_text(
            ".hfbuild/\n.doit.db*\nout/\nplain-cache/\ndvc-hf-cache/\nhf-default-cache/\n"
        )
        for cmd in (
            ["git", "init", "-q"],
            ["git", "add", "-A"],
            ["git", "commit", "-qm", "bench"],
            ["dvc", "init", "-q"],
            ["dvc", "config", "core.autostage", "false"],
        ):
            subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
        subprocess.run(
            ["git", "commit", "-qam", "dvc"], cwd=work, env=env, check=False, capture_output=True
        )

        doit_cmd = [str(BIN / "doit"), "run", "preprocess"]
        plain_cmd = [PY, "plain.py", str(work / "plain-cache")]
        dvc_cmd = [str(BIN / "dvc"), "repro", "-q"]

        cold = {
            "hfbuild": run(doit_cmd, work, env),
            "plain": run(plain_cmd, work, env),
            "dvc": run(dvc_cmd, work, env),
        }
        noop = {}
        for name, cmd in (("hfbuild", doit_cmd), ("dvc", dvc_cmd), ("plain", plain_cmd)):
            noop[name] = statistics.median(run(cmd, work, env) for _ in range(args.repeat))

        objects = work / ".hfbuild" / "objects"
        manifests = [json.loads(p.read_text()) for p in objects.rglob("manifest.json")]
        written = sum(m.get("written_bytes", 0) for m in manifests)
        results = sum(sum(m["files"].values()) for m in manifests)
        plain_bytes = tree_bytes(work / "plain-cache")
        dvc_bytes = tree_bytes(work / "out") + tree_bytes(work / "dvc-hf-cache")

        print(f"5-stage pipeline, {args.rows:,} rows, median of {args.repeat} no-op runs")
        print(f"no-op   hfbuild (doit run)   {noop['hfbuild']:7.3f} s")
        print(f"no-op   dvc repro            {noop['dvc']:7.3f} s")
        print(f"no-op   plain datasets       {noop['plain']:7.3f} s")
        print(
            f"ratio   hfbuild / dvc        {noop['hfbuild'] / noop['dvc']:7.3f}   (target <= 0.5)"
        )
        print(f"ratio   hfbuild / plain      {noop['hfbuild'] / noop['plain']:7.3f}")
        print(f"cold    hfbuild              {cold['hfbuild']:7.3f} s")
        print(f"cold    plain datasets       {cold['plain']:7.3f} s")
        print(f"cold    dvc repro            {cold['dvc']:7.3f} s")
        print(
            f"ratio   hfbuild / plain cold {cold['hfbuild'] / cold['plain']:7.3f}   "
            f"(target <= 1.10)"
        )
        print(
            f"bytes   hfbuild wrote {written:,} for {results:,} of results "
            f"(amplification {written / max(results, 1):.2f}x)"
        )
        print(f"bytes   plain datasets cache {plain_bytes:,}; dvc outs + cache {dvc_bytes:,}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
