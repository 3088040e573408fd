"""`hfbuild verify` in a checkout without the data (git-ignored, fetched by another tool)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from hfbuild.store.paths import manifest_digest
from tests.helpers import Repo, run_hfbuild
from tests.pipeline_project import doit, make_project
from tests.test_remote import s3, s3_server  # noqa: F401  (fixtures)


@pytest.fixture
def origin(repo: Repo, tmp_path: pathlib.Path) -> Repo:
    """The project with its data git-ignored, built, and its lock committed."""
    repo.write({".gitignore": "data/\n"})
    make_project(repo)
    assert "data/part-0.parquet" not in repo.git("ls-files")
    doit(repo, "run", "preprocess", log=tmp_path / "build.log")
    repo.commit("lock")
    return repo


@pytest.fixture
def ci(origin: Repo, tmp_path: pathlib.Path) -> Repo:
    """A fresh clone, as CI checks it out: code and lock, no data, no store."""
    clone = origin.clone(tmp_path / "ci")
    assert not (clone.path / "data").exists()
    return clone


def test_verify_without_data_checks_the_rest_and_names_the_data(ci: Repo) -> None:
    """verify passes on a correct lock without the data, and says which load stage's data
    (and which pattern) it could not check."""
    out = run_hfbuild(ci, "verify")
    assert out.returncode == 0, out.stderr
    assert "data not checked: load stage 'raw': data/*.parquet matches no file" in out.stderr
    assert "the data of 1 load stage(s) was not checked (raw)" in out.stdout


def test_require_data_makes_absent_data_a_failure(ci: Repo) -> None:
    """--require-data fails when a load stage's data is absent, naming the stage."""
    out = run_hfbuild(ci, "verify", "--require-data")
    assert out.returncode == 1
    assert "load stage 'raw'" in out.stderr and "--require-data" in out.stderr


def test_without_data_code_and_argument_changes_are_still_caught(ci: Repo) -> None:
    """Without the data, an edited helper and a changed argument of a downstream stage fail
    verify, naming the stage and the cause."""
    ci.write({"pkg/util/deep.py": "OFFSET = 1\n\ndef offset():\n    return OFFSET\n"})
    ci.commit("edit helper")
    out = run_hfbuild(ci, "verify")
    assert out.returncode == 1
    assert "stage 'feat' was not built from the committed code" in out.stderr
    assert "pkg/util/deep.py" in out.stderr
    ci.git("checkout", "-q", "HEAD~1", "--", "pkg/util/deep.py")
    dodo = (ci.path / "dodo.py").read_text().replace('{"scale": 1}', '{"scale": 2}')
    ci.write({"dodo.py": dodo}, commit="scale")
    out = run_hfbuild(ci, "verify")
    assert out.returncode == 1
    assert "stage 'lens'" in out.stderr and "scale" in out.stderr
    assert "stage 'feat'" not in out.stderr


def test_without_data_a_changed_load_option_is_caught(ci: Repo) -> None:
    """A load stage's own options are still checked when its data is absent."""
    dodo = (ci.path / "dodo.py").read_text()
    ci.write({"dodo.py": dodo.replace('split="train"', 'split="train", columns=["x", "text"]')})
    ci.commit("columns")
    out = run_hfbuild(ci, "verify")
    assert out.returncode == 1
    assert "stage 'raw' was not built from the committed code" in out.stderr


def test_without_data_changed_data_files_fail(ci: Repo) -> None:
    """A data_files pattern that cannot have named the files the lock records is an error,
    never a pass."""
    dodo = (ci.path / "dodo.py").read_text().replace("data/*.parquet", "raw/*.parquet")
    ci.write({"dodo.py": dodo}, commit="moved data")
    out = run_hfbuild(ci, "verify")
    assert out.returncode == 1
    assert "do not fit its data_files" in out.stderr and "raw/*.parquet" in out.stderr


def test_without_data_and_without_a_lock_entry_fails(ci: Repo) -> None:
    """A load stage whose data is absent and which the lock does not record fails verify:
    nothing stands in for its data."""
    lock = json.loads((ci.path / "hfbuild.lock").read_text())
    del lock["stages"]["raw"]
    ci.write({"hfbuild.lock": json.dumps(lock)}, commit="drop raw")
    out = run_hfbuild(ci, "verify")
    assert out.returncode == 1
    assert "records no data for it" in out.stderr


def test_with_the_data_present_verify_checks_it(origin: Repo) -> None:
    """With the data present, a changed data file fails verify (the lock never stands in for
    data that exists)."""
    assert run_hfbuild(origin, "verify").returncode == 0
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1], "text": ["a"]}), origin.path / "data" / "part-0.parquet")
    out = run_hfbuild(origin, "verify")
    assert out.returncode == 1
    assert "stage 'raw'" in out.stderr and "data/part-0.parquet" in out.stderr
    assert "not checked" not in out.stderr + out.stdout


