"""Issue #24: a served result equals plain `datasets`' result over the same code and files
(one `load_dataset` of all the files, then the same map/filter calls), cold and after an
append: rows, order, features and split order; where plain `datasets` raises, the stage
fails and serves nothing. Plain `datasets` runs uncached, in a fresh cache, in a process
of its own that never imports hfbuild.

Each build is a `doit run` process. Each plain `datasets` run and each read of what hfbuild
serves is a process of its own too, forked from a server that imported `datasets` (and, for
the reads, `hfbuild`) once and never runs project code (tests/forkserver.py, as
tests/test_differential.py does): fresh, without paying Python's start-up each time."""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import Repo, offline_env, run_hfbuild
from tests.pipeline_project import doit
from tests.test_differential import Server

_servers: dict[bool, Server] = {}
_outs = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The two fork servers (plain `datasets`; `datasets` and hfbuild), in an environment of
    their own (each child takes the test's whole environment)."""
    home = tmp_path_factory.mktemp("exacthome")
    outside = {k: v for k, v in os.environ.items() if not k.startswith(("HFBUILD_", "HF_"))}
    env = {**outside, **offline_env(home)}
    env.pop("PYTHONHASHSEED", None)
    _servers[True], _servers[False] = Server(env, plain=True), Server(env, plain=False)
    yield
    for server in _servers.values():
        server.close()
    _servers.clear()


def _python(code: str, cwd: pathlib.Path, *, plain: bool = False) -> str:
    """What `code` printed, run with `cwd` first on `sys.path` in a fresh process (forked: see
    above) in the test's environment; the plain server's never imported hfbuild."""
    server = _servers[plain]
    out = cwd.parent / f"python-{next(_outs)}.pkl"
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    rc, printed = server.run(
        "script", cwd, out, env=env, environ=True, arg={"code": textwrap.dedent(code)}
    )
    assert rc == 0, f"python failed ({rc}):\n{printed}\n{server.log(out)}"
    return str(printed)


DODO = """
from hfbuild import Pipeline
from plan import PLAN

pipe = Pipeline()
stages = {}
for kind, name, src, arg, kw in PLAN:
    if kind == "load":
        stages[name] = pipe.load(name, src, data_files=arg, **kw)
    else:
        stages[name] = getattr(pipe, kind)(name, stages[src], arg, **kw)


def task_preprocess():
    yield from pipe.tasks()
"""

DESCRIBE = """
import datasets


def describe(ds):
    if isinstance(ds, datasets.DatasetDict):
        return {"splits": list(ds), "parts": {s: describe(d) for s, d in ds.items()}}
    return {"features": ds.features.to_dict(), "rows": ds.to_list()}
"""

PLAIN = (
    DESCRIBE
    + """
import json, tempfile, warnings
warnings.simplefilter("ignore")
datasets.disable_progress_bars()
from plan import PLAN

cache = tempfile.mkdtemp()  # a fresh cache: nothing of another run is reused
out, made = {}, {}
for kind, name, src, arg, kw in PLAN:
    kw = {k: v for k, v in kw.items() if k != "sharded"}  # hfbuild's option, not datasets'
    try:
        if kind == "load":
            made[name] = datasets.load_dataset(src, data_files=arg, cache_dir=cache, **kw)
        else:
            made[name] = getattr(made[src], kind)(arg, **kw)
        out[name] = describe(made[name])
    except Exception as e:
        out[name] = {"error": type(e).__name__}
        break
print(json.dumps(out))
"""
)

SERVED = (
    DESCRIBE
    + """
import json, warnings
warnings.simplefilter("ignore")
import dodo
from plan import PLAN

out = {}
for _, name, _, _, _ in PLAN:
    try:
        out[name] = describe(dodo.pipe.result(name))
    except Exception as e:
        out[name] = {"error": type(e).__name__}
        break
print(json.dumps(out))
"""
)


def _last_json(text: str) -> dict[str, Any]:
    got: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
    return got


def _project(tmp_path: pathlib.Path, plan: str, transforms: str = "") -> Repo:
    repo = Repo.init(tmp_path / "repo")
    repo.write(
        {
            "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG"]\n',
            "pkg/__init__.py": "",
            "pkg/t.py": transforms,
            "plan.py": plan,
            "dodo.py": DODO,
        }
    )
    return repo


