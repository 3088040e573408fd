"""Paths in arguments: a string in `fn_kwargs`, a closure cell, a partial's arguments or a
module constant that names a project file or directory keys its content from the first
build on, whoever opens it (here Rust: `tokenizers.Tokenizer.from_file`), with run-time
observation off. Real repositories, real `doit` runs in fresh processes."""

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

from hfbuild.keys import argpaths
from hfbuild.source.datafiles import StatCache
from hfbuild.source.gitstate import Snapshot
from tests.helpers import Repo, read_python, run_python
from tests.pipeline_project import calls

FILES = {
    "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG"]\n',
    "pkg/__init__.py": "",
    "pkg/transforms.py": """
        import os

        from tokenizers import Tokenizer

        TOKENIZER = "tok/tokenizer.json"


        def log(stage):
            with open(os.environ["CALL_LOG"], "a") as f:
                f.write(stage + "\\n")


        def by_arg(batch, tokenizer_path):
            log("by_arg")
            tok = Tokenizer.from_file(tokenizer_path)  # Rust opens the file
            return {"ids": [tok.encode(t).ids for t in batch["text"]]}


        def by_constant(batch):
            log("by_constant")
            tok = Tokenizer.from_file(TOKENIZER)
            return {"ids": [tok.encode(t).ids for t in batch["text"]]}


        def by_folder(batch, folder):
            log("by_folder")
            total = sum(
                int(open(os.path.join(folder, n)).read()) for n in sorted(os.listdir(folder))
            )
            return {"total": [total] * len(batch["text"])}
        """,
    "lookups/a.txt": "1\n",
    "dodo.py": """
        from hfbuild import Pipeline
        from pkg import transforms as t

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/part-0.parquet", split="train")
        pipe.map("by_arg", raw, t.by_arg, {"tokenizer_path": "tok/tokenizer.json"}, batched=True)
        pipe.map("by_constant", raw, t.by_constant, batched=True)
        pipe.map("by_folder", raw, t.by_folder, {"folder": "lookups"}, batched=True)


        def task_preprocess():
            yield from pipe.tasks()
        """,
    ".gitignore": ".hfbuild/\n.doit.db*\n__pycache__/\n",
}
TEXTS = ["alpha beta", "beta gamma", "gamma delta alpha"]
STAGES = ["by_arg", "by_constant", "by_folder"]


