"""What a no-op `doit run` costs beyond loading the user's pipeline, by whom (issue #10).

Run: `.venv/bin/python bench/bench_doit_overhead.py [--repeat K] [--venv DIR ...]
[--make-venv DIR]`. For each virtual environment (default: the one running this script;
`--make-venv DIR` first creates a fresh one with `python -m venv` and `pip install
'<repo>[demo]'`, which needs the package index or a wheel cache), the demo pipeline is copied
to a temporary git repository, built once, and then measured in fresh processes, every
command interleaved with the others (medians of K), in wall and CPU (user + system) time:

- the floor, `python -c 'import doit, dodo'` (loading the user's pipeline);
- the floor plus the three `importlib.metadata.entry_points()` scans doit makes on every run
  (commands, backends, reporters; each reads every installed distribution's metadata);
- doit alone: the same five task names, up to date by `uptodate: [True]`;
- hfbuild's no-op `doit run preprocess`, with doit's default database (dbm) and with
  `--backend sqlite3` and `--backend json`, the settings a user could put in `DOIT_CONFIG`.

Each is printed with its ratio to the floor, so the part of the demo's no-op that is doit's
(and how it grows with the number of installed distributions) is told from hfbuild's.
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
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(pathlib.Path(__file__).parent))

import scale_build  # noqa: E402  (a sibling script of bench/)

# doit itself on the demo's five task names, each up to date: the same script as
# bench_scale's "doit alone on the demo" figure.
DOIT_ALONE = scale_build.DEMO_DOIT_ALONE

SCANS = (
    "import doit, dodo\n"
    "from importlib.metadata import entry_points\n"
    "for group in ('doit.COMMAND', 'doit.BACKEND', 'doit.REPORTER'):\n"
    "    list(entry_points(group=group))\n"
)


def _env(work: pathlib.Path, venv: pathlib.Path) -> dict[str, str]:
    """scale_build's environment, with `venv` first on PATH and only the work dir on
    PYTHONPATH (the venv measured must not import another checkout's hfbuild)."""
    return {
        **scale_build._env(work),
        "PYTHONPATH": str(work),
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
    }


def _project(work: pathlib.Path, env: dict[str, str]) -> None:
    work.mkdir(parents=True)
    for rel in ("dodo.py", "demo", "data"):
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, work / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, work / rel)
    (work / ".gitignore").write_text(".hfbuild/\n.doit*\nhf-default-cache/\n")
    (work / "doit_alone.py").write_text(DOIT_ALONE)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "demo"]):
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)


def _timed(cmd: list[str], cwd: pathlib.Path, env: dict[str, str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{out.stdout}\n{out.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _distributions(venv: pathlib.Path) -> int:
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(len(list(m.distributions())))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def measure(venv: pathlib.Path, work: pathlib.Path, repeat: int) -> None:
    env = _env(work, venv)
    _project(work, env)
    py, doit = str(venv / "bin" / "python"), str(venv / "bin" / "doit")
    run = [doit, "run"]
    cmds = {
        "floor: python -c 'import doit, dodo'": [py, "-c", "import doit, dodo"],
        "floor + doit's 3 entry-point scans": [py, "-c", SCANS],
        "doit alone, 5 tasks up to date": [doit, "-f", "doit_alone.py", "run", "preprocess"],
        "hfbuild no-op (doit's dbm default)": [*run, "preprocess"],
        "hfbuild no-op, --backend sqlite3": [
            *run,
            "--backend",
            "sqlite3",
            "--db-file",
            ".doit-sqlite3.db",
            "preprocess",
        ],
        "hfbuild no-op, --backend json": [
            *run,
            "--backend",
            "json",
            "--db-file",
            ".doit-json.db",
            "preprocess",
        ],
    }
    _timed(cmds["hfbuild no-op (doit's dbm default)"], work, env)  # the cold build
    time.sleep(2.1)  # past the racy window, so the next run records the code cache
    for cmd in cmds.values():
        _timed(cmd, work, env)
    walls: dict[str, list[float]] = {k: [] for k in cmds}
    cpus: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(repeat):
        for name, cmd in cmds.items():
            wall, cpu = _timed(cmd, work, env)
            walls[name].append(wall)
            cpus[name].append(cpu)
    med = statistics.median
    floor = "floor: python -c 'import doit, dodo'"
    fw, fc = med(walls[floor]), med(cpus[floor])
    print(f"\n{venv} ({_distributions(venv)} distributions), medians of {repeat}")
    for name in cmds:
        w, c = med(walls[name]), med(cpus[name])
        print(
            f"  {name:40s} wall {w * 1e3:7.1f} ms {w / fw:5.2f}x   cpu {c * 1e3:7.1f} ms "
            f"{c / fc:5.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=11)
    ap.add_argument("--venv", type=pathlib.Path, action="append", default=[])
    ap.add_argument("--make-venv", type=pathlib.Path)
    args = ap.parse_args()
    venvs = [p.resolve() for p in args.venv] or [pathlib.Path(sys.prefix)]
    if args.make_venv is not None:
        target = args.make_venv.resolve()
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        pip = [str(target / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, f"{REPO}[demo]"], check=True)
        venvs.append(target)
    with tempfile.TemporaryDirectory(prefix="hfbuild-doit-overhead-") as tmp:
        for i, venv in enumerate(venvs):
            measure(venv, pathlib.Path(tmp) / f"demo{i}", args.repeat)


if __name__ == "__main__":
    main()
