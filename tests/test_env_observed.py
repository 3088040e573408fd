"""Environment variables read by computed names: observed while a stage builds (in the
process and its num_proc workers), keyed like the literal names after the first build;
a copy of the whole environment keys none, and `explain` says so. Real repositories, real
`doit` runs in fresh processes."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from tests.helpers import Repo, read_python, run_python
from tests.pipeline_project import calls

FILES = {
    "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG"]\n',
    "pkg/__init__.py": "",
    "pkg/transforms.py": """
        import os

        PREFIX = "HFB_TEST_"


        def log(stage):
            with open(os.environ["CALL_LOG"], "a") as f:
                f.write(stage + "\\n")


        def by_name(batch):
            log("by_name")
            mode = os.environ[PREFIX + "MODE"]  # a computed name: no static scan sees it
            return {"m": [mode] * len(batch["x"])}


        def in_workers(batch):
            log("workers")
            import multiprocess

            # Only the pool's worker processes read the variable.
            extra = "parent"
            if multiprocess.parent_process() is not None:
                extra = os.getenv(PREFIX + "EXTRA", "unset")
            return {"e": [extra] * len(batch["x"])}


        def copies(batch):
            log("copies")
            env = dict(os.environ)  # a copy of the whole environment: keys no variable
            return {"c": [len(env) > 0] * len(batch["x"])}


        def secret(batch):
            log("secret")
            token = os.environ.get(PREFIX + "TOKEN", "")
            return {"t": [len(token)] * len(batch["x"])}
        """,
    "dodo.py": """
        from hfbuild import Pipeline
        from pkg import transforms as t

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/part-0.parquet", split="train")
        pipe.map("by_name", raw, t.by_name, batched=True)
        pipe.map("workers", raw, t.in_workers, batched=True, batch_size=2, num_proc=2)
        pipe.map("copies", raw, t.copies, batched=True)
        pipe.map("secret", raw, t.secret, batched=True)


        def task_preprocess():
            yield from pipe.tasks()
        """,
    ".gitignore": ".hfbuild/\n.doit.db*\n__pycache__/\n",
}
STAGES = ["by_name", "workers", "copies", "secret"]
TOKEN = "s3cr3t-value-never-stored"
ENV = {
    "HFB_TEST_MODE": "a",
    "HFB_TEST_EXTRA": "x",
    "HFB_TEST_TOKEN": TOKEN,
    "UNRELATED": "1",
}


def doit(path: pathlib.Path, log: pathlib.Path, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "doit", "run", "preprocess"],
        cwd=path,
        env={**os.environ, **env, "CALL_LOG": str(log)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, f"doit failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def hfbuild(path: pathlib.Path, env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [str(pathlib.Path(sys.executable).parent / "hfbuild"), *args],
        cwd=path,
        env={**os.environ, **env, "CALL_LOG": os.devnull},
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout + out.stderr


def column(path: pathlib.Path, stage: str, col: str, env: dict[str, str]) -> list[Any]:
    """A result column, read in a process with `env` (the variables are in the key)."""
    out = read_python(
        f"""
        import json, warnings
        warnings.simplefilter("ignore")
        import dodo
        print(json.dumps(list(dodo.pipe.result({stage!r})[{col!r}])))
        """,
        path,
        env={**env, "CALL_LOG": os.devnull},
    )
    values: list[Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return values


def observed(path: pathlib.Path, stage: str) -> list[list[str]]:
    entry = json.loads((path / "hfbuild.lock").read_text())["stages"][stage]
    pairs: list[list[str]] = entry.get("observed") or []
    return pairs


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The project, committed and built once with ENV."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = tmp_path_factory.mktemp("envobs")
    path = base / "repo"
    repo = Repo.init(path)
    repo.write(FILES)
    (path / "data").mkdir()
    pq.write_table(pa.table({"x": list(range(8))}), path / "data" / "part-0.parquet")
    repo.commit("project")
    doit(path, base / "build.log", ENV)
    assert set(calls(base / "build.log")) == set(STAGES)
    return path


@pytest.fixture
def project(built: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "repo"
    shutil.copytree(built, path, symlinks=True)
    return path


def test_variable_read_by_a_computed_name_is_keyed(
    project: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """`os.environ[PREFIX + "MODE"]`: recorded with its value (and nothing datasets or
    hfbuild read), an unchanged value is a no-op, a changed one rebuilds that stage alone,
    and explain shows the old and new value."""
    assert observed(project, "by_name") == [["env://HFB_TEST_MODE", '"a"']]
    assert column(project, "by_name", "m", ENV)[:2] == ["a", "a"]
    doit(project, tmp_path / "same.log", ENV)
    assert calls(tmp_path / "same.log") == Counter()

    changed = {**ENV, "HFB_TEST_MODE": "b"}
    ex = hfbuild(project, changed, "explain", "by_name")
    assert "env var HFB_TEST_MODE (read at run time) changed: 'a' -> 'b'" in ex, ex
    doit(project, tmp_path / "changed.log", changed)
    assert calls(tmp_path / "changed.log") == Counter(["by_name"])
    assert column(project, "by_name", "m", changed)[:2] == ["b", "b"]
    assert observed(project, "by_name") == [["env://HFB_TEST_MODE", '"b"']]


def test_variable_read_in_num_proc_workers_is_keyed(
    project: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A variable only the num_proc=2 worker processes read (os.getenv) is keyed; unset
    is a value of its own."""
    assert observed(project, "workers") == [["env://HFB_TEST_EXTRA", '"x"']]
    changed = {**ENV, "HFB_TEST_EXTRA": "y"}
    doit(project, tmp_path / "changed.log", changed)
    assert calls(tmp_path / "changed.log")["workers"] >= 1
    assert set(calls(tmp_path / "changed.log")) == {"workers"}
    assert column(project, "workers", "e", changed)[:2] == ["y", "y"]
    unset = {k: v for k, v in ENV.items() if k != "HFB_TEST_EXTRA"}
    ex = hfbuild(project, unset, "explain", "workers")
    assert "env var HFB_TEST_EXTRA (read at run time) changed: 'y' -> unset" in ex, ex


