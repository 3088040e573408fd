"""Early cutoff (issue #19): a stage's key holds its inputs' results, so a rebuild whose
result is unchanged stops there. Real git repositories, real `doit run` processes, real
`datasets`; transform calls counted per stage through a call log."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from tests.helpers import Repo, read_python, run_hfbuild
from tests.pipeline_project import calls, doit

LOG = """
    import os

    def log(stage):
        with open(os.environ["CALL_LOG"], "a") as f:
            f.write(stage + "\\n")
    """

FILES = {
    "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG"]\n',
    "prep/__init__.py": "",
    "prep/log.py": LOG,
    "prep/text.py": """
        from prep.log import log

        def clean(batch):
            log("clean")
            return {"text": [t.strip().lower() for t in batch["text"]]}
        """,
    "prep/keep.py": """
        from prep.log import log

        def keep(batch):
            log("kept")
            return [len(t) > 6 for t in batch["text"]]
        """,
    "prep/tok.py": """
        from prep.log import log

        def tok(batch):
            log("tok")
            return {"n": [len(t.split()) for t in batch["text"]]}
        """,
    "prep/group.py": """
        from prep.log import log

        def group(ds):
            log("grouped")
            return ds.sort("n")
        """,
    "dodo.py": """
        from hfbuild import Pipeline
        from prep import group, keep, text, tok

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        clean = pipe.map("clean", raw, text.clean, batched=True)
        kept = pipe.filter("kept", clean, keep.keep, batched=True)
        toks = pipe.map("tok", kept, tok.tok, batched=True)
        grouped = pipe.apply("grouped", toks, group.group)


        def task_preprocess():
            yield from pipe.tasks()
        """,
}

TEXTS = [f"  Row {i} {'word ' * (i % 5)}END " for i in range(30)]


def plain(texts: list[str]) -> dict[str, Any]:
    """The chain computed by hand, without hfbuild or datasets."""
    clean = [t.strip().lower() for t in texts]
    kept = [t for t in clean if len(t) > 6]
    n = [len(t.split()) for t in kept]
    order = sorted(range(len(n)), key=lambda i: n[i])  # Dataset.sort is stable
    return {"clean": clean, "tok": n, "grouped": [kept[i] for i in order]}


def make(repo: Repo, texts: list[str] = TEXTS) -> Repo:
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo.write(FILES)
    (repo.path / "data").mkdir(exist_ok=True)
    pq.write_table(pa.table({"text": texts}), repo.path / "data" / "part-0.parquet")
    repo.commit("project")
    return repo


READ = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
p = dodo.pipe
print(json.dumps({"clean": list(p.result("clean")["text"]), "tok": list(p.result("tok")["n"]),
                  "grouped": list(p.result("grouped")["text"])}))
"""


def results(repo: Repo) -> dict[str, Any]:
    out = read_python(READ, repo.path, env={"CALL_LOG": os.devnull})  # fails on an error
    got: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def status_lines(repo: Repo) -> dict[str, str]:
    out = run_hfbuild(repo, "status")
    lines = [ln.split(None, 1) for ln in out.stdout.splitlines() if ln[:1].strip()]
    return {p[0]: p[1].strip() for p in lines if len(p) == 2 and not p[0].startswith("Run")}


def comment(repo: Repo, path: str, text: str = "# a comment: nothing else\n") -> None:
    f = repo.path / path
    f.write_text(text + f.read_text())


