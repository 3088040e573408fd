"""Long pipelines, a large cold build and the demo's no-op, each against its anchor (issue #10).

Run: `.venv/bin/python bench/scale_build.py [--rows N] [--repeat K] [--clock wall|cpu]`, or
through bench/bench_scale.py (`run(tmpdir)`). `--clock cpu` reports the child processes' user +
system time instead of elapsed time, a check on a run made on a busy machine.

Each figure is the median of K fresh processes, its anchor measured in the same run with runs
interleaved (anchor, hfbuild, anchor, hfbuild, ...), so machine noise
hits both alike. Figures:

- no-op `doit run preprocess` of a 200-stage pipeline (and of a 100-stage one, to show the
  cost per stage) against doit alone running the same task graph, every task up to date.
  Target: <= 0.25 s, and <= 0.5 ms per extra stage.
- cold build of load -> batched map -> filter over 1,000,000 rows against a plain `datasets`
  script with a fresh cache_dir. Target: <= 1.10x; and the store's bytes against the plain
  script's cache bytes, <= 1.10x.
- no-op of the demo (5 stages) against its floor `python -c 'import doit, dodo'`.
  Target: <= 1.10x. Beside it, doit alone running the same five task names (all up to date)
  over the same loaded pipeline against the same floor: the part of the ratio that is doit's.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable

PY = sys.executable
BIN = pathlib.Path(PY).parent
REPO = pathlib.Path(__file__).resolve().parent.parent

Figure = tuple[str, float, str, float]

STAGE_TRANSFORMS = """
def plus(batch, k):
    return {"x": [v + k for v in batch["x"]]}
"""

STAGES_DODO = """
from hfbuild import Pipeline
import transforms as t

pipe = Pipeline()
prev = pipe.load("s000", "json", data_files="data/tiny.jsonl", split="train")
for i in range(1, {n}):
    prev = pipe.map(f"s{{i:03d}}", prev, t.plus, {{"k": i}}, batched=True)


def task_preprocess():
    yield from pipe.tasks()
"""

# doit alone: the same task graph (names, task_dep chain, one python action each), kept up to
# date by doit's own database through a file_dep on the transforms' module.
DOIT_DODO = """
def _noop():
    return None


def task_preprocess():
    yield {{"name": None}}
    for i in range({n}):
        yield {{
            "name": f"s{{i:03d}}",
            "actions": [_noop],
            "file_dep": ["transforms.py"],
            "task_dep": [f"preprocess:s{{i - 1:03d}}"] if i else [],
            "verbosity": 2,
        }}
"""

BIG_TRANSFORMS = """
def normalize(batch):
    return {"text": [t.lower().strip() for t in batch["text"]]}


def long_enough(batch, min_chars):
    return [len(t) >= min_chars for t in batch["text"]]
"""

BIG_DODO = """
from hfbuild import Pipeline
import transforms as t

pipe = Pipeline()
raw = pipe.load("raw", "parquet", data_files="data/corpus.parquet", split="train")
norm = pipe.map("norm", raw, t.normalize, batched=True)
kept = pipe.filter("kept", norm, t.long_enough, {"min_chars": 60}, batched=True)


def task_preprocess():
    yield from pipe.tasks()
"""

BIG_PLAIN = """
import sys
import datasets
import transforms as t

ds = datasets.load_dataset("parquet", data_files="data/corpus.parquet", split="train",
                           cache_dir=sys.argv[1])
