"""The cost of run-time observation (issues #9 and #18): builds with the audit hook and, on
Linux, the inotify watch of the project's directories (`watch.py`), against the same builds
without either (HFBUILD_OBSERVE=0, a switch only this benchmark uses).

Run: `.venv/bin/python bench/bench_observe.py [--rows N] [--repeat K] [--noop-repeat M]`
(`--rows 0` leaves out the map chain).
Everything runs in temporary git repositories, each build in a fresh `doit` process with an
empty store, after one uncounted build (bytecode written); the two settings alternate so that
drift on a shared machine hits both. Times
are CPU times (user + system of `doit` and its worker processes), not wall time, so that
other processes on a shared machine do not decide the ratio. Prints:

- cold build of the demo pipeline (this repository's dodo.py, demo/ and data/), median of K,
  with and without observation, and the ratio. Target: <= 1.05.
- cold build of the 5-stage map chain of bench_pipeline.py on N rows (default 300,000).
  Target: <= 1.05.
- cold build of bench/scale_repo.py's 20,000-file repository (a load and 20 map stages) with
  its data files 10 to a directory: inotify watches ~2,000 directories. Target: <= 1.05.
  And, in this process, what making that watch costs (walking the tree, one watch per
  directory, the reader thread): once per process, at its first build.
- a no-op `doit run` of the demo, median of M, with and without observation: the difference
  is what the audit hook costs when nothing is built (inotify watches nothing then). Target
  (issue #18): <= +2 ms.
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

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
BIN = pathlib.Path(sys.executable).parent
sys.path.insert(0, str(HERE))

import bench_pipeline  # noqa: E402 - the same chain and corpus as the pipeline benchmark
import scale_repo  # noqa: E402 - the 20,000-file repository


def git_init(path: pathlib.Path, env: dict[str, str]) -> None:
    (path / ".gitignore").write_text(".hfbuild*/\n.doit.db*\n__pycache__/\n")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=path, env=env, check=True, capture_output=True)


def doit(path: pathlib.Path, env: dict[str, str]) -> float:
    """The CPU time (user + system, the process and its workers) of one `doit run`: on a
    shared machine, wall time measures the neighbours as much as the build."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [str(BIN / "doit"), "run", "preprocess"],
        cwd=path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    dt = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if out.returncode != 0:
        raise SystemExit(f"doit failed in {path}:\n{out.stdout}\n{out.stderr}")
    return dt


def cold(path: pathlib.Path, env: dict[str, str], repeat: int) -> dict[str, float]:
    """Median cold build time with observation on and off, alternating, fresh store each
    (outside the project, as a store may be), after one build that is not counted: the first
    build in a fresh repository also writes every module's bytecode (`__pycache__`), which
    would fall on whichever setting runs first."""
    warm = path.parent / f"{path.name}-store-warm"
    doit(path, {**env, "HFBUILD_STORE": str(warm), "HFBUILD_OBSERVE": "0"})
    shutil.rmtree(warm, ignore_errors=True)
    (path / "hfbuild.lock").unlink(missing_ok=True)
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(repeat):
        for mode in ("off", "on") if i % 2 else ("on", "off"):
            store = path.parent / f"{path.name}-store-{mode}-{i}"
            run_env = {
                **env,
                "HFBUILD_STORE": str(store),
                "HFBUILD_OBSERVE": "1" if mode == "on" else "0",
            }
            (path / "hfbuild.lock").unlink(missing_ok=True)
            times[mode].append(doit(path, run_env))
            shutil.rmtree(store, ignore_errors=True)
    return {k: statistics.median(v) for k, v in times.items()}


def noop(path: pathlib.Path, env: dict[str, str], repeat: int) -> dict[str, float]:
    store = path / ".hfbuild-noop"
    base = {**env, "HFBUILD_STORE": str(store)}
    doit(path, base)  # build once
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(repeat):
        for mode in ("off", "on") if i % 2 else ("on", "off"):
            times[mode].append(
                doit(path, {**base, "HFBUILD_OBSERVE": "1" if mode == "on" else "0"})
            )
    return {k: statistics.median(v) for k, v in times.items()}