def test_a_comment_upstream_rebuilds_that_stage_only(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A committed comment in the first map's module rebuilds that stage alone (its calls
    counted per stage): the filter, tokenizer and apply after it are cut off. `status` says
    so before the rebuild and `explain` after it, and the results equal a build by hand."""
    make(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "first")
    assert calls(tmp_path / "first") == {"clean": 1, "kept": 1, "tok": 1, "grouped": 1}

    comment(repo, "prep/text.py")
    repo.commit("a comment")
    before = status_lines(repo)
    assert before["clean"].startswith("stale: code file prep/text.py changed"), before
    assert before["kept"] == "stale: input 'clean' is being rebuilt (may be cut off)", before
    assert before["tok"] == "stale: input 'kept' is being rebuilt (may be cut off)", before

    out = doit(repo, "run", "preprocess", log=tmp_path / "second")
    assert calls(tmp_path / "second") == {"clean": 1}, out.stdout + out.stderr
    assert "clean: built" in out.stdout
    assert "-- preprocess:kept" in out.stdout and "-- preprocess:grouped" in out.stdout
    assert all(v == "up to date" for v in status_lines(repo).values()), status_lines(repo)
    said = run_hfbuild(repo, "explain", "kept").stdout
    assert (
        "stage 'kept' is up to date: input clean was rebuilt (code file prep/text.py changed) "
        "and gave identical data: nothing to do." in said
    ), said
    assert results(repo) == plain(TEXTS)

    # And with nothing changed since, nothing runs.
    doit(repo, "run", "preprocess", log=tmp_path / "third")
    assert calls(tmp_path / "third") == Counter()


def _arrow_copies(repo: Repo) -> tuple[dict[bytes, set[int]], int]:
    """The store's Arrow files: their rows' bytes -> the inodes holding them; how many files."""
    import re

    out: dict[bytes, set[int]] = {}
    n = 0
    for f in sorted((repo.path / ".hfbuild" / "objects").rglob("*.arrow")):
        # The key datasets writes into the schema's metadata aside, the rows' bytes.
        rows = re.sub(rb'"fingerprint": "[0-9a-f]{32}"', b"", f.read_bytes())
        out.setdefault(rows, set()).add(f.stat().st_ino)
        n += 1
    return out, n


def test_equal_results_are_stored_once(repo: Repo, tmp_path: pathlib.Path) -> None:
    """The stage a comment rebuilt gives its result under a new key: the store keeps one
    copy of its data (the two entries' Arrow files are one file), both entries pass the
    full check, and once gc removes the old entry the new one is intact and served."""
    make(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "first")
    old = json.loads((repo.path / "hfbuild.lock").read_text())["stages"]
    copies, files = _arrow_copies(repo)
    comment(repo, "prep/text.py")
    repo.commit("a comment")
    doit(repo, "run", "preprocess", log=tmp_path / "second")
    new = json.loads((repo.path / "hfbuild.lock").read_text())["stages"]
    assert old["clean"]["fingerprint"] != new["clean"]["fingerprint"]
    assert old["clean"]["content_hash"] == new["clean"]["content_hash"]
    copies, more = _arrow_copies(repo)
    assert more > files  # the new entry's files are there ...
    assert all(len(inodes) == 1 for inodes in copies.values()), copies.values()  # ... once
    assert len(copies) < more  # (one file holds both entries' rows)
    deep = run_hfbuild(repo, "verify", "--deep")
    assert deep.returncode == 0, deep.stdout + deep.stderr

    gone = run_hfbuild(repo, "gc", "--keep-days", "0")
    assert gone.returncode == 0, gone.stderr
    assert not list((repo.path / ".hfbuild" / "content").rglob("*")) or all(
        (repo.path / ".hfbuild" / "objects" / p.read_text()[:2] / p.read_text().strip()).is_dir()
        for p in (repo.path / ".hfbuild" / "content").rglob("*")
        if p.is_file()
    )
    assert all(v == "up to date" for v in status_lines(repo).values()), status_lines(repo)
    assert results(repo) == plain(TEXTS)
    deep = run_hfbuild(repo, "verify", "--deep")
    assert deep.returncode == 0, deep.stdout + deep.stderr


def test_a_comment_in_a_stage_built_by_batch_units_is_cut_off(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """Over a load of two files (sharded), the batched stages are built by batch-aligned
    units (`batchunits`): a comment in the first map's module rebuilds its unit, whose
    list of units records their form, so the stages after it are cut off; the results
    equal a build by hand."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo.write(FILES)
    (repo.path / "data").mkdir()
    for i, part in enumerate((TEXTS[:12], TEXTS[12:])):
        pq.write_table(pa.table({"text": part}), repo.path / "data" / f"part-{i}.parquet")
    repo.commit("project")
    out = doit(repo, "run", "preprocess", log=tmp_path / "first")
    assert calls(tmp_path / "first") == {"clean": 1, "kept": 1, "tok": 1, "grouped": 1}
    assert "clean: built 1 of 1 shard (30 rows)" in out.stdout, out.stdout

    comment(repo, "prep/text.py")
    repo.commit("a comment")
    out = doit(repo, "run", "preprocess", log=tmp_path / "second")
    assert calls(tmp_path / "second") == {"clean": 1}, out.stdout + out.stderr
    assert "clean: built 1 of 1 shard (30 rows)" in out.stdout, out.stdout
    assert all(v == "up to date" for v in status_lines(repo).values()), status_lines(repo)
    assert results(repo) == plain(TEXTS)


def test_a_refactor_that_changes_the_output_rebuilds_downstream(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A change to the first map that changes its output rebuilds every stage after it,
    with `status` saying so after the rebuild as before it."""
    make(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "first")
    repo.write(
        {
            "prep/text.py": """
                from prep.log import log

                def clean(batch):
                    log("clean")
                    return {"text": [t.strip().upper() for t in batch["text"]]}
                """
        },
        commit="upper case",
    )
    out = doit(repo, "run", "preprocess", log=tmp_path / "second")
    assert calls(tmp_path / "second") == {"clean": 1, "kept": 1, "tok": 1, "grouped": 1}, out.stdout
    want = plain([t.upper() for t in TEXTS])
    assert results(repo) == {
        k: [x.upper() if isinstance(x, str) else x for x in v] for k, v in want.items()
    }
    said = run_hfbuild(repo, "explain", "kept").stdout
    assert "nothing changed since it was built" in said, said


def test_a_refactor_with_the_same_output_is_cut_off_and_a_later_real_change_is_not(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A rewrite of the filter that keeps the same rows is cut off at the filter; then a
    data edit that changes the rows rebuilds everything, whatever was cut off before."""
    make(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "first")
    repo.write(
        {
            "prep/keep.py": """
                from prep.log import log

                def keep(batch):
                    log("kept")
                    return [not len(t) <= 6 for t in batch["text"]]
                """
        },
        commit="refactor keep",
    )
    doit(repo, "run", "preprocess", log=tmp_path / "second")
    assert calls(tmp_path / "second") == {"kept": 1}
    texts = [*TEXTS[:-1], "  Row 29 a changed row END "]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), repo.path / "data" / "part-0.parquet")
    repo.commit("data edit")
    doit(repo, "run", "preprocess", log=tmp_path / "third")
    assert calls(tmp_path / "third") == {"clean": 1, "kept": 1, "tok": 1, "grouped": 1}
    assert results(repo) == plain(texts)


