"""The fingerprint changes exactly when the code, arguments or input of a transform change.

Every determinism claim is checked in fresh interpreters, in real git repositories."""

from __future__ import annotations

import json
import pathlib
import shutil
import textwrap

import pytest

import hfbuild
from tests.helpers import Repo, fingerprint_in_subprocess, git, run_python

PROJECT = {
    "pkg/__init__.py": "",
    "pkg/helpers.py": """
        SCALE = 2

        def double(x):
            return x * SCALE
        """,
    "pkg/transforms.py": """
        from pkg.helpers import double

        def featurize(example, k=1):
            return {"y": double(example["x"]) + k}
        """,
    "pkg/unrelated.py": """
        def other(x):
            return x
        """,
    "README.md": "a project\n",
}


@pytest.fixture
def project(repo: Repo) -> Repo:
    return repo.write(PROJECT, commit="initial")


def fp(repo: Repo, kwargs: object = None, **env: str) -> dict[str, object]:
    return fingerprint_in_subprocess(
        repo.path, "pkg.transforms", "featurize", kwargs or {"k": 3}, env=env
    )


def test_same_across_hash_seeds(project: Repo) -> None:
    """Processes with different PYTHONHASHSEED agree on the fingerprint."""
    results = {fp(project, PYTHONHASHSEED=str(seed))["fp"] for seed in (0, 1, 12345)}
    assert len(results) == 1


def test_same_across_clone_paths(project: Repo, tmp_path: pathlib.Path) -> None:
    """Two clones of one commit at different absolute paths give the same fingerprint."""
    a = project.clone(tmp_path / "a" / "clone")
    (tmp_path / "somewhere" / "deeper").mkdir(parents=True)
    b = project.clone(tmp_path / "somewhere" / "deeper" / "other-name")
    assert fp(a)["fp"] == fp(b)["fp"] == fp(project)["fp"]


def test_same_in_shallow_clone(project: Repo, tmp_path: pathlib.Path) -> None:
    """A `--depth 1` clone (CI's normal case) gives the fingerprint of a full clone."""
    project.write({"pkg/unrelated.py": "X = 1\n"}, commit="second")
    full = project.clone(tmp_path / "full")
    shallow = project.clone(tmp_path / "shallow", "--depth", "1")
    assert git(shallow.path, "rev-parse", "--is-shallow-repository") == "true"
    assert fp(full)["fp"] == fp(shallow)["fp"]


def test_unchanged_by_files_outside_the_closure(project: Repo) -> None:
    """Editing, renaming or adding files the transform does not import changes nothing, and
    an uncommitted change there does not warn."""
    before = fp(project)
    project.write({"README.md": "edited\n", "pkg/unrelated.py": "def other(x):\n    return 2\n"})
    project.git("mv", "README.md", "README.rst")
    project.write({"notes.txt": "untracked\n"})
    after_dirty = fp(project)
    assert after_dirty == before  # same fingerprint, and no warning
    project.commit("unrelated edits")
    assert fp(project)["fp"] == before["fp"]


@pytest.mark.parametrize(
    ("path", "old", "new"),
    [
        ("pkg/transforms.py", 'double(example["x"]) + k', 'double(example["x"]) - k'),
        ("pkg/helpers.py", "return x * SCALE", "return x * SCALE + 0"),
        ("pkg/helpers.py", "SCALE = 2", "SCALE = 3"),
    ],
    ids=["function-body", "helper-in-other-module", "constant-the-helper-reads"],
)
def test_changes_with_the_code(project: Repo, path: str, old: str, new: str) -> None:
    """Editing the function, a helper in another in-repo module, or a module-level constant
    that helper reads, changes the fingerprint once committed."""
    before = fp(project)["fp"]
    f = project.path / path
    text = f.read_text()
    assert old in text
    f.write_text(text.replace(old, new))
    project.commit("edit")
    assert fp(project)["fp"] != before


def test_changes_with_the_arguments(project: Repo) -> None:
    """A different argument value, or the same value of another type, is another fingerprint."""
    values = [{"k": 3}, {"k": 4}, {"k": 3.0}, {"k": "3"}, {"k": True}, {"k": [3]}]
    fps = [fp(project, v)["fp"] for v in values]
    assert len(set(fps)) == len(values)


