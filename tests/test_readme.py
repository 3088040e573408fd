"""The README cannot drift (issue #25 item 6): its Python examples run on a small real project,
and the statements that once did not hold are checked one by one."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.helpers import HFBUILD, Repo, run_python

README = pathlib.Path(__file__).parent.parent / "README.md"
# `<!-- readme-test: skip (why) -->` on the line before a block leaves it out. Keep it short.
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b")
BLOCK = re.compile(r"```python\n(.*?)```", re.S)

TRANSFORMS = """
def featurize(batch, k):
    return {"n": [len(t) * k for t in batch["text"]]}


def keep(ex, min_len):
    return ex["n"] >= min_len


def split(ds, seed):  # the README's load names a split: ds is a DatasetDict
    return ds["train"].train_test_split(test_size=0.5, seed=seed)
"""

# What a plain `datasets` script has before the README's lines: a dataset and a transform.
PRELUDE = """
import warnings
warnings.simplefilter("ignore")
import datasets
from myproject.transforms import featurize
ds = datasets.Dataset.from_dict({"text": ["a" * i for i in range(8)]})
"""


def python_blocks() -> list[tuple[int, str, bool]]:
    """(line, code, skipped) of each ```python block of the README."""
    text = README.read_text()
    out = []
    for m in BLOCK.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1), bool(SKIP.search(before))))
    return out


def project(repo: Repo) -> Repo:
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo.write({"myproject/__init__.py": "", "myproject/transforms.py": TRANSFORMS})
    raw = repo.path / "data" / "raw"
    raw.mkdir(parents=True)
    for i in range(2):
        texts = [f"row {i} " + "x" * j for j in range(10)]
        pq.write_table(pa.table({"text": texts}), raw / f"part-{i}.parquet")
    repo.write({".gitignore": ".hfbuild/\n"}, commit="project")
    return repo


def _doit_run(repo: Repo) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "doit", "run", "preprocess"],
        cwd=repo.path,
        env={**os.environ, "PYTHONPATH": str(repo.path), "HF_DATASETS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )


def test_readme_python_examples_run(repo: Repo) -> None:
    """Every ```python block of the README runs on a small project: a block defining a doit
    task is the project's dodo.py, built by `doit run` (then `hfbuild status` finds every stage
    up to date); any other is a `datasets` script after a dataset and a transform are made.
    Blocks marked `<!-- readme-test: skip -->` are left out; none is today."""
    project(repo)
    blocks = python_blocks()
    assert len(blocks) >= 2
    assert [line for line, _, skipped in blocks if skipped] == []
    for line, code, _ in blocks:
        if "def task_" in code:
            repo.write({"dodo.py": code}, commit=f"README block at line {line}")
            run = _doit_run(repo)
            assert run.returncode == 0, f"README line {line}:\n{run.stdout}\n{run.stderr}"
            status = subprocess.run(
                [HFBUILD, "status"], cwd=repo.path, capture_output=True, text=True, check=False
            )
            assert status.returncode == 0, f"README line {line}:\n{status.stdout}{status.stderr}"
        else:
            run_python(PRELUDE + code, repo.path)


def test_fingerprint_takes_map_options_as_map_spells_them(repo: Repo) -> None:
    """`hfbuild.fingerprint(f, kw, parent=ds, batched=True)` is the key `hfbuild.map(ds, f, kw,
    batched=True)` gives its result (as `options={"batched": True}` is); another option value
    is another key, and a name Dataset.map does not know is refused with a message."""
    project(repo)
    code = """
        import json
        import hfbuild
        out = hfbuild.map(ds, featurize, fn_kwargs={"k": 3}, batched=True, desc="x")
        try:
            hfbuild.fingerprint(featurize, {"k": 3}, parent=ds, batchd=True)
            refused = None
        except hfbuild.HfbuildError as e:
            refused = str(e)
        print(json.dumps({
            "map": out._fingerprint,
            "kw": hfbuild.fingerprint(featurize, {"k": 3}, parent=ds, batched=True),
            "options": hfbuild.fingerprint(
                featurize, {"k": 3}, parent=ds, options={"batched": True}),
            "other": hfbuild.fingerprint(
                featurize, {"k": 3}, parent=ds, batched=True, batch_size=2),
            "refused": refused,
        }))
        """
    import json
    import textwrap

    got = json.loads(
        run_python(PRELUDE + textwrap.dedent(code), repo.path).stdout.strip().splitlines()[-1]
    )
    assert got["kw"] == got["map"] == got["options"]
    assert got["other"] != got["map"]
    assert "batchd is not an option of Dataset.map" in got["refused"]


STRICT_DODO = """
from hfbuild import Pipeline
from myproject import transforms

