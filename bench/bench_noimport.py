"""A no-op that imports nothing of the user's (issue #20): checks answered from the record.

Run: `.venv/bin/python bench/bench_noimport.py [--clock wall|cpu] [--repeat N]`.

Two copies of one pipeline (load -> map -> filter, functions named `"pkg.tx:feat"`), built once
each, differing only in their transform module: the heavy one does ~2 s of real work when it is
imported (a sieve of primes in pure Python, as a model's or a tokenizer library's import would),
the light one none. Measured in fresh processes, interleaved, medians of `--repeat` runs, after
three warm-up runs of each command (a record is used once a second full check confirmed it):
`hfbuild status`, `hfbuild verify --staged` and `doit run preprocess` with nothing to build;
and the hook's check in the literal commit cycle (an edit, `doit run`, `git add -A`, then
`verify --staged` with the variables git and pre-commit set for a hook), timed alone. Then what
the build's side check (`hfbuild/pipeline/witness.py`) costs: `doit run` after an edit of the
transform module, wall and CPU (its side check's included), record on vs `HFBUILD_RECORD=0`.
With `--scale`, only the first `hfbuild status` after an edit in bench/scale_repo.py's
20,000-file repository (its record's facts fail: the tree is walked once before the full path
now, twice before).
Targets: each <= 0.25 s for the heavy pipeline, and <= 1.2x the light one. Then the demo's
no-op against its `python -c 'import doit, dodo'` floor (bench/scale_build.py): <= 1.10x. The
full path of the heavy pipeline (`HFBUILD_RECORD=0`) is printed for comparison.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import textwrap

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import scale_build
from scale_build import BIN, PY, _env, _git_repo, _interleaved, _run

HEAVY = """
def _sieve(n):
    seen = bytearray(n)
    out = 0
    for i in range(2, n):
        if not seen[i]:
            out += 1
            for j in range(i * i, n, i):
                seen[j] = 1
    return out


PRIMES = _sieve({n})  # the import's work
"""

TX = """
{work}

def feat(batch, k=1):
    return {{"y": [x * k for x in batch["x"]]}}


def keep(batch):
    return [y % 3 != 0 for y in batch["y"]]
"""

DODO = """
from hfbuild import Pipeline

pipe = Pipeline()
raw = pipe.load("raw", "json", data_files="data/*.jsonl", split="train")
feat = pipe.map("feat", raw, "pkg.tx:feat", {"k": 2}, batched=True)
kept = pipe.filter("kept", feat, "pkg.tx:keep", batched=True)


def task_preprocess():
    yield from pipe.tasks()
"""


def _project(work: pathlib.Path, heavy_n: int) -> dict[str, str]:
    env = _env(work)
    work_text = textwrap.dedent(HEAVY).format(n=heavy_n) if heavy_n else ""
    files = {
        "pkg/__init__.py": "",
        "pkg/tx.py": textwrap.dedent(TX).format(work=work_text),
        "data/a.jsonl": "".join(f'{{"x": {i}}}\n' for i in range(100)),
        "dodo.py": textwrap.dedent(DODO),
    }
    _git_repo(work, files, env)
    _run([str(BIN / "doit"), "run", "preprocess"], work, env)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "the lock"]):
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    return env


COMMANDS = {
    "hfbuild status": [str(BIN / "hfbuild"), "status"],
    "hfbuild verify --staged": [str(BIN / "hfbuild"), "verify", "--staged"],
    "doit run preprocess (no-op)": [str(BIN / "doit"), "run", "preprocess"],
}


# What git and the pre-commit framework set for a commit's hook (the author date is new at each
# commit): `verify --staged` runs with them as the shipped hook does.
HOOK_ENV = {
    "GIT_AUTHOR_DATE": "@1796433676 +0000",
    "GIT_EDITOR": ":",
    "GIT_EXEC_PATH": "/usr/lib/git-core",
    "GIT_INDEX_FILE": ".git/index",
    "GIT_PREFIX": "",
    "PRE_COMMIT": "1",
}


# The shipped hook (hook/run-hfbuild) runs `python -m hfbuild`: its context is `python -m`'s.
HOOK = [PY, "-m", "hfbuild", "verify", "--staged", "--quiet"]


def _commit_cycle(work: pathlib.Path, env: dict[str, str], i: int) -> float:
    """The hook's check in the literal cycle: an edit of the transform module, `doit run`,
    `git add -A`, then `verify --staged` as the hook runs it (timed; the build's side check
    confirmed the entry it derives from); the commit follows."""
    tx = work / "pkg" / "tx.py"
    tx.write_text(tx.read_text() + f"# edit {i}\n")
    _run([str(BIN / "doit"), "run", "preprocess"], work, env)
    subprocess.run(["git", "add", "-A"], cwd=work, env=env, check=True, capture_output=True)
    hook = {**env, **HOOK_ENV, "PATH": f"/usr/lib/git-core{os.pathsep}{env['PATH']}"}
    t = _run(HOOK, work, hook)
    subprocess.run(
        ["git", "commit", "-qm", f"edit {i}"], cwd=work, env=env, check=True, capture_output=True
    )
    return t


def _timed(cmd: list[str], cwd: pathlib.Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of `cmd`, the CPU of every process it waited for included (its
    side check's)."""
    import resource
    import time

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def _build_cost(
    work: pathlib.Path, env: dict[str, str], repeat: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """`doit run` after an edit of the transform module (`feat` built, `kept` cut off), with
    the record (and so the build's side check) and with `HFBUILD_RECORD=0`, interleaved:
    medians of (wall, CPU) each."""
    tx = work / "pkg" / "tx.py"
    runs: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    for i in range(repeat):
        for kind in ("off", "on"):
            tx.write_text(tx.read_text() + f"# build {kind} {i}\n")
            run_env = env if kind == "on" else {**env, "HFBUILD_RECORD": "0"}
            runs[kind].append(_timed([str(BIN / "doit"), "run", "preprocess"], work, run_env))

    def med(xs: list[tuple[float, float]]) -> tuple[float, float]:
        return statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs)

    return med(runs["on"]), med(runs["off"])


