"""A small real project with a 5-stage pipeline, for tests that drive `doit` end to end."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections import Counter
from typing import Any

from tests.helpers import Repo, read_python

FILES = {
    # The call log and the crash switch are test instrumentation: their values never change
    # a stage's output, so they stay out of its key.
    "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG", "KILL_IN"]\n',
    "pkg/__init__.py": "",
    "pkg/util/__init__.py": "",
    "pkg/util/deep.py": "OFFSET = 0\n\ndef offset():\n    return OFFSET\n",
    "pkg/util/mid.py": """
        from pkg.util.deep import offset

        def shift(x):
            return x + offset()
        """,
    "pkg/log.py": """
        import os

        def log(stage):
            if os.environ.get("KILL_IN") == stage:  # the crash tests: die inside a transform
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            with open(os.environ["CALL_LOG"], "a") as f:
                f.write(stage + "\\n")
        """,
    "pkg/transforms.py": """
        from pkg.log import log
        from pkg.util.mid import shift

        def feat(batch, k=1):
            log("feat")
            return {"y": [shift(x) * k for x in batch["x"]]}

        def keep(batch, m=3):
            log("keep")
            return [y % m != 0 for y in batch["y"]]

        def split(ds, seed=0):
            log("split")
            return ds.train_test_split(test_size=0.25, seed=seed)
        """,
    "pkg/text.py": """
        from pkg.log import log

        def lens(batch, scale=1):
            log("lens")
            return {"n": [len(t) * scale for t in batch["text"]]}
        """,
    "dodo.py": """
        from hfbuild import Pipeline
        from pkg import text, transforms

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        feat = pipe.map("feat", raw, transforms.feat, {"k": 2}, batched=True)
        kept = pipe.filter("kept", feat, transforms.keep, {"m": 3}, batched=True)
        split = pipe.apply("split", kept, transforms.split, {"seed": 0})
        lens = pipe.map("lens", raw, text.lens, {"scale": 1}, batched=True)


        def task_preprocess():
            yield from pipe.tasks()
        """,
}

ROWS = 40


def make_project(repo: Repo) -> Repo:
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo.write(FILES)
    (repo.path / "data").mkdir(exist_ok=True)
    table = pa.table({"x": list(range(ROWS)), "text": [f"row {'x' * i}" for i in range(ROWS)]})
    pq.write_table(table, repo.path / "data" / "part-0.parquet")
    repo.commit("project")
    return repo


def expected(offset: int = 0, k: int = 2, m: int = 3, scale: int = 1) -> dict[str, Any]:
    """The pipeline's results computed without hfbuild or datasets' cache."""
    ys = [(x + offset) * k for x in range(ROWS)]
    kept = [y for y in ys if y % m != 0]
    return {
        "feat": ys,
        "kept": kept,
        "lens": [len(f"row {'x' * i}") * scale for i in range(ROWS)],
    }


def doit(
    repo: Repo, *args: str, log: pathlib.Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "doit", *args],
        cwd=repo.path,
        env={**os.environ, "CALL_LOG": str(log), **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"doit {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out


def calls(log: pathlib.Path) -> Counter[str]:
    return Counter(log.read_text().split()) if log.exists() else Counter()


READ_RESULTS = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
out = {}
for name in ("feat", "kept", "lens"):
    ds = dodo.pipe.result(name)
    out[name] = list(ds["y" if name != "lens" else "n"])
split = dodo.pipe.result("split")
out["split"] = {s: sorted(split[s]["y"]) for s in split}
print(json.dumps(out))
"""


def results(repo: Repo, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Each stage's values as `pipe.result` serves them, read in a process of its own
    (`read_python`: forked from a server that imported hfbuild once)."""
    out = read_python(READ_RESULTS, repo.path, env=env)  # fails the test on an error
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result