pipe = Pipeline()
raw = pipe.load("raw", "parquet", data_files={"train": "data/raw/*.parquet"})
feat = pipe.map("features", raw, transforms.featurize, fn_kwargs={"k": 3}, batched=True)


def task_preprocess():
    yield from pipe.tasks()
"""


def test_status_strict_makes_uncommitted_code_an_error(repo: Repo) -> None:
    """`status --strict` and `HFBUILD_STRICT=1 hfbuild status` report a stage whose key holds
    an uncommitted file as failed, naming the file and strict mode (exit 1); `--dodo` is
    accepted after the command too."""
    project(repo)
    repo.write({"dodo.py": STRICT_DODO}, commit="dodo")
    with open(repo.path / "myproject" / "transforms.py", "a") as f:
        f.write("\n# an uncommitted edit\n")

    def status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [HFBUILD, *args],
            cwd=repo.path,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **(env or {})},
        )

    plain = status("status")
    assert plain.returncode == 1
    assert "features  stale (from uncommitted changes: myproject/transforms.py" in plain.stdout
    for out in (status("status", "--strict"), status("status", env={"HFBUILD_STRICT": "1"})):
        assert out.returncode == 1, out.stderr
        assert "features  failed: its key holds uncommitted files (myproject/transforms.py" in (
            out.stdout
        )
        assert "strict mode" in out.stdout
    (repo.path / "dodo.py").rename(repo.path / "other.py")
    out = status("status", "--strict", "--dodo", "other.py")
    assert out.returncode == 1 and "features  failed:" in out.stdout, out.stderr


def test_global_options_after_every_command() -> None:
    """`--dodo` is read after any command as before it, and kept when given before."""
    from hfbuild.cli.main import _parser

    p = _parser()
    sub = next(a for a in p._actions if isinstance(a.choices, dict))
    assert isinstance(sub.choices, dict)
    extra = {"explain": ["s"], "remote": ["rm", "s"]}
    for name in sub.choices:
        after = p.parse_args([name, *extra.get(name, []), "--dodo", "x.py"])
        before = p.parse_args(["--dodo", "y.py", name, *extra.get(name, [])])
        assert (after.dodo, before.dodo) == ("x.py", "y.py"), name
    assert p.parse_args(["status"]).dodo is None


def test_install_hook_with_dodo_after_the_command(repo: Repo) -> None:
    """`hfbuild install-hook --dodo X` installs a hook running `verify --staged` on X."""
    project(repo)
    repo.write({"pipe.py": STRICT_DODO}, commit="pipe")
    out = subprocess.run(
        [HFBUILD, "install-hook", "--dodo", "pipe.py"],
        cwd=repo.path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    hook = (repo.path / ".git" / "hooks" / "pre-commit").read_text()
    assert str(repo.path / "pipe.py") in hook


@pytest.mark.parametrize("broken", ["fingerprint", "build"])
def test_stages_built_from_a_failed_one_are_named(repo: Repo, broken: str) -> None:
    """When a stage fails under `doit run` (it cannot be fingerprinted, or its transform
    raises), doit's message names the stages built from it as failing with it; `status`
    lists the ones that cannot be fingerprinted as failed, naming the failed input."""
    project(repo)
    dodo = STRICT_DODO + (
        'kept = pipe.filter("kept", feat, transforms.keep, fn_kwargs={"min_len": 10})\n'
        'both = pipe.apply("split", kept, transforms.split, fn_kwargs={"seed": 0})\n'
    )
    if broken == "fingerprint":
        dodo = dodo.replace('{"k": 3}', '{"k": Opaque()}').replace(
            "pipe = Pipeline()", "class Opaque:\n    pass\n\n\npipe = Pipeline()"
        )
    else:
        repo.write(
            {
                "myproject/transforms.py": TRANSFORMS.replace(
                    "def featurize(batch, k):", "def featurize(batch, k):\n    raise ValueError"
                )
            }
        )
    repo.write({"dodo.py": dodo}, commit="broken")
    run = _doit_run(repo)
    assert run.returncode != 0
    said = run.stdout + run.stderr
    assert "failed with it, as they are built from 'features': kept, split" in said
    if broken == "fingerprint":
        status = subprocess.run(
            [HFBUILD, "status"], cwd=repo.path, capture_output=True, text=True, check=False
        )
        assert status.returncode == 1
        assert "kept      failed: stage 'kept' cannot be fingerprinted because stage " in (
            status.stdout
        )
        assert "'features', which it is built from" in status.stdout