def _check(repo: Repo, tmp_path: pathlib.Path) -> dict[str, Any]:
    """Build, then compare every stage's served result with plain datasets'. Where plain
    datasets raised, the build must have failed and that stage must serve nothing."""
    repo.commit("state")
    plain = _last_json(_python(PLAIN, repo.path, plain=True))
    built = doit(repo, "run", "preprocess", log=tmp_path / "calls.log", check=False)
    served = _last_json(_python(SERVED, repo.path))
    failed = [n for n, d in plain.items() if "error" in d]
    if failed:
        assert built.returncode != 0, (failed, built.stdout)
        assert "error" in served[failed[0]], (failed, served)
        for name in plain:
            if name not in failed:
                assert served[name] == plain[name], name
    else:
        assert built.returncode == 0, built.stderr
        for name in plain:
            assert served[name] == plain[name], name
    return plain


def _parquet(repo: Repo, name: str, cols: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (repo.path / "data").mkdir(exist_ok=True)
    pq.write_table(pa.table(cols), repo.path / "data" / name)


GROUP_TEXTS = """
from itertools import chain

BLOCK = 8


def group_texts(examples):
    # transformers' run_clm.py: concatenate a batch, cut blocks, drop the remainder
    concatenated = {"input_ids": list(chain(*examples["input_ids"]))}
    total = len(concatenated["input_ids"])
    total = (total // BLOCK) * BLOCK
    result = {
        k: [t[i : i + BLOCK] for i in range(0, total, BLOCK)] for k, t in concatenated.items()
    }
    result["labels"] = result["input_ids"].copy()
    return result


def center(batch):
    mean = sum(batch["x"]) / len(batch["x"])
    return {"c": [x - mean for x in batch["x"]]}


def batch_max(batch):
    return {"m": [max(batch["x"])] * len(batch["x"])}


def above_mean(batch):
    mean = sum(batch["x"]) / len(batch["x"])
    return [x >= mean for x in batch["x"]]
"""

BATCH_PLAN = """
from pkg import t

PLAN = [
    ("load", "raw", "parquet", "data/*.parquet", {"split": "train"}),
    ("map", "tok", "raw", t.group_texts,
     {"batched": True, "remove_columns": ["input_ids", "x"]}),
    ("map", "centered", "raw", t.center, {"batched": True, "batch_size": None}),
    ("map", "maxed", "raw", t.batch_max, {"batched": True, "batch_size": 3}),
    ("filter", "kept", "raw", t.above_mean, {"batched": True}),
]
"""


def _token_file(repo: Repo, i: int, rows: int) -> None:
    ids = [[(i * 100 + r * 7 + k) % 50 for k in range(3 + (r % 5))] for r in range(rows)]
    _parquet(repo, f"part-{i}.parquet", {"input_ids": ids, "x": [i * 10 + r for r in range(rows)]})


def test_batched_stages_cut_batches_where_datasets_does(tmp_path: pathlib.Path) -> None:
    """Seen: batches cut at file boundaries. transformers' group_texts over 4 files, a
    batch_size=None mean, batch_size=3 and a batched filter against its batch's mean equal
    plain datasets, cold and after appending a file."""
    repo = _project(tmp_path, BATCH_PLAN, GROUP_TEXTS)
    for i, rows in enumerate((7, 5, 9, 6)):
        _token_file(repo, i, rows)
    plain = _check(repo, tmp_path)
    assert len({json.dumps(r["m"]) for r in plain["maxed"]["rows"]}) > 1
    _token_file(repo, 4, 8)
    _check(repo, tmp_path)


def test_json_files_take_the_first_files_types(tmp_path: pathlib.Path) -> None:
    """Seen: schemas decided per file. JSON lines whose first file has float `x` and later
    files int `x` load as float64, as plain datasets loads them, and a map over them too;
    appending an int file keeps the result readable and equal."""
    plan = """
        from pkg import t

        PLAN = [
            ("load", "raw", "json", "data/*.jsonl", {"split": "train"}),
            ("map", "twice", "raw", t.twice, {}),
        ]
        """
    repo = _project(tmp_path, plan, "def twice(row):\n    return {'y': row['x'] * 2}\n")
    (repo.path / "data").mkdir()
    (repo.path / "data" / "a.jsonl").write_text('{"x": 1.5}\n{"x": 2.5}\n')
    (repo.path / "data" / "b.jsonl").write_text('{"x": 1}\n{"x": 2}\n')
    plain = _check(repo, tmp_path)
    assert plain["raw"]["features"] == {"x": {"dtype": "float64", "_type": "Value"}}
    (repo.path / "data" / "c.jsonl").write_text('{"x": 3}\n')
    _check(repo, tmp_path)


def test_appended_int_parquet_file_is_cast_to_the_first_files_float(
    tmp_path: pathlib.Path,
) -> None:
    """Seen: appending a file whose column is int64 to float64 files: plain datasets casts
    it to float64 (the first file's schema), and so does the served result."""
    plan = """
        PLAN = [("load", "raw", "parquet", "data/*.parquet", {})]
        """
    repo = _project(tmp_path, plan)
    _parquet(repo, "a.parquet", {"x": [0.5, 1.5]})
    _parquet(repo, "b.parquet", {"x": [2.5]})
    _check(repo, tmp_path)
    _parquet(repo, "c.parquet", {"x": [3, 4]})
    plain = _check(repo, tmp_path)
    assert plain["raw"]["parts"]["train"]["features"]["x"]["dtype"] == "float64"


def test_a_file_plain_datasets_cannot_cast_fails_the_stage(tmp_path: pathlib.Path) -> None:
    """Where plain datasets raises (a later JSON file's `x` is text where the first file's
    is a number), the build fails and the stage serves nothing."""
    plan = """
        PLAN = [("load", "raw", "json", "data/*.jsonl", {"split": "train"})]
        """
    repo = _project(tmp_path, plan)
    (repo.path / "data").mkdir()
    (repo.path / "data" / "a.jsonl").write_text('{"x": 1}\n{"x": 2}\n')
    (repo.path / "data" / "b.jsonl").write_text('{"x": "one"}\n{"x": "two"}\n')
    plain = _check(repo, tmp_path)
    assert "error" in plain["raw"]


def test_map_whose_types_differ_by_file_is_never_served_mixed(tmp_path: pathlib.Path) -> None:
    """A sharded map whose function returns int for one file's rows and float for
    another's is either equal to plain datasets or fails with a message saying what to do;
    it is never served mixed (or unreadable)."""
    plan = """
        from pkg import t

        PLAN = [
            ("load", "raw", "parquet", "data/*.parquet", {"split": "train"}),
            ("map", "half", "raw", t.half, {}),
        ]
        """
    fn = "def half(row):\n    return {'y': row['x'] // 2 if row['x'] < 10 else row['x'] / 2}\n"
    repo = _project(tmp_path, plan, fn)
    _parquet(repo, "a.parquet", {"x": [1, 2]})
    _parquet(repo, "b.parquet", {"x": [11, 13]})
    repo.commit("state")
    built = doit(repo, "run", "preprocess", log=tmp_path / "calls.log", check=False)
    served = _last_json(_python(SERVED, repo.path))
    plain = _last_json(_python(PLAIN, repo.path, plain=True))
    if built.returncode == 0:
        assert served == plain
    else:
        assert "sharded=False" in built.stdout + built.stderr
        assert "error" in served["half"]


def test_a_changed_argument_is_the_first_reason(tmp_path: pathlib.Path) -> None:
    """Seen: after editing a closure variable of a sharded stage, `explain` says first that
    the stage's code or arguments changed, and calls no data file changed or new."""
    plan = """
        from pkg import t

        PLAN = [
            ("load", "raw", "parquet", "data/*.parquet", {"split": "train"}),
            ("map", "scaled", "raw", t.scale, {}),
        ]
        """
    repo = _project(tmp_path, plan, "K = 2\n\n\ndef scale(row):\n    return {'y': row['x'] * K}\n")
    for i in range(4):
        _parquet(repo, f"train-0{i}.parquet", {"x": [i, i + 1]})
    _check(repo, tmp_path)
    repo.write({"pkg/t.py": "K = 3\n\n\ndef scale(row):\n    return {'y': row['x'] * K}\n"})
    repo.commit("K")
    out = run_hfbuild(repo, "explain", "scaled")
    text = out.stdout
    lines = text.splitlines()
    assert lines[0].endswith("What changed:"), text
    assert "code, arguments or the files it reads changed" in lines[1], text
    assert "train-00.parquet (changed)" not in text, text
    assert "(changed)" not in text and "(added)" not in text, text
    status = run_hfbuild(repo, "status").stdout
    assert "stale: its code, arguments or the files it reads changed" in status, status


def test_a_function_keeping_state_between_calls_is_not_built_file_by_file(
    tmp_path: pathlib.Path,
) -> None:
    """A filter that drops rows seen before (a module-level set it fills) depends on the
    files before each row: the sharded build refuses it with what to do, serving nothing,
    cold and after an append (where a build of the new file alone would keep its
    duplicates); with `sharded=False` it equals plain datasets."""
    plan = """
        from pkg import t

        PLAN = [
            ("load", "raw", "parquet", "data/*.parquet", {"split": "train"}),
            ("filter", "fresh", "raw", t.unseen, {}),
        ]
        """
    fn = "SEEN = set()\n\n\ndef unseen(row):\n    new = row['x'] not in SEEN\n"
    fn += "    SEEN.add(row['x'])\n    return new\n"
    repo = _project(tmp_path, plan, fn)
    _parquet(repo, "a.parquet", {"x": [1, 2, 3]})
    _parquet(repo, "b.parquet", {"x": [3, 4]})
    for step in ("cold", "append"):
        if step == "append":
            _parquet(repo, "c.parquet", {"x": [1, 5]})
        repo.commit(step)
        built = doit(repo, "run", "preprocess", log=tmp_path / "calls.log", check=False)
        assert built.returncode != 0
        assert "keeps state between calls" in built.stdout + built.stderr
        assert "sharded=False" in built.stdout + built.stderr
        served = _last_json(_python(SERVED, repo.path))
        assert "error" in served["fresh"], served
    (repo.path / "plan.py").write_text(
        (repo.path / "plan.py").read_text().replace("t.unseen, {}", 't.unseen, {"sharded": False}')
    )
    plain = _check(repo, tmp_path)
    assert [r["x"] for r in plain["fresh"]["rows"]] == [1, 2, 3, 4, 5]


def test_num_proc_of_a_batched_stage_is_in_its_key(tmp_path: pathlib.Path) -> None:
    """datasets batches within each of `num_proc` contiguous parts, so a batched map's
    result depends on `num_proc`: changing it rebuilds the stage, and each result equals
    plain datasets' with the same `num_proc`."""
    plan = """
        from pkg import t

        PLAN = [
            ("load", "raw", "parquet", "data/*.parquet", {"split": "train"}),
            ("map", "maxed", "raw", t.batch_max, {"batched": True, "batch_size": 3,
                                                  "num_proc": 2}),
        ]
        """
    repo = _project(tmp_path, plan, GROUP_TEXTS)
    _parquet(repo, "a.parquet", {"x": list(range(6))})
    _parquet(repo, "b.parquet", {"x": list(range(6, 10))})
    two = _check(repo, tmp_path)
    (repo.path / "plan.py").write_text(
        (repo.path / "plan.py").read_text().replace('"num_proc": 2', '"num_proc": 3')
    )
    three = _check(repo, tmp_path)
    assert two["maxed"]["rows"] != three["maxed"]["rows"]


def test_a_parquet_load_of_some_columns_equals_plain_datasets(tmp_path: pathlib.Path) -> None:
    """`columns=` on a sharded parquet load: the first file's features of those columns,
    as plain datasets takes them."""
    plan = """
        PLAN = [("load", "raw", "parquet", "data/*.parquet", {"columns": ["x"]})]
        """
    repo = _project(tmp_path, plan)
    _parquet(repo, "a.parquet", {"x": [0.5, 1.5], "s": ["a", "b"]})
    _parquet(repo, "b.parquet", {"x": [2, 3], "s": ["c", "d"]})
    plain = _check(repo, tmp_path)
    assert plain["raw"]["parts"]["train"]["features"] == {
        "x": {"dtype": "float64", "_type": "Value"}
    }


def test_an_empty_file_among_others_loads_as_plain_datasets(tmp_path: pathlib.Path) -> None:
    """A data file of no bytes between others (JSON lines with `features=`, so sharded)
    adds no rows, as in plain datasets; once every file is empty, the stage fails as
    plain datasets does."""
    plan = """
        from datasets import Features, Value

        PLAN = [
            ("load", "raw", "json", "data/*.jsonl",
             {"split": "train", "features": Features({"x": Value("int64")})}),
        ]
        """
    repo = _project(tmp_path, plan)
    (repo.path / "data").mkdir()
    (repo.path / "data" / "a.jsonl").write_text('{"x": 1}\n')
    (repo.path / "data" / "b.jsonl").write_text("")
    (repo.path / "data" / "c.jsonl").write_text('{"x": 3}\n')
    plain = _check(repo, tmp_path)
    assert [r["x"] for r in plain["raw"]["rows"]] == [1, 3]
    for name in ("a", "c"):
        (repo.path / "data" / f"{name}.jsonl").write_text("")
    assert "error" in _check(repo, tmp_path)["raw"]


# A spy on datasets' own `load_dataset` in the build process (it counts and delegates):
# how many datasets calls a sharded load's build makes.
COUNTING_PLAN = """
import os

import datasets

if os.environ.get("CALL_LOG"):
    _real = datasets.load_dataset

    def _counted(*args, **kwargs):
        with open(os.environ["CALL_LOG"], "a") as f:
            f.write("load_dataset\\n")
        return _real(*args, **kwargs)

    datasets.load_dataset = _counted

PLAN = [
    ("load", "raw", "parquet", "data/*.parquet", {"split": "train"}),
    ("map", "twice", "raw", t.twice, {}),
]
"""


def test_missing_load_shards_are_one_load_dataset_cut_by_file(tmp_path: pathlib.Path) -> None:
    """A sharded parquet load's missing shards are loaded by one `load_dataset` over their
    files (not one call a file), cut into shards by each file's rows: files of several row
    groups, a file of one row and an int file among float ones give each
    shard its file's rows, and the served result is plain datasets' (cold, and after two
    files are appended: one more call for both). (A parquet file of no rows is left out:
    plain datasets' parquet reader aborts on its empty row group.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    plan = "from pkg import t\n" + COUNTING_PLAN
    fn = "def twice(row):\n    return {'y': row['x'] * 2}\n"
    repo = _project(tmp_path, plan, fn)
    (repo.path / "data").mkdir()
    pq.write_table(
        pa.table({"x": [0.5 + i for i in range(7)]}),
        repo.path / "data" / "a.parquet",
        row_group_size=2,
    )
    _parquet(repo, "c.parquet", {"x": [9.5]})
    _parquet(repo, "d.parquet", {"x": [1, 2, 3]})
    log = tmp_path / "calls.log"
    _check(repo, tmp_path)
    assert log.read_text().split().count("load_dataset") == 1
    pq.write_table(
        pa.table({"x": [4.5, 5.5, 6.5]}), repo.path / "data" / "e.parquet", row_group_size=1
    )
    _parquet(repo, "f.parquet", {"x": [7, 8]})
    log.unlink()
    _check(repo, tmp_path)
    assert log.read_text().split().count("load_dataset") == 1
    listed = _python(SHARD_ROWS, repo.path).strip().splitlines()[-1]
    assert json.loads(listed) == {
        "data/a.parquet": 7,
        "data/c.parquet": 1,
        "data/d.parquet": 3,
        "data/e.parquet": 3,
        "data/f.parquet": 2,
    }


SHARD_ROWS = """
import json, warnings
warnings.simplefilter("ignore")
import dodo

doc = dodo.pipe.store.read_manifest(dodo.pipe["raw"].fingerprint)
print(json.dumps({row[2]: row[4]["rows"] for row in doc["shards"]}))
"""


UNITS_FNS = (
    GROUP_TEXTS
    + """

def batch_max_at(batch, idx):
    return {"m": [max(batch["x"])] * len(batch["x"]), "at": [min(idx)] * len(idx)}
"""
)

UNITS_PLAN = """
from pkg import t

PLAN = [
    ("load", "raw", "parquet", "data/*.parquet", {"split": "train"}),
    ("map", "tok", "raw", t.group_texts,
     {"batched": True, "batch_size": 4, "remove_columns": ["input_ids", "x"]}),
    ("map", "maxed", "raw", t.batch_max_at,
     {"batched": True, "batch_size": 3, "with_indices": True}),
    ("filter", "kept", "maxed", t.above_mean, {"batched": True, "batch_size": 5}),
    ("map", "whole", "raw", t.center, {"batched": True, "batch_size": None}),
]
"""

UNITS_BUILT = """
import json, warnings
warnings.simplefilter("ignore")
import dodo

out = {}
for name in ("tok", "maxed", "kept", "whole"):
    doc = dodo.pipe.store.read_manifest(dodo.pipe[name].fingerprint)
    listed = doc.get("shards")
    out[name] = None if listed is None else [doc["shards_built"], len(listed)]
print(json.dumps(out))
"""


def test_batched_stages_are_built_by_batch_aligned_units(tmp_path: pathlib.Path) -> None:
    """A batched map or filter over a sharded input is built as units: the batches that
    start in each input shard, at the global offsets datasets cuts batches at (a batch
    straddling files reads into the next). Cold and after appending a file the result is
    plain datasets' (group_texts with batches of 4, a `with_indices` batch max with batches
    of 3, a batched filter over it); the append builds at most 2 units of each batched stage
    (the last old one, whose last batch reads into the new file, and those starting in the
    new file); `batch_size=None` is built whole."""
    repo = _project(tmp_path, UNITS_PLAN, UNITS_FNS)
    for i, rows in enumerate((7, 5, 9, 6)):
        _token_file(repo, i, rows)
    _check(repo, tmp_path)
    cold = _last_json(_python(UNITS_BUILT, repo.path))
    assert cold["whole"] is None
    for name in ("tok", "maxed", "kept"):
        assert cold[name] is not None and cold[name][0] == cold[name][1] >= 4, (name, cold)
    _token_file(repo, 4, 2)
    _check(repo, tmp_path)
    again = _last_json(_python(UNITS_BUILT, repo.path))
    for name in ("tok", "maxed", "kept"):
        built, total = again[name]
        assert 1 <= built <= 2 and total >= cold[name][1], (name, again)


def test_a_glob_of_only_hidden_files_fails_with_datasets_error(tmp_path: pathlib.Path) -> None:
    """A glob whose only matches are files datasets leaves out (hidden ones) fails
    the load stage as plain datasets fails it: its exception type (which depends on the
    builder: ValueError for parquet, StopIteration for JSON lines) is in the message, with
    hfbuild's saying which pattern matched nothing."""
    for builder, name, text in (
        ("parquet", ".a.parquet", None),
        ("json", ".b.jsonl", '{"x": 1}\n'),
    ):
        where = tmp_path / builder
        pattern = "data/*.parquet" if builder == "parquet" else "data/*.jsonl"
        plan = f'PLAN = [("load", "raw", "{builder}", "{pattern}", {{"split": "train"}})]\n'
        repo = _project(where, plan)
        if text is None:
            _parquet(repo, name, {"x": [1, 2]})
        else:
            (repo.path / "data").mkdir()
            (repo.path / "data" / name).write_text(text)
        repo.commit("state")
        plain = _last_json(_python(PLAIN, repo.path, plain=True))
        built = doit(repo, "run", "preprocess", log=where / "calls.log", check=False)
        assert built.returncode != 0
        said = built.stdout + built.stderr
        assert f"{plain['raw']['error']}" in said, (plain, said)
        assert f"'{pattern}' matches no file" in said
