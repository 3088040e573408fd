"""`doit run preprocess` builds exactly the stale stages, in real subprocesses."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

import hfbuild
from hfbuild.builds.stage import build
from tests.helpers import Repo, run_python
from tests.pipeline_project import calls, doit, expected, make_project, results

STAGES = {"raw", "feat", "kept", "split", "lens"}


@pytest.fixture
def project(repo: Repo) -> Repo:
    return make_project(repo)


def test_builds_once_then_does_nothing(project: Repo, tmp_path: pathlib.Path) -> None:
    """The first run builds every stage once, the results equal an uncached computation, and
    a second run builds nothing and prints one line per stage."""
    log = tmp_path / "calls.log"
    first = doit(project, "run", "preprocess", log=log)
    assert calls(log) == {"feat": 1, "keep": 1, "split": 1, "lens": 1}
    assert "feat: built 40 rows" in first.stdout
    got = results(project)
    exp = expected()
    assert got["feat"] == exp["feat"] and got["kept"] == exp["kept"]
    assert got["lens"] == exp["lens"]
    assert sorted(got["split"]["train"] + got["split"]["test"]) == sorted(exp["kept"])

    second = doit(project, "run", "preprocess", log=log)
    assert calls(log) == {"feat": 1, "keep": 1, "split": 1, "lens": 1}
    lines = [ln for ln in second.stdout.splitlines() if ln.strip()]
    rows = {
        "raw": "40 rows",
        "feat": "40 rows",
        "kept": "26 rows",
        "lens": "40 rows",
        "split": "train 19, test 7 rows",
    }
    assert sorted(lines) == sorted(f"-- preprocess:{s} ({rows[s]}, up to date)" for s in STAGES)


def test_helper_two_imports_away_rebuilds_downstream_only(
    project: Repo, tmp_path: pathlib.Path
) -> None:
    """Editing a constant in a module two imports away from a transform rebuilds that stage
    and everything downstream of it, and nothing else; the new results are right."""
    log = tmp_path / "calls.log"
    doit(project, "run", "preprocess", log=log)
    log.unlink()
    project.write(
        {"pkg/util/deep.py": "OFFSET = 5\n\ndef offset():\n    return OFFSET\n"}, commit="offset 5"
    )
    doit(project, "run", "preprocess", log=log)
    assert calls(log) == {"feat": 1, "keep": 1, "split": 1}
    got, exp = results(project), expected(offset=5)
    assert got["feat"] == exp["feat"] and got["kept"] == exp["kept"]


def test_changing_one_stages_arguments_rebuilds_only_it(
    project: Repo, tmp_path: pathlib.Path
) -> None:
    """Editing the arguments of a leaf stage in dodo.py rebuilds that stage alone."""
    log = tmp_path / "calls.log"
    doit(project, "run", "preprocess", log=log)
    log.unlink()
    dodo = project.path / "dodo.py"
    dodo.write_text(dodo.read_text().replace('{"scale": 1}', '{"scale": 3}'))
    doit(project, "run", "preprocess", log=log)
    assert calls(log) == {"lens": 1}
    assert results(project)["lens"] == expected(scale=3)["lens"]


def test_data_change_with_restored_mtime_rebuilds(project: Repo, tmp_path: pathlib.Path) -> None:
    """Data is identified by content: new bytes with the old mtime restored still rebuild,
    even for an untracked data file whose id comes from the stat cache."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    project.git("rm", "-q", "--cached", "data/part-0.parquet")
    project.write({".gitignore": "data/\n"}, commit="data untracked")
    log = tmp_path / "calls.log"
    doit(project, "run", "preprocess", log=log)
    f = project.path / "data" / "part-0.parquet"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))  # old enough to cache
    doit(project, "run", "preprocess", log=log)  # fills the stat cache
    log.unlink()
    st = f.stat()
    pq.write_table(pa.table({"x": [100, 101], "text": ["a", "b"]}), f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    doit(project, "run", "preprocess", log=log)
    assert calls(log)["feat"] == 1
    assert results(project)["feat"] == [200, 202]


def test_same_data_in_another_clone_is_up_to_date(project: Repo, tmp_path: pathlib.Path) -> None:
    """A second clone at another path sharing the store builds nothing: neither the checkout
    path nor file times enter a fingerprint."""
    store = tmp_path / "shared-store"
    log = tmp_path / "calls.log"
    doit(project, "run", "preprocess", log=log, env={"HFBUILD_STORE": str(store)})
    clone = project.clone(tmp_path / "elsewhere" / "clone")
    log.unlink()
    out = doit(clone, "run", "preprocess", log=log, env={"HFBUILD_STORE": str(store)})
    assert calls(log) == {}
    assert out.stdout.count("-- preprocess:") == len(STAGES)


def test_two_concurrent_cold_runs_build_each_stage_once(
    project: Repo, tmp_path: pathlib.Path
) -> None:
    """Two `doit run preprocess` started together on a cold store both succeed, every stage
    is built once between them, and the results are the uncached ones."""
    log = tmp_path / "calls.log"
    env = {**os.environ, "CALL_LOG": str(log)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "doit", "run", "preprocess"],
            cwd=project.path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert calls(log) == {"feat": 1, "keep": 1, "split": 1, "lens": 1}
    assert results(project)["kept"] == expected()["kept"]


def test_doit_list_clean_and_parallel(project: Repo, tmp_path: pathlib.Path) -> None:
    """`doit list --all` shows every stage with its doc, `doit clean` removes results from
    the store, and `doit -n 2` builds independent stages in parallel processes."""
    log = tmp_path / "calls.log"
    listing = doit(project, "list", "--all", log=log).stdout
    for s in STAGES:
        assert f"preprocess:{s}" in listing
    assert "map feat on raw" in listing
    doit(project, "run", "-n", "2", "preprocess", log=log)
    assert calls(log) == {"feat": 1, "keep": 1, "split": 1, "lens": 1}
    doit(project, "clean", "preprocess", log=log)
    log.unlink()
    doit(project, "run", "preprocess", log=log)
    assert calls(log) == {"feat": 1, "keep": 1, "split": 1, "lens": 1}


def test_uptodate_check_imports_neither_datasets_nor_pyarrow(
    project: Repo, tmp_path: pathlib.Path
) -> None:
    """A no-op `doit run` (every stage up to date) never imports datasets or pyarrow, and
    `pipe[name].fingerprint` does not either; nor what only a build or a remote's transfer
    uses (the remote's module, `concurrent.futures` and the `logging` it imports, `uuid`:
    ~10 ms of every no-op's imports)."""
    log = tmp_path / "calls.log"
    doit(project, "run", "preprocess", log=log)
    code = """
import sys, os
from doit.doit_cmd import DoitMain
from doit.cmd_base import ModuleTaskLoader
import dodo
rc = DoitMain(ModuleTaskLoader(dodo)).run(["run", "preprocess"])
fp = dodo.pipe["split"].fingerprint
print(rc, "datasets" in sys.modules, "pyarrow" in sys.modules, len(fp))
later = ("concurrent.futures", "logging", "uuid", "hfbuild.store.remote")
print([m for m in later if m in sys.modules])
"""
    out = run_python(code, project.path, env={"CALL_LOG": str(log)})
    assert out.stdout.strip().splitlines()[-2:] == ["0 False False 32", "[]"]


def test_result_of_unbuilt_stage_names_the_command(project: Repo, tmp_path: pathlib.Path) -> None:
    """Asking for a result the store lacks raises NotBuiltError naming the doit command."""
    code = """
import dodo, hfbuild
try:
    dodo.pipe.result("kept")
except hfbuild.NotBuiltError as e:
    print(e)
"""
    out = run_python(code, project.path, env={"CALL_LOG": str(tmp_path / "log")}).stdout
    assert "stage 'kept' is not built" in out
    assert "doit run preprocess:kept" in out


def test_store_is_ignored_by_git(project: Repo, tmp_path: pathlib.Path) -> None:
    """The default store (.hfbuild at the repo root) carries its own .gitignore."""
    doit(project, "run", "preprocess", log=tmp_path / "log")
    assert (project.path / ".hfbuild" / ".gitignore").read_text().strip().endswith("*")
    assert ".hfbuild" not in project.git("status", "--porcelain", "--untracked-files=all")


@pytest.mark.parametrize("name", ["1st", "has space", "a/b", "", "../x"])
def test_stage_names_must_be_identifiers(repo: Repo, name: str) -> None:
    """A stage name that is not an identifier is refused with a message saying what is
    allowed."""
    pipe = hfbuild.Pipeline(root=repo.path)
    with pytest.raises(hfbuild.StageError, match="is not valid: use letters"):
        pipe.load(name, "parquet", data_files="x.parquet")


def test_duplicate_stage_names_are_refused(repo: Repo) -> None:
    """Defining two stages under one name is an error naming the stage."""
    pipe = hfbuild.Pipeline(root=repo.path)
    pipe.load("raw", "parquet", data_files="x.parquet")
    with pytest.raises(hfbuild.StageError, match="stage 'raw' is defined twice"):
        pipe.load("raw", "csv", data_files="x.csv")


def test_missing_data_files_are_named(repo: Repo) -> None:
    """A data_files pattern that matches nothing is an error naming the pattern."""
    repo.write({"x.txt": "x"}, commit="x")
    pipe = hfbuild.Pipeline(root=repo.path, store=repo.path / "store")
    pipe.load("raw", "parquet", data_files="data/*.parquet")
    with pytest.raises(hfbuild.StageError, match=r"'data/\*\.parquet' matches no file"):
        _ = pipe["raw"].fingerprint


def test_several_inputs_dataset_dicts_and_file_deps(repo: Repo, tmp_path: pathlib.Path) -> None:
    """An apply stage joins two load stages (csv and json), a map runs over the DatasetDict a
    split produces, and a file the transform reads by itself (file_deps) rebuilds its stage
    when it changes; results equal a plain computation."""
    repo.write(
        {
            "a.csv": "x,text\n1,one\n2,two\n3,three\n",
            "b.jsonl": '{"x": 4, "text": "four"}\n{"x": 5, "text": "five"}\n',
            "stop.txt": "two\n",
            "j/__init__.py": "",
            "j/t.py": """
            import os

            def log(name):
                with open(os.environ["CALL_LOG"], "a") as f:
                    f.write(name + "\\n")

            def join(a, b):
                import datasets
                log("join")
                return datasets.concatenate_datasets([a, b.cast(a.features)])

            def split(ds):
                log("split")
                return ds.train_test_split(test_size=2, shuffle=False)

            def mark(batch, path):
                log("mark")
                stop = set(open(path).read().split())
                return {"stop": [t in stop for t in batch["text"]]}
            """,
            "dodo.py": """
            from hfbuild import Pipeline
            from j import t

            pipe = Pipeline()
            a = pipe.load("a", "csv", data_files="a.csv", split="train")
            b = pipe.load("b", "json", data_files="b.jsonl", split="train")
            both = pipe.apply("both", [a, b], t.join)
            parts = pipe.apply("parts", both, t.split)
            marked = pipe.map("marked", parts, t.mark, {"path": "stop.txt"}, batched=True,
                              file_deps=["stop.txt"])


            def task_preprocess():
                yield from pipe.tasks()
            """,
        },
        commit="multi",
    )
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    assert calls(log) == {"join": 1, "split": 1, "mark": 2}  # one call per split
    code = """
import json, dodo
dd = dodo.pipe.result("marked")
print(json.dumps({s: [list(dd[s]["text"]), list(dd[s]["stop"])] for s in sorted(dd)}))
"""
    got = json.loads(run_python(code, repo.path, env={"CALL_LOG": str(log)}).stdout)
    assert got == {
        "train": [["one", "two", "three"], [False, True, False]],
        "test": [["four", "five"], [False, False]],
    }
    log.unlink()
    (repo.path / "stop.txt").write_text("four\n")
    doit(repo, "run", "preprocess", log=log)
    assert calls(log) == {"mark": 2}
    got = json.loads(run_python(code, repo.path, env={"CALL_LOG": str(log)}).stdout)
    assert got["test"][1] == [True, False] and got["train"][1] == [False, False, False]


def test_published_files_get_ordinary_permissions(project: Repo, tmp_path: pathlib.Path) -> None:
    """The lock, refs and store entries get the modes the umask gives ordinary files and
    directories (not the owner-only modes of temporary files), so a shared store and the
    committed lock stay readable."""
    import stat

    doit(project, "run", "preprocess", log=tmp_path / "log", env={})
    mask = os.umask(0o022)
    os.umask(mask)
    store = project.path / ".hfbuild"
    entry = next((store / "objects").glob("*/*"))
    assert stat.S_IMODE((project.path / "hfbuild.lock").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((store / "refs" / "raw").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((entry / "manifest.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(entry.stat().st_mode) == 0o777 & ~mask


def test_build_reads_exactly_the_fingerprinted_files(project: Repo, tmp_path: pathlib.Path) -> None:
    """A data file that matches a load stage's glob but appears after the fingerprint was
    taken (doit takes them before building) is not read into the result filed under it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pipe = hfbuild.Pipeline(root=project.path, store=tmp_path / "store")
    pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
    fp = pipe.manifests()["raw"].fingerprint
    pq.write_table(pa.table({"x": [999], "text": ["late"]}), project.path / "data/part-1.parquet")
    report = build(pipe, "raw", record=False)
    assert report.fingerprint == fp
    assert len(pipe.store.load(fp)) == 40