SHARDED = {
    "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG"]\n',
    "prep/__init__.py": "",
    "prep/log.py": LOG,
    "prep/shape.py": """
        from prep.log import log

        def length(row):
            log("length")
            return {"n": len(row["text"])}

        def long(row):
            log("long")
            return row["n"] > 8
        """,
    "dodo.py": """
        from hfbuild import Pipeline
        from prep import shape

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        lengths = pipe.map("lengths", raw, shape.length, remove_columns=["text"])
        longs = pipe.filter("longs", lengths, shape.long)


        def task_preprocess():
            yield from pipe.tasks()
        """,
}


def _texts(part: int, letter: str = "a") -> list[str]:
    return [letter * (part * 3 + i) for i in range(5)]


def test_a_shard_whose_output_is_identical_builds_nothing_downstream(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A sharded chain over three files: one file edited so that its rows have other texts
    of the same lengths. Its load shard and its length shard are built again (5 calls, its
    rows); the length shard's output is the same, so the filter builds nothing for it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo.write(SHARDED)
    (repo.path / "data").mkdir()
    for part in range(3):
        pq.write_table(pa.table({"text": _texts(part)}), repo.path / f"data/part-{part}.parquet")
    repo.commit("project")
    doit(repo, "run", "preprocess", log=tmp_path / "first")
    assert calls(tmp_path / "first") == {"length": 15, "long": 15}

    pq.write_table(pa.table({"text": _texts(1, "b")}), repo.path / "data/part-1.parquet")
    repo.commit("same lengths, other letters")
    assert status_lines(repo)["longs"] == (
        "stale: input 'lengths' is being rebuilt (may be cut off)"
    )
    out = doit(repo, "run", "preprocess", log=tmp_path / "second")
    assert calls(tmp_path / "second") == {"length": 5}, out.stdout + out.stderr
    assert "raw: built 1 of 3 shards" in out.stdout
    assert "lengths: built 1 of 3 shards" in out.stdout
    assert "-- preprocess:longs" in out.stdout
    got = subprocess.run(
        [
            sys.executable,
            "-c",
            "import dodo, json; print(json.dumps(list(dodo.pipe.result('longs')['n'])))",
        ],
        cwd=repo.path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo.path), "CALL_LOG": os.devnull},
        check=True,
    )
    lengths = [len(t) for part in range(3) for t in _texts(part)]
    assert json.loads(got.stdout.strip().splitlines()[-1]) == [n for n in lengths if n > 8]