def watch_setup(root: pathlib.Path, repeat: int) -> tuple[int, float]:
    """(directories watched, median CPU seconds) of making the inotify watch of `root`, as a
    build's first window makes it (no store inside it to leave out)."""
    from hfbuild.source import watch

    real = os.path.realpath(root)
    times, count = [], 0
    for _ in range(repeat):
        t0 = time.process_time()  # CPU, as the builds are measured
        w = watch.Watcher(real, lambda d: False)
        w.drain()  # the events making it caused, if any
        times.append(time.process_time() - t0)
        count = w.directories
        w._ino.close()  # the reader thread stops on the closed descriptor
    return count, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--noop-repeat", type=int, default=15)
    args = ap.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="hfbuild-bench-observe-"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HFBUILD_")},
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_CACHE": str(work / "hf-cache"),
        "HFBUILD_NO_REMOTE": "1",
        "GIT_AUTHOR_NAME": "b",
        "GIT_AUTHOR_EMAIL": "b@b",
        "GIT_COMMITTER_NAME": "b",
        "GIT_COMMITTER_EMAIL": "b@b",
    }
    try:
        demo = work / "demo-project"
        demo.mkdir()
        shutil.copy(REPO / "dodo.py", demo / "dodo.py")
        shutil.copytree(REPO / "demo", demo / "demo", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "data", demo / "data")
        git_init(demo, env)

        big = work / "scale"
        scale_repo.make_repo(big, per_dir=10)
        big_env = {**scale_repo._env(big), **{k: v for k, v in env.items() if k.startswith("HF")}}
        big_env = {k: v for k, v in big_env.items() if not k.startswith("HFBUILD_OBSERVE")}

        d = cold(demo, env, args.repeat)
        s = cold(big, big_env, args.repeat)
        dirs, setup = watch_setup(big, 5)
        c: dict[str, float] | None = None
        if args.rows:
            chain = work / "chain"
            (chain / "data").mkdir(parents=True)
            bench_pipeline.make_corpus(chain / "data" / "corpus.parquet", args.rows)
            (chain / "transforms.py").write_text(textwrap.dedent(bench_pipeline.TRANSFORMS))
            (chain / "dodo.py").write_text(textwrap.dedent(bench_pipeline.DODO))
            git_init(chain, {**env})
            c = cold(chain, {**env, "PYTHONPATH": str(chain)}, args.repeat)
        n = noop(demo, env, args.noop_repeat)

        print(
            f"run-time observation, CPU seconds, median of {args.repeat} cold builds each "
            f"(fresh store)"
        )
        print(f"cold    demo, observed           {d['on']:7.3f} s")
        print(f"cold    demo, HFBUILD_OBSERVE=0   {d['off']:7.3f} s")
        print(f"ratio   demo                      {d['on'] / d['off']:7.3f}   (target <= 1.05)")
        print(f"cold    20k-file repo, observed   {s['on']:7.3f} s   ({dirs:,} directories)")
        print(f"cold    20k-file repo, HFBUILD_OBSERVE=0 {s['off']:7.3f} s")
        print(f"ratio   20k-file repo             {s['on'] / s['off']:7.3f}   (target <= 1.05)")
        print(
            f"watch   {dirs:,} directories: made in {setup * 1000:6.1f} ms CPU (once per process)"
        )
        if c is not None:
            print(f"cold    {args.rows:,}-row chain, observed         {c['on']:7.3f} s")
            print(f"cold    {args.rows:,}-row chain, HFBUILD_OBSERVE=0 {c['off']:7.3f} s")
            print(f"ratio   chain                     {c['on'] / c['off']:7.3f}   (target <= 1.05)")
        print(
            f"no-op   demo, observed           {n['on'] * 1000:7.1f} ms "
            f"(median of {args.noop_repeat})"
        )
        print(f"no-op   demo, HFBUILD_OBSERVE=0   {n['off'] * 1000:7.1f} ms")
        print(
            f"added   by observation            {(n['on'] - n['off']) * 1000:7.1f} ms   "
            f"(target <= 2 ms; a no-op builds nothing, so inotify watches nothing)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
