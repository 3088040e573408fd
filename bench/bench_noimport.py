"""A no-op that imports nothing of the user's (issue #20): checks answered from the record.

Run: `.venv/bin/python bench/bench_noimport.py [--clock wall|cpu] [--repeat N]`.

Two copies of one pipeline (load -> map -> filter, functions named `"pkg.tx:feat"`), built once
each, differing only in their transform module: the heavy one does ~2 s of real work when it is
imported (a sieve of primes in pure Python, as a model's or a tokenizer library's import would),
the light one none. Measured in fresh processes, interleaved, medians of `--repeat` runs, after
three warm-up runs of each command (a record is used once a second full check confirmed it):
`hfbuild status`, `hfbuild verify --staged` and `doit run preprocess` with nothing to build.
Targets: each <= 0.25 s for the heavy pipeline, and <= 1.2x the light one. Then the demo's
no-op against its `python -c 'import doit, dodo'` floor (bench/scale_build.py): <= 1.10x. The
full path of the heavy pipeline (`HFBUILD_RECORD=0`) is printed for comparison.
"""

from __future__ import annotations

import argparse
import pathlib
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
    args = ap.parse_args()
    scale_build.CLOCK["kind"] = args.clock
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
        demo = scale_build.demo_noop(pathlib.Path(tmp), args.repeat)[0]
    print(f"\n{args.clock} seconds; the heavy module's import: {import_cost:.2f} s (sieve {n:,})")
    print(f"{'check':<30} {'heavy':>7} {'light':>7} {'ratio':>6} {'full path':>10}  targets")
    for name, h, li, full in rows:
        ok = "met" if h <= 0.25 and h <= 1.2 * li else "NOT met"
        print(
            f"{name:<30} {h:>7.3f} {li:>7.3f} {h / li:>6.2f} {full:>10.3f}  "
            f"<= 0.25 s and <= 1.2x: {ok}"
        )
    label, mine, anchor, floor = demo
    ratio = mine / floor
    print(
        f"{label}: {mine:.3f} against {anchor} {floor:.3f}: {ratio:.2f}x "
        f"(<= 1.10x: {'met' if ratio <= 1.10 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