def test_a_fresh_clone_pulls_what_a_cut_off_left_on_the_remote(
    repo: Repo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Everything pushed to a file:// remote; a comment in the first map's module, rebuilt and
    only that stage pushed. A fresh clone of the commit pulls every stage (the stages after
    the comment under the keys they had) and runs no transform."""
    remote = tmp_path / "remote"
    monkeypatch.setenv("HFBUILD_REMOTE", f"file://{remote}")
    make(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "first")
    assert run_hfbuild(repo, "push").returncode == 0
    comment(repo, "prep/text.py")
    repo.commit("a comment")
    doit(repo, "run", "preprocess", log=tmp_path / "second")
    assert calls(tmp_path / "second") == {"clean": 1}
    pushed = run_hfbuild(repo, "push", "clean")
    assert pushed.returncode == 0, pushed.stderr
    repo.git("add", "hfbuild.lock")
    repo.commit("rebuilt")

    clone = repo.clone(tmp_path / "clone")
    out = doit(clone, "run", "preprocess", log=tmp_path / "clone.log")
    assert calls(tmp_path / "clone.log") == Counter(), out.stdout + out.stderr
    assert out.stdout.count("pulled") == 5, out.stdout
    assert results(clone) == plain(TEXTS)
    assert run_hfbuild(clone, "verify").returncode == 0


HOOK_PROJECT = {
    "textproj/__init__.py": "",
    "textproj/clean.py": """
        import os

        def norm(batch):
            with open(os.environ["CALL_LOG"], "a") as f:
                f.write("norm\\n")
            return {"text": [t.lower() for t in batch["text"]]}
        """,
    "textproj/count.py": """
        import os

        def words(batch):
            with open(os.environ["CALL_LOG"], "a") as f:
                f.write("words\\n")
            return {"n_words": [len(t.split()) for t in batch["text"]]}
        """,
    "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG"]\n',
    "dodo.py": """
        from hfbuild import Pipeline
        from textproj import clean, count

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        normed = pipe.map("normed", raw, clean.norm, batched=True)
        words = pipe.map("words", normed, count.words, batched=True)


        def task_preprocess():
            yield from pipe.tasks()
        """,
    ".gitignore": ".venv/\nvenv/\n.hfbuild/\n.doit.db*\n",
}


def test_the_shipped_hook_accepts_a_comment_once_the_one_stage_is_rebuilt(
    tmp_path: pathlib.Path,
) -> None:
    """The real pre-commit framework with the shipped hook: a staged comment in the first
    map's module is refused until `doit run` has rebuilt that one stage (the stage after it
    is cut off, its lock entry's key unchanged); then the commit passes."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from tests import test_hook_shipped as shipped

    hooks, rev = shipped.hooks_repo(tmp_path)
    repo = Repo.init(tmp_path / "proj")
    repo.write(HOOK_PROJECT)
    (repo.path / "data").mkdir()
    pq.write_table(
        pa.table({"text": [f"Row {i} Has {'Some ' * i}Words" for i in range(20)]}),
        repo.path / "data" / "part-0.parquet",
    )
    cfg = {"repos": [{"repo": str(hooks), "rev": rev, "hooks": [{"id": "hfbuild-verify"}]}]}
    (repo.path / ".pre-commit-config.yaml").write_text(yaml.safe_dump(cfg))
    python = shipped.make_venv(repo.path / ".venv", with_hfbuild=True)
    env = {**shipped.user_env(), "CALL_LOG": str(tmp_path / "calls")}
    subprocess.run(
        [str(shipped.PRE_COMMIT), "install"],
        cwd=repo.path,
        check=True,
        capture_output=True,
        env=env,
    )

    def build() -> Counter[str]:
        (tmp_path / "calls").unlink(missing_ok=True)
        out = subprocess.run(
            [str(python), "-m", "doit", "run", "preprocess"],
            cwd=repo.path,
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return calls(tmp_path / "calls")

    assert build() == {"norm": 1, "words": 1}
    repo.git("add", "-A")
    first = shipped.commit(repo, "project, built", env)
    assert first.returncode == 0, first.stdout + first.stderr
    words_key = json.loads((repo.path / "hfbuild.lock").read_text())["stages"]["words"]

    comment(repo, "textproj/clean.py")
    repo.git("add", "textproj/clean.py")
    refused = shipped.commit(repo, "a comment, not rebuilt", env)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0, said
    assert "stage 'normed' was not built from the staged code" in said, said

    assert build() == {"norm": 1}
    lock = json.loads((repo.path / "hfbuild.lock").read_text())["stages"]
    assert lock["words"]["fingerprint"] == words_key["fingerprint"]
    repo.git("add", "hfbuild.lock")
    accepted = shipped.commit(repo, "a comment, rebuilt", env)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "hfbuild verify --staged" in accepted.stdout + accepted.stderr  # the hook ran
    shutil.rmtree(repo.path / ".hfbuild")  # a clone without the store: CI's `verify`
    assert run_hfbuild(repo, "verify").returncode == 0
