"""Data files are identified by the blob id git gives their work-tree content, whatever their
git status, and whether the ids come from the stat cache, the index or the bytes."""

from __future__ import annotations

import os
import pathlib
from pathlib import Path

import pytest

from hfbuild.source import datafiles
from hfbuild.source.datafiles import StatCache, file_identities, file_identity
from hfbuild.source.gitstate import Snapshot
from tests.helpers import Repo


def _files(repo: Repo) -> list[str]:
    """A committed set of files, then each kind of change git tells apart."""
    repo.write({f"data/part-{i}.txt": f"rows {i}\n" for i in range(6)}, commit="data")
    repo.write({"data/part-1.txt": "ROWS 1\n"})  # same size, same second: racily clean
    repo.write({"data/part-2.txt": "rows 2, longer now\n"})  # modified
    repo.write({"data/part-3.txt": "staged\n"})
    repo.git("add", "data/part-3.txt")  # staged, not committed
    repo.write({"data/part-6.txt": "untracked\n"})
    os.symlink("part-0.txt", repo.path / "data" / "link.txt")
    return sorted(str(p) for p in (repo.path / "data").iterdir())


def test_ids_are_gits_work_tree_ids(repo: Repo, tmp_path: pathlib.Path) -> None:
    """Each file's id is `git hash-object` of it: clean, racily clean, modified, staged,
    untracked and symlinked files alike, with a cold and then a warm stat cache."""
    files = _files(repo)
    want = {
        os.path.relpath(f, repo.path): repo.git("hash-object", os.path.relpath(f, repo.path))
        for f in files
    }
    cache = StatCache(str(tmp_path / "statcache.json"))
    for _ in range(2):
        got = file_identities(files, Snapshot(str(repo.path)), cache)
        assert dict(got) == want
        cache.save()


def test_batch_equals_one_at_a_time(repo: Repo) -> None:
    """Identifying the files together gives, in order, what identifying each alone gives."""
    files = _files(repo)
    together = file_identities(files, Snapshot(str(repo.path)), StatCache(None))
    alone = [file_identity(f, Snapshot(str(repo.path)), StatCache(None)) for f in reversed(files)]
    assert together == alone[::-1]
    assert [name for name, _ in together] == [os.path.relpath(f, repo.path) for f in files]


def test_unmodified_ids_leave_out_changed_files(repo: Repo) -> None:
    """Only tracked files whose work tree matches the index take the index's id."""
    _files(repo)
    rels = [f"data/part-{i}.txt" for i in range(7)] + ["data/link.txt"]
    got = Snapshot(str(repo.path)).unmodified_ids(rels)
    assert sorted(got) == [
        "data/part-0.txt",
        "data/part-3.txt",
        "data/part-4.txt",
        "data/part-5.txt",
    ]
    assert got["data/part-3.txt"] == repo.git("hash-object", "data/part-3.txt")


RESOLUTION_CASES = [
    "data/*",
    "data/**",
    "**/*.jsonl",
    "data/*.jsonl",
    "data/.*",
    "data/__cache__/*",
    "data/README.md",
    ["data/a*.jsonl", "data/*.jsonl"],
    ["data/*.jsonl", "nothing/*.jsonl"],
    {"train": "data/a*.jsonl", "test": ["data/b.jsonl", "data/sub/*"]},
]


@pytest.mark.parametrize("patterns", RESOLUTION_CASES, ids=str)
def test_data_files_resolve_as_datasets_resolves_them(tmp_path: Path, patterns: object) -> None:
    """Issue #24: data-file patterns name the files `datasets.data_files` resolves, in its
    order: hidden and `__special__` directories, README.md and the like left out unless
    named, a file named by two patterns listed twice, a wildcard pattern matching nothing
    beside one that matches."""
    from datasets.data_files import DataFilesDict, DataFilesList, sanitize_patterns

    for name in (
        "data/a1.jsonl",
        "data/a2.jsonl",
        "data/b.jsonl",
        "data/README.md",
        "data/.hidden.jsonl",
        "data/__cache__/c.jsonl",
        "data/.dir/d.jsonl",
        "data/sub/e.jsonl",
        "data/sub/f.txt",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    root = str(tmp_path)
    got = datafiles.resolve_data_files(patterns, root, "test")  # type: ignore[arg-type]
    if isinstance(patterns, dict):
        want: object = {
            k: list(v)
            for k, v in DataFilesDict.from_patterns(sanitize_patterns(patterns), root).items()
        }
    else:
        pats = [patterns] if isinstance(patterns, str) else patterns
        want = list(DataFilesList.from_patterns(pats, root))
    assert got == want