def _first_check_after_edit(tmp: pathlib.Path, repeat: int) -> tuple[float, float]:
    """bench/scale_repo.py's 20,000-file repository, built, its record confirmed: the first
    `hfbuild status` after an edit of a file no stage reads (the record's facts fail; the full
    path answers and records), median of `repeat`, and the confirmed no-op's for comparison."""
    import time

    import scale_repo

    root = tmp / "scale"
    scale_repo.make_repo(root)
    env = scale_repo._env(root)
    subprocess.run(
        [str(BIN / "doit"), "run", "preprocess"], cwd=root, env=env, check=True, capture_output=True
    )
    time.sleep(2.1)  # past the racy window
    status = [str(BIN / "hfbuild"), "status"]
    first: list[float] = []
    steady: list[float] = []
    for i in range(repeat):
        (root / "notes.txt").write_text(f"note {i}\n")
        time.sleep(2.1)  # the edit past the racy window, as a user's is
        first.append(_run(status, root, env))
        _run(status, root, env)  # confirmed
        steady.append(_run(status, root, env))
    return statistics.median(first), statistics.median(steady)


def _calibrate(seconds: float) -> int:
    """The sieve size whose import takes about `seconds` of CPU time here (CPU time, so that
    a loaded machine does not make the module lighter than it is meant to be)."""
    import time

    n = 200_000
    while True:
        code = textwrap.dedent(HEAVY).format(n=n)
        t0 = time.process_time()
        exec(compile(code, "<sieve>", "exec"), {})
        dt = time.process_time() - t0
        if dt >= seconds / 4:
            return int(n * seconds / dt)
        n *= 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--import-seconds", type=float, default=2.0)
    ap.add_argument(
        "--scale",
        action="store_true",
        help="only the first `hfbuild status` after an edit in scale_repo's 20k-file repository "
        "(run it with another checkout's python for its figure)",
    )
    args = ap.parse_args()
    scale_build.CLOCK["kind"] = args.clock
    if args.scale:
        with tempfile.TemporaryDirectory(prefix="hfbuild-noimport-") as tmp:
            first, steady = _first_check_after_edit(pathlib.Path(tmp), args.repeat)
        print(
            f"{args.clock} seconds; 20k-file repository, hfbuild status: first check after an "
            f"edit {first:.3f}, confirmed no-op {steady:.3f}"
        )
        return
    n = _calibrate(args.import_seconds)
    rows: list[tuple[str, float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="hfbuild-noimport-") as tmp:
        heavy = pathlib.Path(tmp) / "heavy"
        light = pathlib.Path(tmp) / "light"
        henv = _project(heavy, n)
        lenv = _project(light, 0)
        full_env = {**henv, "HFBUILD_RECORD": "0"}
        import_cost = _run([PY, "-c", "import pkg.tx"], heavy, henv)
        for name, cmd in COMMANDS.items():
            for _ in range(3):  # the record's entry: new, then confirmed
                _run(cmd, heavy, henv)
                _run(cmd, light, lenv)
            h, li = _interleaved(
                args.repeat, lambda c=cmd: _run(c, light, lenv), lambda c=cmd: _run(c, heavy, henv)
            )
            full = _run(cmd, heavy, full_env)
            rows.append((name, h, li, full))
        cycle = "hook in edit/doit run/add/commit"
        hc, lc = _interleaved(
            args.repeat,
            lambda: _commit_cycle(light, lenv, len(rows)),
            lambda: _commit_cycle(heavy, henv, len(rows)),
        )
        hook_full = {**full_env, **HOOK_ENV}
        rows.append((cycle, hc, lc, _run(HOOK, heavy, hook_full)))
        costs = {
            "heavy": _build_cost(heavy, henv, args.repeat),
            "light": _build_cost(light, lenv, args.repeat),
        }
        demo = scale_build.demo_noop(pathlib.Path(tmp), args.repeat)[0]
    print(f"\n{args.clock} seconds; the heavy module's import: {import_cost:.2f} s (sieve {n:,})")
    print(f"{'check':<30} {'heavy':>7} {'light':>7} {'ratio':>6} {'full path':>10}  targets")
    for name, h, li, full in rows:
        ok = "met" if h <= 0.25 and h <= 1.2 * li else "NOT met"
        print(
            f"{name:<30} {h:>7.3f} {li:>7.3f} {h / li:>6.2f} {full:>10.3f}  "
            f"<= 0.25 s and <= 1.2x: {ok}"
        )
    print("doit run after an edit (feat built): the record and its side check on vs off")
    for which, ((won, con), (woff, coff)) in costs.items():
        print(
            f"  {which}: wall {won:.3f} vs {woff:.3f} s ({won / woff:.2f}x), "
            f"CPU {con:.3f} vs {coff:.3f} s ({con / coff:.2f}x)"
        )
    label, mine, anchor, floor = demo
    ratio = mine / floor
    print(
        f"{label}: {mine:.3f} against {anchor} {floor:.3f}: {ratio:.2f}x "
        f"(<= 1.10x: {'met' if ratio <= 1.10 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