def train(path: pathlib.Path, corpus: list[str]) -> list[list[int]]:
    """A word-level tokenizer trained on `corpus`, saved at `path`; TEXTS' ids under it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return [tok.encode(t).ids for t in TEXTS]


FIRST = ["alpha alpha alpha beta beta gamma delta"]
SECOND = ["delta delta delta gamma gamma beta alpha omega omega omega omega"]


def doit(
    path: pathlib.Path, log: pathlib.Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`doit run` with run-time observation off (HFBUILD_OBSERVE=0): only the static key."""
    out = subprocess.run(
        [sys.executable, "-m", "doit", "run", "preprocess"],
        cwd=path,
        env={**os.environ, "CALL_LOG": str(log), "HFBUILD_OBSERVE": "0", **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, f"doit failed:\n{out.stdout}\n{out.stderr}"
    return out


def hfbuild(path: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(pathlib.Path(sys.executable).parent / "hfbuild"), *args],
        cwd=path,
        env={**os.environ, "CALL_LOG": os.devnull, "HFBUILD_OBSERVE": "0"},
        capture_output=True,
        text=True,
        check=False,
    )


def column(path: pathlib.Path, stage: str, col: str) -> list[Any]:
    out = read_python(
        f"""
        import json, warnings
        warnings.simplefilter("ignore")
        import dodo
        print(json.dumps(list(dodo.pipe.result({stage!r})[{col!r}])))
        """,
        path,
        env={"CALL_LOG": os.devnull},
    )
    values: list[Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return values


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, list[list[int]]]:
    """The project with its first tokenizer, committed and built once (observation off)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = tmp_path_factory.mktemp("argpaths")
    path = base / "repo"
    repo = Repo.init(path)
    repo.write(FILES)
    ids = train(path / "tok" / "tokenizer.json", FIRST)
    (path / "data").mkdir()
    pq.write_table(pa.table({"text": TEXTS}), path / "data" / "part-0.parquet")
    repo.commit("project")
    doit(path, base / "build.log")
    assert set(calls(base / "build.log")) == set(STAGES)
    return path, ids


@pytest.fixture
def project(
    built: tuple[pathlib.Path, list[list[int]]], tmp_path: pathlib.Path
) -> tuple[Repo, list[list[int]]]:
    """A private copy of the built project (repository and store)."""
    path = tmp_path / "repo"
    shutil.copytree(built[0], path, symlinks=True)
    return Repo(path), built[1]


def test_tokenizer_path_argument_keys_the_file_without_observation(
    project: tuple[Repo, list[list[int]]], tmp_path: pathlib.Path
) -> None:
    """A tokenizer opened by Rust through a path in fn_kwargs: retrained and committed, the
    stage is stale (explain names the argument, the file and both ids) and the first build
    after the change serves the new ids, with HFBUILD_OBSERVE=0."""
    repo, first = project
    assert column(repo.path, "by_arg", "ids") == first
    old = repo.git("rev-parse", "HEAD:tok/tokenizer.json")
    second = train(repo.path / "tok" / "tokenizer.json", SECOND)
    assert second != first
    repo.commit("retrain")
    new = repo.git("rev-parse", "HEAD:tok/tokenizer.json")

    ex = hfbuild(repo.path, "explain", "by_arg")
    assert ex.returncode == 1, ex.stdout
    line = (
        f"argument fn_kwargs['tokenizer_path'] names tok/tokenizer.json: "
        f"changed {old[:12]} -> {new[:12]}"
    )
    assert line in ex.stdout, ex.stdout
    doit(repo.path, tmp_path / "rebuild.log")
    assert calls(tmp_path / "rebuild.log") == Counter(["by_arg", "by_constant"])
    assert column(repo.path, "by_arg", "ids") == second
    doit(repo.path, tmp_path / "again.log")
    assert calls(tmp_path / "again.log") == Counter()  # keyed, not re-read every time


def test_tokenizer_path_module_constant_keys_the_file(
    project: tuple[Repo, list[list[int]]], tmp_path: pathlib.Path
) -> None:
    """The same path as a module constant the transform reads (equal to its source, so not
    a module value): the file's content is in the key, and explain names the constant."""
    repo, first = project
    assert column(repo.path, "by_constant", "ids") == first
    second = train(repo.path / "tok" / "tokenizer.json", SECOND)
    repo.commit("retrain")
    ex = hfbuild(repo.path, "explain", "by_constant")
    assert "module value pkg.transforms.TOKENIZER names tok/tokenizer.json: changed" in ex.stdout
    doit(repo.path, tmp_path / "rebuild.log")
    assert calls(tmp_path / "rebuild.log")["by_constant"] == 1
    assert column(repo.path, "by_constant", "ids") == second


def test_directory_argument_gaining_a_file_rebuilds(
    project: tuple[Repo, list[list[int]]], tmp_path: pathlib.Path
) -> None:
    """A directory named by an argument is keyed by its files: one added (uncommitted, like
    a data file) rebuilds the stage, explain names the new file, and only that stage."""
    repo, _ = project
    assert column(repo.path, "by_folder", "total") == [1, 1, 1]
    (repo.path / "lookups" / "b.txt").write_text("10\n")
    ex = hfbuild(repo.path, "explain", "by_folder")
    assert "argument fn_kwargs['folder'] names lookups/: lookups/b.txt added (" in ex.stdout
    doit(repo.path, tmp_path / "rebuild.log")
    assert calls(tmp_path / "rebuild.log") == Counter(["by_folder"])
    assert column(repo.path, "by_folder", "total") == [11, 11, 11]


def test_keys_hold_no_absolute_path_and_outside_paths_are_not_keyed(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """An absolute path inside the project is keyed under its repo-relative name, as is a
    closure cell, a partial's keyword and a dict key; a path outside the project (said in a
    sentence the build warns with), the project root itself, `.git` and strings naming
    nothing are not keyed."""
    repo.write({"tok/t.json": "{}\n", "lookups/a.txt": "1\n"}, commit="files")
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    root = str(repo.path.resolve())
    cell = "tok/t.json"
    tree = {
        "fn_kwargs": {
            "dict": [
                ["abs", f"{root}/lookups"],
                ["outside", str(outside)],
                ["root", "."],
                ["git", ".git/HEAD"],
                ["column", "text"],
                ["./tok/t.json", 1],
            ]
        },
        "closure": {"cell": cell},
        "partial": {"keywords": {"dict": [["p", {"path": ["<root>", "tok/t.json"]}]]}},
    }
    snap = Snapshot(root)
    outside_lines: list[str] = []
    part = argpaths.paths_part([("argument ", tree)], snap, StatCache(None), (), outside_lines)
    blob = repo.git("rev-parse", "HEAD:tok/t.json")
    a_txt = repo.git("rev-parse", "HEAD:lookups/a.txt")
    assert part == [
        ["argument closure.cell", "tok/t.json", blob],
        ["argument fn_kwargs['./tok/t.json']", "tok/t.json", blob],
        ["argument fn_kwargs['abs']", "lookups", {"dir": [["a.txt", a_txt]]}],
        ["argument partial.keywords['p']", "tok/t.json", blob],
    ]
    assert root not in json.dumps(part)
    assert outside_lines == [
        f"argument fn_kwargs['outside'] names {outside}, outside the project: its content is "
        f"not in the key, so a change to it does not rebuild the stage; move it into the "
        f"project to have it keyed"
    ]


def test_a_string_naming_nothing_is_not_statted(repo: Repo) -> None:
    """The cheap test before any stat: a string is a candidate only when its first component
    is a name in the project root and it stays inside the root once normalized."""
    repo.write({"tok/t.json": "{}\n"}, commit="files")
    names = argpaths.Names(Snapshot(str(repo.path)))
    assert names.rel("text") is None
    assert names.rel("tok/t.json") == "tok/t.json"
    assert names.rel("tok/../tok/t.json") == "tok/t.json"
    assert names.rel("tok/../../x") is None
    assert names.rel("/etc/passwd") is None
    assert names.rel("x" * 5000) is None


def test_ray_worker_receives_the_files_arguments_name(
    repo: Repo,
    tmp_path: pathlib.Path,
    remote: str,  # tests/raycluster.py: a loopback Ray cluster and an S3 bucket
) -> None:
    """On the Ray executor, the tokenizer file an argument and a module constant name, and
    the files of a directory an argument names, travel in the unit's tree: the worker
    recomputes the key with their ids and builds with them; after a retrain the ids are the
    new ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo.write(FILES)
    first = train(repo.path / "tok" / "tokenizer.json", FIRST)
    (repo.path / "data").mkdir()
    pq.write_table(pa.table({"text": TEXTS}), repo.path / "data" / "part-0.parquet")
    repo.commit("project")
    ray = {"HFBUILD_EXECUTOR": "ray"}
    out = doit(repo.path, tmp_path / "first.log", ray)
    assert "units built on ray" in out.stderr, out.stderr
    assert set(calls(tmp_path / "first.log")) == set(STAGES)
    assert column(repo.path, "by_arg", "ids") == first
    assert column(repo.path, "by_folder", "total") == [1, 1, 1]

    second = train(repo.path / "tok" / "tokenizer.json", SECOND)
    repo.commit("retrain")
    doit(repo.path, tmp_path / "second.log", ray)
    assert calls(tmp_path / "second.log") == Counter(["by_arg", "by_constant"])
    assert column(repo.path, "by_arg", "ids") == column(repo.path, "by_constant", "ids") == second


def test_an_absolute_path_inside_the_project_gives_the_same_key_in_every_clone(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """An argument holding an absolute path inside the project (built from `__file__`, say)
    is encoded relative to the project, so two clones at different places agree; the file
    it names is keyed by content. One outside the project is not keyed, and a warning says
    so."""
    repo.write(
        {
            "t.py": """
                import os

                HERE = os.path.dirname(os.path.abspath(__file__))


                def f(batch, path):
                    return batch


                def kwargs():
                    return {"path": os.path.join(HERE, "tok", "t.json")}
                """,
            "tok/t.json": "{}\n",
        },
        commit="files",
    )
    code = """
        import json, t, hfbuild
        fp, m = hfbuild.fingerprint(t.f, t.kwargs(), return_manifest=True)
        print(json.dumps([fp, m.doc["args"], m.doc["paths"]]))
        """
    got = []
    for name in ("a", "b"):
        clone = repo.clone(tmp_path / name / "deeper")
        out = run_python(code, clone.path)
        got.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert got[0] == got[1]
    _, args, paths = got[0]
    assert args["fn_kwargs"] == {"dict": [["path", {"str-in-root": "tok/t.json"}]]}
    assert paths == [
        ["argument fn_kwargs['path']", "tok/t.json", repo.git("rev-parse", "HEAD:tok/t.json")]
    ]

    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    warned = run_python(
        f"""
        import warnings, t, hfbuild
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            _, m = hfbuild.fingerprint(t.f, {{"path": {str(outside)!r}}}, return_manifest=True)
        assert "paths" not in m.doc
        print([str(w.message) for w in caught if w.category is hfbuild.ObservationWarning])
        """,
        repo.path,
    )
    assert f"argument fn_kwargs['path'] names {outside}, outside the project" in warned.stdout


def test_every_place_the_key_holds_a_value_is_searched(repo: Repo) -> None:
    """fn_kwargs (nested), a closure cell, a partial's positional and keyword arguments, a
    bound instance's attribute, a default (the source's literal, or one a factory gave) and a
    module constant read through another module all key the file they name, each under the
    name `explain` gives it (a fresh process)."""
    repo.write(
        {
            "conf.py": 'VOCAB = ["tok/t.json", "not a path"]\n',
            "t.py": """
                import functools

                import conf


                def f(batch, path=None, extra=None):
                    return conf.VOCAB


                def closing(path):
                    def g(batch):
                        return path

                    return g


                class Reader:
                    def __init__(self, path):
                        self.path = path

                    def __call__(self, batch):
                        return self.path


                def by_default(batch, path="tok/t.json"):
                    return path


                def making(p):
                    def h(batch, path=p):
                        return path

                    return h
                """,
            "tok/t.json": "{}\n",
            "lookups/a.txt": "1\n",
        },
        commit="files",
    )
    code = """
        import functools, json, hfbuild, t
        cases = {
            "kwargs": (t.f, {"extra": {"files": ["lookups/a.txt"]}}),
            "cell": (t.closing("tok/t.json"), None),
            "partial": (functools.partial(t.f, "tok/t.json", extra="lookups"), None),
            "instance": (t.Reader("tok/t.json"), None),
            "source default": (t.by_default, None),
            "made default": (t.making("lookups"), None),
        }
        out = {}
        for name, (fn, kwargs) in cases.items():
            _, m = hfbuild.fingerprint(fn, kwargs, return_manifest=True)
            out[name] = [[w, p] for w, p, _ in m.doc.get("paths", [])]
        print(json.dumps(out))
        """
    out = run_python(code, repo.path)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    constant = ["module value conf.VOCAB[0]", "tok/t.json"]
    assert got == {
        "kwargs": [["argument fn_kwargs['extra']['files'][0]", "lookups/a.txt"], constant],
        "cell": [["argument closure.path", "tok/t.json"]],
        "partial": [
            ["argument partial.args[0]", "tok/t.json"],
            ["argument partial.keywords['extra']", "lookups"],
            constant,
        ],
        "instance": [["argument self.path", "tok/t.json"]],
        "source default": [["argument path (default of by_default)", "tok/t.json"]],
        "made default": [["argument defaults.path", "lookups"]],
    }