def test_a_copy_of_the_environment_keys_no_variable(
    project: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """dict(os.environ) is recorded as a copy, not as every variable: changing or adding
    an unrelated variable builds nothing, and explain says the copy is not keyed."""
    assert observed(project, "copies") == [["env://", "copied"]]
    env = {**ENV, "UNRELATED": "2", "SOMETHING_NEW": "1"}
    doit(project, tmp_path / "unrelated.log", env)
    assert calls(tmp_path / "unrelated.log") == Counter()
    ex = hfbuild(project, env, "explain", "copies")
    assert "is up to date" in ex, ex
    assert "copied or iterated the whole environment" in ex, ex


def test_a_secret_read_by_a_computed_name_is_hashed(
    project: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A secret-looking name read at run time is keyed by its salted hash: its value is
    nowhere in the lock or the store, and explain does not show it."""
    ((name, value),) = observed(project, "secret")
    assert name == "env://HFB_TEST_TOKEN" and value.startswith("scrypt:")
    assert TOKEN not in (project / "hfbuild.lock").read_text()
    for p in (project / ".hfbuild").rglob("*.json"):
        assert TOKEN not in p.read_text(errors="replace"), p
    changed = {**ENV, "HFB_TEST_TOKEN": "other"}
    ex = hfbuild(project, changed, "explain", "secret")
    assert "env var HFB_TEST_TOKEN (read at run time) changed (a secret" in ex, ex
    assert TOKEN not in ex and "other" not in ex
    doit(project, tmp_path / "changed.log", changed)
    assert calls(tmp_path / "changed.log") == Counter(["secret"])


RECORD = """
import json, os, sys
import hfbuild
from hfbuild.source import observe
sys.path.insert(0, sys.argv[1])
import user
with observe.recording(sys.argv[1], [], os.path.join(sys.argv[1], "spool")) as rec:
    user.run()
    os.environ.get("READ_OUTSIDE")  # by code outside the project (this script)
print(json.dumps(sorted(rec.collect_env())))
"""


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('os.environ["A" + "1"]', ["A1"]),
        ('os.environ.get("A" + "1")', ["A1"]),
        ('os.getenv("A" + "1")', ["A1"]),
        ('"A1" in os.environ', ["A1"]),
        ('os.environ.setdefault("A1", "x")', ["A1"]),
        ("dict(os.environ)", [""]),
        ("{**os.environ}", [""]),
        ("os.environ.copy()", [""]),
        ("list(os.environ.items())", [""]),
        ("[k for k in os.environ]", [""]),
        ('os.environ["B1"] = "set"; os.environ["B1"]', ["B1"]),
    ],
)
def test_reads_recorded_one_by_one_and_copies_as_copies(
    tmp_path: pathlib.Path, body: str, expected: list[str]
) -> None:
    """What the recording notes for each way of reading the environment from project
    code (a fresh process; "" is the mark of a copy of the whole environment)."""
    (tmp_path / "user.py").write_text(f"import os\n\ndef run():\n    {body}\n")
    out = run_python(RECORD, tmp_path, env={"A1": "v"}, args=[str(tmp_path)])
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected
