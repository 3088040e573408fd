"""The hook as shipped in .pre-commit-hooks.yaml, used the way the pre-commit framework
documents it (`repo:` + `rev:`), in a user project with its own virtualenv."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import yaml

from tests.helpers import Repo

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRE_COMMIT = pathlib.Path(sys.executable).parent / "pre-commit"
OUTER_SITE = sysconfig.get_paths()["purelib"]

PROJECT = {
    "textproj/__init__.py": "",
    "textproj/clean.py": "def norm(text):\n    return text.lower()\n",
    # tokenizers: a dependency of the project that no environment of pre-commit's would have.
    "textproj/tok.py": """
        from tokenizers.pre_tokenizers import Whitespace

        from textproj.clean import norm


        def words(batch):
            pre = Whitespace()
            return {"n_words": [len(pre.pre_tokenize_str(norm(t))) for t in batch["text"]]}
        """,
    "dodo.py": """
        from hfbuild import Pipeline
        from textproj import tok

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        words = pipe.map("words", raw, tok.words, batched=True)


        def task_preprocess():
            yield from pipe.tasks()
        """,
    ".gitignore": ".venv/\nvenv/\n.hfbuild/\n.doit.db*\n",
    "README.md": "a project\n",
}


def hooks_repo(tmp_path: pathlib.Path) -> tuple[pathlib.Path, str]:
    """A git repository holding hfbuild's hook files, as in this work tree, at a commit."""
    repo = Repo.init(tmp_path / "hfbuild-hooks")
    for rel in (".pre-commit-hooks.yaml", "hook/run-hfbuild"):
        (repo.path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo.path / rel)  # keeps the executable bit
    return repo.path, repo.commit("hooks")


def make_venv(path: pathlib.Path, *, with_hfbuild: bool) -> pathlib.Path:
    """A real virtualenv at `path`. Its third-party packages come from this test environment
    through a .pth line (standing in for `pip install`); hfbuild, when asked for, from this
    source tree the same way. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Only the path itself is added: the .pth files in OUTER_SITE (hfbuild's editable install)
    # are not processed, so hfbuild is importable only through hfbuild.pth.
    (pathlib.Path(site) / "deps.pth").write_text(OUTER_SITE + "\n")
    if with_hfbuild:
        (pathlib.Path(site) / "hfbuild.pth").write_text(str(ROOT) + "\n")
    return python


def user_env() -> dict[str, str]:
    """A user's environment with no virtualenv activated, and this test environment's python
    (which has hfbuild) first on PATH: the hook must choose the project's venv by itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.pop("HFBUILD_PYTHON", None)
    env["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), env["PATH"]])
    return env


def project(tmp_path: pathlib.Path, *, with_hfbuild: bool) -> tuple[Repo, pathlib.Path]:
    """The user's project, with the shipped hook in .pre-commit-config.yaml at a real rev and
    installed by the real pre-commit; its own .venv; nothing committed yet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    hooks, rev = hooks_repo(tmp_path)
    repo = Repo.init(tmp_path / "proj")
    repo.write(PROJECT)
    (repo.path / "data").mkdir()
    texts = [f"Row {i} has {'some ' * i}words" for i in range(30)]
    pq.write_table(pa.table({"text": texts}), repo.path / "data" / "part-0.parquet")
    cfg = {"repos": [{"repo": str(hooks), "rev": rev, "hooks": [{"id": "hfbuild-verify"}]}]}
    (repo.path / ".pre-commit-config.yaml").write_text(yaml.safe_dump(cfg))
    python = make_venv(repo.path / ".venv", with_hfbuild=with_hfbuild)
    subprocess.run(
        [str(PRE_COMMIT), "install"], cwd=repo.path, check=True, capture_output=True, env=user_env()
    )
    return repo, python


def commit(
    repo: Repo, message: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "commit", "-m", message],
        cwd=repo.path,
        capture_output=True,
        text=True,
        check=False,
        env=env or user_env(),
    )


def build(repo: Repo, python: pathlib.Path) -> None:
    """`doit run preprocess` with the project's own interpreter."""
    out = subprocess.run(
        [str(python), "-m", "doit", "run", "preprocess"],
        cwd=repo.path,
        capture_output=True,
        text=True,
        check=False,
        env=user_env(),
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_shipped_hook_checks_commits_with_the_projects_own_venv(tmp_path: pathlib.Path) -> None:
    """Through `repo:`/`rev:`, the shipped hook runs hfbuild from the project's .venv (whose
    dodo.py imports tokenizers): a staged helper edit is refused naming the stage and the file;
    `doit run preprocess && git add hfbuild.lock` makes it pass; an unrelated commit passes."""
    repo, python = project(tmp_path, with_hfbuild=True)
    build(repo, python)
    repo.git("add", "-A")
    first = commit(repo, "project, built")
    assert first.returncode == 0, first.stdout + first.stderr

    (repo.path / "textproj/clean.py").write_text("def norm(text):\n    return text.upper()\n")
    repo.git("add", "textproj/clean.py")
    refused = commit(repo, "helper edit, not rebuilt")
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0, said
    assert "stage 'words' was not built from the staged code" in said
    assert "textproj/clean.py" in said
    assert "doit run preprocess && git add hfbuild.lock" in said

    build(repo, python)
    repo.git("add", "hfbuild.lock")
    rebuilt = commit(repo, "helper edit, rebuilt")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr

    repo.write({"README.md": "a project, documented\n"})
    repo.git("add", "README.md")
    unrelated = commit(repo, "docs only")
    assert unrelated.returncode == 0, unrelated.stdout + unrelated.stderr
    assert "hfbuild verify --staged" in unrelated.stdout + unrelated.stderr  # the hook ran


def test_shipped_hook_says_what_to_do_without_hfbuild_in_the_venv(tmp_path: pathlib.Path) -> None:
    """When the project's .venv lacks hfbuild, the hook refuses with a message naming that
    interpreter and the install command, although a python with hfbuild is first on PATH;
    an activated virtualenv ($VIRTUAL_ENV) is preferred over the repository's .venv."""
    repo, python = project(tmp_path, with_hfbuild=False)
    repo.git("add", "-A")
    refused = commit(repo, "first")
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0, said
    assert f"hfbuild is not installed in {python} (the project's virtualenv .venv)" in said
    assert f'"{python}" -m pip install hfbuild' in said

    other = make_venv(tmp_path / "activated", with_hfbuild=False)
    env = {**user_env(), "VIRTUAL_ENV": str(tmp_path / "activated")}
    refused = commit(repo, "first", env)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert f"hfbuild is not installed in {other} (the activated virtualenv, VIRTUAL_ENV)" in said


def test_shipped_hook_takes_an_explicit_interpreter(tmp_path: pathlib.Path) -> None:
    """HFBUILD_PYTHON overrides the search (here over a .venv without hfbuild); a value that
    is no executable is named."""
    repo, _ = project(tmp_path, with_hfbuild=False)
    repo.git("add", "-A")
    nowhere = tmp_path / "nowhere" / "python"
    refused = commit(repo, "first", {**user_env(), "HFBUILD_PYTHON": str(nowhere)})
    assert refused.returncode != 0
    assert f"HFBUILD_PYTHON={nowhere} is not an executable" in refused.stdout + refused.stderr

    chosen = commit(repo, "first", {**user_env(), "HFBUILD_PYTHON": sys.executable})
    said = chosen.stdout + chosen.stderr
    assert chosen.returncode != 0  # nothing is built yet: hfbuild itself ran, and says so
    assert "is not installed" not in said
    assert "stage 'words' is not in the staged hfbuild.lock" in said