def test_num_proc_counts_only_with_rank(project: Repo) -> None:
    """num_proc stays out of the key, except with with_rank=True, where the function sees the
    rank: then 2 and 4 processes differ, and None and 1 (one unranked shard) agree."""
    code = """
        import json, warnings
        warnings.simplefilter("ignore")
        import hfbuild
        from pkg.transforms import featurize
        runs = [{}, {"num_proc": 4}, {"with_rank": True}, {"with_rank": True, "num_proc": 1},
                {"with_rank": True, "num_proc": 2}, {"with_rank": True, "num_proc": 4}]
        print(json.dumps([hfbuild.fingerprint(featurize, options=o) for o in runs]))
        """
    plain, plain4, rank, rank1, rank2, rank4 = json.loads(run_python(code, project.path).stdout)
    assert plain == plain4
    assert rank == rank1
    assert len({plain, rank, rank2, rank4}) == 4


def test_dirty_edit_commit_and_revert(project: Repo) -> None:
    """An uncommitted edit changes the fingerprint and warns naming the file; committing
    exactly that edit keeps the fingerprint without a warning; reverting it gives back the
    original fingerprint."""
    clean = fp(project)
    assert clean["warnings"] == []
    helper = project.path / "pkg/helpers.py"
    original = helper.read_text()
    helper.write_text(original.replace("SCALE = 2", "SCALE = 5"))

    dirty = fp(project)
    assert dirty["fp"] != clean["fp"]
    assert len(dirty["warnings"]) == 1
    assert "pkg/helpers.py (modified)" in dirty["warnings"][0]

    project.commit("scale 5")
    committed = fp(project)
    assert committed == {"fp": dirty["fp"], "warnings": []}

    helper.write_text(original)
    project.commit("revert")
    assert fp(project) == clean


def test_untracked_module_warns(project: Repo) -> None:
    """A closure file git does not track yet is hashed from disk and named as untracked."""
    project.write(
        {
            "pkg/extra.py": "BONUS = 1\n",
            "pkg/transforms.py": textwrap.dedent(PROJECT["pkg/transforms.py"])
            + "\nfrom pkg.extra import BONUS\n",
        }
    )
    out = fp(project)
    assert any("pkg/extra.py (untracked)" in w for w in out["warnings"])


def test_strict_mode_refuses_dirty_code(project: Repo) -> None:
    """HFBUILD_STRICT=1 turns the dirty-tree warning into an error that names the file."""
    (project.path / "pkg/helpers.py").write_text("SCALE = 9\ndef double(x):\n    return x\n")
    with pytest.raises(AssertionError, match=r"DirtyTreeError.*pkg/helpers.py \(modified\)"):
        fp(project, HFBUILD_STRICT="1")


def test_staged_edit_is_dirty_but_same_as_commit(project: Repo) -> None:
    """A staged, uncommitted edit warns, and its fingerprint is the one the commit will have."""
    (project.path / "pkg/helpers.py").write_text("SCALE = 7\ndef double(x):\n    return x\n")
    project.git("add", "pkg/helpers.py")
    staged = fp(project)
    assert any("pkg/helpers.py (staged)" in w for w in staged["warnings"])
    project.commit("scale 7")
    assert fp(project) == {"fp": staged["fp"], "warnings": []}