ds = ds.map(t.normalize, batched=True)
ds = ds.filter(t.long_enough, fn_kwargs={"min_chars": 60}, batched=True)
print(len(ds))
"""


def _env(work: pathlib.Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_CACHE": str(work / "hf-default-cache"),
        "HFBUILD_NO_REMOTE": "1",
        # The work dir first; a PYTHONPATH given to the benchmark stays after it.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(work), os.environ.get("PYTHONPATH")])),
        "GIT_AUTHOR_NAME": "b",
        "GIT_AUTHOR_EMAIL": "b@b",
        "GIT_COMMITTER_NAME": "b",
        "GIT_COMMITTER_EMAIL": "b@b",
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }


# "wall": elapsed time (the figures the targets are stated in). "cpu": user + system time of
# the child process, far less sensitive to other load on a shared machine; use it to check a
# noisy wall-clock run.
CLOCK = {"kind": "wall"}


def _run(cmd: list[str], cwd: pathlib.Path, env: dict[str, str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{out.stdout}\n{out.stderr}")
    if CLOCK["kind"] == "cpu":
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dt


def _git_repo(work: pathlib.Path, files: dict[str, str], env: dict[str, str]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        p = work / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    (work / ".gitignore").write_text(".hfbuild/\n.doit.db*\nplain-cache*/\nhf-default-cache/\n")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)


def _interleaved(
    repeat: int, anchor: Callable[[], float], ours: Callable[[], float]
) -> tuple[float, float]:
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeat):
        a.append(anchor())
        b.append(ours())
    return statistics.median(b), statistics.median(a)


def _tree_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def stages_noop(tmp: pathlib.Path, n: int, repeat: int) -> Figure:
    """`doit run preprocess` with n up-to-date stages vs doit alone with n up-to-date tasks."""
    ours = tmp / f"stages{n}"
    env = _env(ours)
    _git_repo(
        ours,
        {
            "transforms.py": STAGE_TRANSFORMS,
            "dodo.py": STAGES_DODO.format(n=n),
            "data/tiny.jsonl": "".join(f'{{"x": {i}}}\n' for i in range(10)),
        },
        env,
    )
    alone = tmp / f"doit{n}"
    _git_repo(alone, {"transforms.py": STAGE_TRANSFORMS, "dodo.py": DOIT_DODO.format(n=n)}, env)
    cmd = [str(BIN / "doit"), "run", "preprocess"]
    _run(cmd, ours, env)  # the cold build
    _run(cmd, alone, _env(alone))
    _run(cmd, ours, env)  # a first no-op settles the stat caches
    mine, anchor = _interleaved(
        repeat, lambda: _run(cmd, alone, _env(alone)), lambda: _run(cmd, ours, env)
    )
    return (f"no-op, {n}-stage pipeline (s)", mine, f"doit alone, {n} tasks up to date", anchor)


def make_corpus(path: pathlib.Path, rows: int) -> None:
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    words = [
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
    ]
    words += [
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
    text = [
        " ".join(rng.choice(words) for _ in range(rng.randint(1, 30))).title() for _ in range(rows)
    ]
    pq.write_table(pa.table({"id": list(range(rows)), "text": text}), path)


def cold_build(tmp: pathlib.Path, rows: int, repeat: int) -> list[Figure]:
    """load -> batched map -> filter over `rows` rows: hfbuild from an empty store vs a plain
    datasets script with a fresh cache_dir; then the bytes each leaves behind."""
    work = tmp / "big"
    env = _env(work)
    _git_repo(
        work,
        {"transforms.py": BIG_TRANSFORMS, "dodo.py": BIG_DODO, "plain.py": BIG_PLAIN},
        env,
    )
    (work / "data").mkdir(exist_ok=True)
    make_corpus(work / "data" / "corpus.parquet", rows)
    subprocess.run(["git", "add", "-A"], cwd=work, env=env, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "data"], cwd=work, env=env, check=True)
    store = work / ".hfbuild"
    doit_cmd = [str(BIN / "doit"), "run", "preprocess"]
    counter = iter(range(10**6))

    def plain() -> float:
        cache = work / f"plain-cache-{next(counter)}"
        dt = _run([PY, "plain.py", str(cache)], work, env)
        plain_bytes.append(_tree_bytes(cache))
        shutil.rmtree(cache, ignore_errors=True)
        return dt

    def ours() -> float:
        shutil.rmtree(store, ignore_errors=True)
        for p in work.glob(".doit.db*"):
            p.unlink()
        dt = _run(doit_cmd, work, env)
        store_bytes.append(_tree_bytes(store / "objects"))
        return dt

    plain_bytes: list[int] = []
    store_bytes: list[int] = []
    mine, anchor = _interleaved(repeat, plain, ours)
    mb = 1e6
    return [
        (
            f"cold build, {rows:,} rows, load -> map -> filter (s)",
            mine,
            "plain datasets script, fresh cache_dir",
            anchor,
        ),
        (
            "store bytes for that build (MB)",
            statistics.median(store_bytes) / mb,
            "plain datasets cache (MB)",
            statistics.median(plain_bytes) / mb,
        ),
    ]


# doit itself on the demo: the user's pipeline loaded, then the same five task names, each
# up to date by `uptodate: [True]`. What doit's own run machinery (plugins, task loading, its
# database, the reporter) adds to `import doit, dodo`, with no hfbuild work in the tasks.
DEMO_DOIT_ALONE = """
import dodo  # noqa: F401


