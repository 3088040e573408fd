"""A real project whose load stage reads several parquet files, for the sharding tests: each
row-local transform (not batched: a batched one is built whole) logs `stage:file` per row,
so a test sees which shards were built."""

from __future__ import annotations

import json
from typing import Any

from tests.helpers import Repo, read_python

FILES = {
    "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG", "KILL_IN", "PID_LOG"]\n',
    "pkg/__init__.py": "",
    "pkg/t.py": """
        import os
        import time

        def log(stage, batch):
            for f in sorted(set(batch["f"])):
                hold(f"{stage}:{f}")
                if os.environ.get("KILL_IN") == f"{stage}:{f}":
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)
                with open(os.environ["CALL_LOG"], "a") as out:
                    out.write(f"{stage}:{f}\\n")
                if os.environ.get("PID_LOG"):
                    with open(os.environ["PID_LOG"], "a") as out:
                        out.write(f"{stage}:{os.getpid()}\\n")

        def hold(at):
            # A test's pause point (outside the project: not read by the build): the first
            # call at `at` waits for the test, once.
            hold = os.path.join(os.path.dirname(os.environ["CALL_LOG"]), "hold")
            if os.path.exists(hold) and open(hold).read() == at:
                os.remove(hold)
                open(hold + "-reached", "w").close()
                while not os.path.exists(hold + "-go"):
                    time.sleep(0.01)

        def feat(row):
            log("feat", {"f": [row["f"]]})
            return {"y": row["x"] * 2}

        def idx(row, i):
            log("idx", {"f": [row["f"]]})
            return {"i": i}

        def keep(row):
            log("keep", {"f": [row["f"]]})
            return row["y"] % 3 != 0

        def total(ds):
            log("total", {"f": ["all"]})
            return ds.sort("i")
        """,
    "dodo.py": """
        from hfbuild import Pipeline
        from pkg import t

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files=DATA, split="train")
        feat = pipe.map("feat", raw, t.feat)
        idx = pipe.map("idx", feat, t.idx, with_indices=True)
        kept = pipe.filter("kept", idx, t.keep)
        total = pipe.apply("total", kept, t.total)


        def task_preprocess():
            yield from pipe.tasks()
        """,
}

STAGES = ("raw", "feat", "idx", "kept", "total")


def write_part(repo: Repo, name: str, start: int, rows: int = 10) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (repo.path / "data").mkdir(exist_ok=True)
    xs = list(range(start, start + rows))
    pq.write_table(pa.table({"x": xs, "f": [name] * rows}), repo.path / "data" / f"{name}.parquet")


def make_project(repo: Repo, parts: int = 4, data: str = '"data/*.parquet"') -> Repo:
    files = dict(FILES)
    files["dodo.py"] = files["dodo.py"].replace("DATA", data)
    repo.write(files)
    for i in range(parts):
        write_part(repo, f"part-{i}", 100 * i)
    repo.commit("project")
    return repo


READ = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
out = {}
for name in %r:
    fp = dodo.pipe[name].fingerprint
    doc = dodo.pipe.store.read_manifest(fp)
    ds = dodo.pipe.result(name)
    out[name] = {"fp": fp, "hash": doc["content_hash"], "rows": ds.to_dict()}
print(json.dumps(out))
"""


def state(repo: Repo, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Each stage's fingerprint, stored content hash and rows, read in a process of its own
    (`read_python`: forked from a server that imported hfbuild once)."""
    out = read_python(READ % (STAGES,), repo.path, env=env)  # fails the test on an error
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result