def test_a_file_remote_confirms_absent_data(
    origin: Repo, ci: Repo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a remote holding the locked result, the absent data's identity is confirmed from
    the remote's manifest (nothing is downloaded) and --require-data passes; an empty remote
    confirms nothing."""
    empty = tmp_path / "empty-remote"
    empty.mkdir()
    monkeypatch.setenv("HFBUILD_REMOTE", f"file://{empty}")
    out = run_hfbuild(ci, "verify", "--require-data")
    assert out.returncode == 1
    assert "holds no result for fingerprint" in out.stderr
    remote = tmp_path / "remote"
    monkeypatch.setenv("HFBUILD_REMOTE", f"file://{remote}")
    assert run_hfbuild(origin, "push").returncode == 0
    out = run_hfbuild(ci, "verify", "--require-data")
    assert out.returncode == 0, out.stderr
    assert f"the remote file://{remote} holds the result built from the data" in out.stdout
    assert not list((ci.path / ".hfbuild" / "objects").glob("*/*"))  # nothing was pulled


def test_a_remote_entry_that_differs_from_the_lock_confirms_nothing(
    origin: Repo, ci: Repo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote entry whose manifest was edited does not confirm the lock's data."""
    remote = tmp_path / "remote"
    monkeypatch.setenv("HFBUILD_REMOTE", f"file://{remote}")
    assert run_hfbuild(origin, "push").returncode == 0
    fp = json.loads((ci.path / "hfbuild.lock").read_text())["stages"]["raw"]["fingerprint"]
    path = remote / "objects" / fp[:2] / fp / "manifest.json"
    doc = json.loads(path.read_text())
    doc["content_hash"] = "0" * 32
    doc["manifest_digest"] = manifest_digest(doc)  # past the checksum: the lock decides
    path.write_text(json.dumps(doc))
    out = run_hfbuild(ci, "verify", "--require-data")
    assert out.returncode == 1
    assert "does not match the lock" in out.stderr


def test_an_s3_remote_confirms_absent_data(origin: Repo, ci: Repo, s3: Any) -> None:  # noqa: F811
    """The same confirmation from an S3 remote (moto on loopback)."""
    assert run_hfbuild(origin, "push").returncode == 0
    out = run_hfbuild(ci, "verify", "--require-data")
    assert out.returncode == 0, out.stderr
    assert f"s3://{s3.bucket}/cache holds the result" in out.stdout


def test_pattern_matching_agrees_with_glob(tmp_path: pathlib.Path) -> None:
    """The check of recorded names against data_files patterns names exactly the files
    glob.glob(recursive=True) finds, for `*`, `?`, `[..]` and `**` patterns."""
    import glob

    from hfbuild.keys.absentdata import matches

    names = ["a.parquet", "b.csv", "d/a.parquet", "d/e/f.parquet", "d/e/g1.csv", "x/y.parquet"]
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_text("")
    patterns = [
        "*.parquet",
        "d/*.parquet",
        "d/**/*.parquet",
        "**/*.csv",
        "d/e/g?.csv",
        "[ab].*",
        "**",
        "d/**",
        "x/y.parquet",
        "d/*/*",
    ]
    for pat in patterns:
        found = {
            pathlib.Path(p).relative_to(tmp_path).as_posix()
            for p in glob.glob(str(tmp_path / pat), recursive=True)
            if pathlib.Path(p).is_file()
        }
        assert {n for n in names if matches(pat, n)} == found, pat


@pytest.fixture
def half(repo: Repo, tmp_path: pathlib.Path) -> Repo:
    """A clone of a project whose load stage reads a committed pattern and a git-ignored one
    (built and locked with both present): the clone has only the committed data."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo.write({".gitignore": "big/\n"})
    make_project(repo)
    (repo.path / "big").mkdir()
    pq.write_table(pa.table({"x": [100, 101], "text": ["a", "b"]}), repo.path / "big" / "b.parquet")
    dodo = (repo.path / "dodo.py").read_text()
    dodo = dodo.replace('data_files="data/*.parquet"', 'data_files=["data/*.parquet", "big/*"]')
    repo.write({"dodo.py": dodo}, commit="two patterns")
    doit(repo, "run", "preprocess", log=tmp_path / "build.log")
    repo.commit("lock")
    return repo.clone(tmp_path / "half")


def test_with_part_of_the_data_absent_the_present_part_is_checked(half: Repo) -> None:
    """When one data_files pattern matches nothing, only that pattern is taken from the lock:
    the files that are present are still hashed, so a changed one fails verify."""
    out = run_hfbuild(half, "verify")
    assert out.returncode == 0, out.stderr
    assert "load stage 'raw': big/* matches no file" in out.stderr
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [7], "text": ["c"]}), half.path / "data" / "part-0.parquet")
    half.commit("new data")
    out = run_hfbuild(half, "verify")
    assert out.returncode == 1
    assert "stage 'raw'" in out.stderr and "data/part-0.parquet" in out.stderr