def _noop():
    return None


def task_preprocess():
    for name in ("raw", "paragraphs", "tokens", "kept", "split"):
        yield {"name": name, "actions": [_noop], "uptodate": [True], "verbosity": 2}
"""


def demo_noop(tmp: pathlib.Path, repeat: int) -> list[Figure]:
    """The demo's no-op `doit run preprocess` vs `python -c 'import doit, dodo'`, and vs doit
    running the same task names, all up to date, over the same loaded pipeline."""
    work = tmp / "demo"
    env = _env(work)
    work.mkdir()
    for rel in ("dodo.py", "demo", "data"):
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, work / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, work / rel)
    (work / ".gitignore").write_text(".hfbuild/\n.doit.db*\nhf-default-cache/\n")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "demo"]):
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    (work / "doit_alone.py").write_text(DEMO_DOIT_ALONE)
    doit_cmd = [str(BIN / "doit"), "run", "preprocess"]
    floor_cmd = [PY, "-c", "import doit, dodo"]
    alone_cmd = [str(BIN / "doit"), "-f", "doit_alone.py", "run", "preprocess"]
    _run(doit_cmd, work, env)
    _run(doit_cmd, work, env)
    _run(alone_cmd, work, env)
    mine, anchor = _interleaved(
        repeat, lambda: _run(floor_cmd, work, env), lambda: _run(doit_cmd, work, env)
    )
    alone, anchor2 = _interleaved(
        repeat, lambda: _run(floor_cmd, work, env), lambda: _run(alone_cmd, work, env)
    )
    return [
        ("no-op of the demo, 5 stages (s)", mine, "python -c 'import doit, dodo'", anchor),
        ("doit alone on the demo, 5 tasks up to date (s)", alone, "the same floor", anchor2),
    ]


def run(
    tmpdir: str, *, rows: int = 1_000_000, repeat: int = 5, clock: str = "wall"
) -> list[Figure]:
    """Every figure of this benchmark, built under `tmpdir`; times are `clock` seconds."""
    CLOCK["kind"] = clock
    tmp = pathlib.Path(tmpdir)
    out = [stages_noop(tmp, 200, repeat), stages_noop(tmp, 100, repeat)]
    out += demo_noop(tmp, repeat)
    out += cold_build(tmp, rows, repeat)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="hfbuild-scale-build-")
    try:
        figures = run(tmp, rows=args.rows, repeat=args.repeat, clock=args.clock)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"medians of {args.repeat} fresh processes, anchors interleaved, {args.clock} time")
    for fig, value, anchor, anchor_value in figures:
        print(
            f"{fig:<55} {value:9.3f}   {anchor:<42} {anchor_value:9.3f}   "
            f"ratio {value / anchor_value:5.2f}"
        )
    by = {f[0]: f for f in figures}
    n200 = by.get("no-op, 200-stage pipeline (s)")
    n100 = by.get("no-op, 100-stage pipeline (s)")
    if n200 and n100:
        per = (n200[1] - n100[1]) / 100 * 1000
        base = (n200[3] - n100[3]) / 100 * 1000
        print(
            f"{'cost per extra stage (ms)':<55} {per:9.3f}   {'doit alone, per task':<42} "
            f"{base:9.3f}"
        )


if __name__ == "__main__":
    main()