def test_crlf_checkout_matches_lf(project: Repo, tmp_path: pathlib.Path) -> None:
    """A checkout with core.autocrlf=true (CRLF files on disk) gives the LF fingerprint."""
    lf = fp(project)["fp"]
    crlf = tmp_path / "crlf"
    git(tmp_path, "-c", "core.autocrlf=true", "clone", "-q", f"file://{project.path}", str(crlf))
    git(crlf, "config", "core.autocrlf", "true")
    # Force CRLF bytes on disk regardless of the platform's checkout default.
    for name in ("pkg/transforms.py", "pkg/helpers.py"):
        p = crlf / name
        p.write_bytes(p.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    assert b"\r\n" in (crlf / "pkg/helpers.py").read_bytes()
    out = fp(Repo(crlf))
    assert out["fp"] == lf


def test_symlinked_module_counts_by_target_content(repo: Repo) -> None:
    """A module that is a symlink is identified by what it points to."""
    repo.write(
        {
            "real/impl.py": "def f(x):\n    return x\n",
            "mod/__init__.py": "",
            "mod/main.py": "from mod.linked import f\n\ndef g(x):\n    return f(x)\n",
        }
    )
    (repo.path / "mod/linked.py").symlink_to("../real/impl.py")
    repo.commit("symlink")
    before = fingerprint_in_subprocess(repo.path, "mod.main", "g")
    (repo.path / "real/impl.py").write_text("def f(x):\n    return x + 1\n")
    repo.commit("edit target")
    after = fingerprint_in_subprocess(repo.path, "mod.main", "g")
    assert before["fp"] != after["fp"]


def test_in_process_api_returns_manifest(project: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    """`return_manifest=True` gives the manifest the digest was made from, with repo-relative
    files and blob ids, and nothing absolute."""
    monkeypatch.syspath_prepend(str(project.path))
    monkeypatch.chdir(project.path)
    import importlib

    mod = importlib.import_module("pkg.transforms")
    try:
        digest, manifest = hfbuild.fingerprint(mod.featurize, {"k": 3}, return_manifest=True)
        assert digest == manifest.fingerprint
        files = dict(manifest.doc["code"]["files"])
        assert set(files) == {"pkg/__init__.py", "pkg/helpers.py", "pkg/transforms.py"}
        assert files["pkg/helpers.py"] == project.git("rev-parse", "HEAD:pkg/helpers.py")
        assert str(project.path) not in manifest.to_json()
        assert str(pathlib.Path(project.path).resolve()) not in manifest.to_json()
    finally:
        for name in ("pkg.transforms", "pkg.helpers", "pkg"):
            __import__("sys").modules.pop(name, None)


def test_repository_without_commits(repo: Repo) -> None:
    """A repository with no commit yet works: every file is untracked and says so."""
    repo.write(PROJECT)
    out = fp(repo)
    assert any("(untracked)" in w for w in out["warnings"])
    repo.commit("first")
    assert fp(repo)["warnings"] == []


def test_worktree_and_detached_head(project: Repo, tmp_path: pathlib.Path) -> None:
    """A linked worktree and a detached HEAD give the fingerprint of the same commit."""
    head = project.git("rev-parse", "HEAD")
    wt = tmp_path / "wt"
    project.git("worktree", "add", "-q", "--detach", str(wt), head)
    assert fp(Repo(wt))["fp"] == fp(project)["fp"]


def test_no_git_repository_warns_and_uses_content(tmp_path: pathlib.Path) -> None:
    """Outside any git work tree the files are identified by content, with a warning; the
    same content in two directories gives the same fingerprint."""
    a, b = tmp_path / "plain-a", tmp_path / "plain-b"
    for d in (a, b):
        Repo(d).write(PROJECT)
    ra, rb = fp(Repo(a)), fp(Repo(b))
    assert ra["fp"] == rb["fp"]
    assert "not in a git repository" in ra["warnings"][0]


def test_submodule_files_are_tracked(project: Repo, tmp_path: pathlib.Path) -> None:
    """A helper inside a git submodule is part of the closure, by the submodule's blob id."""
    lib = Repo.init(tmp_path / "lib").write(
        {"sublib/__init__.py": "", "sublib/core.py": "def inc(x):\n    return x + 1\n"},
        commit="lib",
    )
    project.git(
        "-c", "protocol.file.allow=always", "submodule", "add", "-q", f"file://{lib.path}", "vendor"
    )
    project.write(
        {
            "pkg/transforms.py": "import sys, os\n"
            "sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'vendor'))\n"
            "from sublib.core import inc\n\n"
            "def featurize(example, k=1):\n    return {'y': inc(example['x']) + k}\n"
        },
        commit="use submodule",
    )
    before = fp(project)
    assert before["warnings"] == []
    (project.path / "vendor/sublib/core.py").write_text("def inc(x):\n    return x + 2\n")
    after = fp(project)
    assert after["fp"] != before["fp"]
    assert any("vendor/sublib/core.py (modified)" in w for w in after["warnings"])
    shutil.rmtree(tmp_path / "lib")
