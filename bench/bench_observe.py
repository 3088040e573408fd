"""The cost of run-time observation (issue #9): builds with the audit hook against the same
builds without it (HFBUILD_OBSERVE=0, a switch only this benchmark uses).

Run: `.venv/bin/python bench/bench_observe.py [--rows N] [--repeat K] [--noop-repeat M]`.
Everything runs in temporary git repositories, each build in a fresh `doit` process with an
empty store; the two settings alternate so that drift on a shared machine hits both. Times
are CPU times (user + system of `doit` and its worker processes), not wall time, so that
other processes on a shared machine do not decide the ratio. Prints:

- cold build of the demo pipeline (this repository's dodo.py, demo/ and data/), median of K,
  with and without observation, and the ratio. Target: <= 1.05.
- cold build of the 5-stage map chain of bench_pipeline.py on N rows (default 300,000).
  Target: <= 1.05.
- a no-op `doit run` of the demo, median of M, with and without observation: the difference
  is what watching imports and reads costs when nothing is built. Target: <= 5 ms.
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

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
BIN = pathlib.Path(sys.executable).parent
sys.path.insert(0, str(HERE))

import bench_pipeline  # noqa: E402 - the same chain and corpus as the pipeline benchmark


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
    """Median cold build time with observation on and off, alternating, fresh store each."""
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(repeat):
        for mode in ("off", "on") if i % 2 else ("on", "off"):
            store = path / f".hfbuild-{mode}-{i}"
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

        chain = work / "chain"
        (chain / "data").mkdir(parents=True)
        bench_pipeline.make_corpus(chain / "data" / "corpus.parquet", args.rows)
        (chain / "transforms.py").write_text(textwrap.dedent(bench_pipeline.TRANSFORMS))
        (chain / "dodo.py").write_text(textwrap.dedent(bench_pipeline.DODO))
        git_init(chain, {**env})
        chain_env = {**env, "PYTHONPATH": str(chain)}

        d = cold(demo, env, args.repeat)
        c = cold(chain, chain_env, args.repeat)
        n = noop(demo, env, args.noop_repeat)

        print(
            f"run-time observation, CPU seconds, median of {args.repeat} cold builds each "
            f"(fresh store)"
        )
        print(f"cold    demo, observed           {d['on']:7.3f} s")
        print(f"cold    demo, HFBUILD_OBSERVE=0   {d['off']:7.3f} s")
        print(f"ratio   demo                      {d['on'] / d['off']:7.3f}   (target <= 1.05)")
        print(f"cold    {args.rows:,}-row chain, observed         {c['on']:7.3f} s")
        print(f"cold    {args.rows:,}-row chain, HFBUILD_OBSERVE=0 {c['off']:7.3f} s")
        print(f"ratio   chain                     {c['on'] / c['off']:7.3f}   (target <= 1.05)")
        print(
            f"no-op   demo, observed           {n['on'] * 1000:7.1f} ms "
            f"(median of {args.noop_repeat})"
        )
        print(f"no-op   demo, HFBUILD_OBSERVE=0   {n['off'] * 1000:7.1f} ms")
        print(
            f"added   by watching imports       {(n['on'] - n['off']) * 1000:7.1f} ms   "
            f"(target <= 5 ms)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
