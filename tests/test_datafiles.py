"""Data files are identified by the blob id git gives their work-tree content, whatever their
git status, and whether the ids come from the stat cache, the index or the bytes."""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from hfbuild.source import datafiles
from hfbuild.source.caches import CodeCache
from hfbuild.source.datafiles import StatCache, file_identities, file_identity
from hfbuild.source.gitstate import Snapshot
from hfbuild.store.store import Store
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


def test_stat_cache_keeps_one_entry_per_path(repo: Repo, tmp_path: pathlib.Path) -> None:
    """An entry of a file's earlier stat data (what its earlier content left: a rewrite
    moves its ctime for good) is dropped when the file's entry is saved anew, so the cache
    every no-op parses does not grow with each rewrite; the entries of files not looked at
    are kept, and the ids stay git's."""
    repo.write({"data/a.txt": "a\n", "data/b.txt": "b\n"}, commit="data")
    path = tmp_path / "statcache.json"
    a, b = str(repo.path / "data" / "a.txt"), str(repo.path / "data" / "b.txt")
    gone = str(repo.path / "data" / "c.txt")
    st = os.stat(a)
    earlier = f"{a}|{st.st_size}|{st.st_mtime_ns - 10**9}|{st.st_ctime_ns - 10**9}|{st.st_ino}"
    other = f"{gone}|2|1|1|1"
    path.write_text(f'{{"{earlier}": "{"0" * 40}", "{other}": "{"1" * 40}"}}')
    time.sleep(2.1)  # out of the racy window: entries are remembered
    cache = StatCache(str(path))
    got = file_identities([a, b], Snapshot(str(repo.path)), cache)
    assert dict(got) == {f"data/{n}.txt": repo.git("hash-object", f"data/{n}.txt") for n in "ab"}
    cache.save()
    saved = json.loads(path.read_text())
    assert sorted(k.rsplit("|", 4)[0] for k in saved) == [a, b, gone]
    assert earlier not in saved and saved[other] == "1" * 40
    again = StatCache(str(path))  # the next run: every file a hit
    assert file_identities([a, b], Snapshot(str(repo.path)), again) == got


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


# -- a pattern's resolution kept from one check to the next ---------------------------------


def _memo(tmp_path: Path) -> CodeCache:
    """A real code cache in a real store, as a check keeps it."""
    return CodeCache(Store(str(tmp_path / "store")))


def _old(root: Path) -> None:
    """Wait until every directory under `root` is older than the racy window: a resolution
    is kept only for directories that changed more than 2 s ago."""
    newest = max(os.stat(d).st_ctime_ns for d, _, _ in os.walk(root))
    time.sleep(max(0.0, (newest + datafiles._RACY_NS) / 1e9 - time.time()) + 0.05)


def _forge(memo: CodeCache, pattern: str) -> None:
    """Put a name no resolution gives into the kept resolution of `pattern`: served, it shows
    that the kept resolution was reused."""
    key = next(k for k in memo._globs if k.endswith(os.sep + pattern))
    memo._globs[key]["files"] = [*memo._globs[key]["files"], "forged"]


# Each case: files before, the pattern, and the change (a shell of git and file operations).
MEMO_CASES: dict[str, tuple[str, Callable[[Repo], None]]] = {
    "added-tracked": ("a/*.jsonl", lambda r: (r.write({"a/n.jsonl": "{}\n"}), r.git("add", "a"))),
    "added-untracked": ("b/*.jsonl", lambda r: r.write({"b/n.jsonl": "{}\n"})),
    "removed-tracked": ("c/*.jsonl", lambda r: r.git("rm", "-q", "c/x.jsonl")),
    "removed-untracked": ("d/*.jsonl", lambda r: os.remove(r.path / "d/u.jsonl")),
    "renamed-tracked": ("e/*.jsonl", lambda r: r.git("mv", "e/x.jsonl", "e/z.jsonl")),
    "renamed-untracked": (
        "f/*.jsonl",
        lambda r: os.rename(r.path / "f/u.jsonl", r.path / "f/w.jsonl"),
    ),
    "added-in-subdirectory": ("g/**/*.jsonl", lambda r: r.write({"g/s/t/n.jsonl": "{}\n"})),
    "renamed-in-subdirectory": (
        "h/*/*.jsonl",
        lambda r: os.rename(r.path / "h/s/x.jsonl", r.path / "h/s/y.txt"),
    ),
    "removed-in-subdirectory": ("k/**", lambda r: r.git("rm", "-q", "k/s/t/x.jsonl")),
    "directory-replaced": ("j/*.jsonl", lambda r: _replace_dir(r.path / "j")),
}


def _replace_dir(d: Path) -> None:
    """Another directory in its place, with the old one's times (its inode differs)."""
    st = os.stat(d)
    os.rename(d, d.with_name("j-old"))
    d.mkdir()
    (d / "only.jsonl").write_text("{}\n")
    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_kept_resolution_is_reused_only_while_its_directories_are_unchanged(
    repo: Repo, tmp_path: Path
) -> None:
    """Issue #24 (the no-op over 5,000 files): a data-file pattern's resolution is reused
    while every directory it looked at is unchanged, and never after a file was added,
    removed or renamed, tracked or untracked, in a subdirectory the pattern reaches too,
    or after its directory was replaced: then it is resolved again, as datasets would."""
    tracked = {f"{d}/x.jsonl": "{}\n" for d in "abcdefj"}
    tracked.update({"g/s/t/x.jsonl": "{}\n", "h/s/x.jsonl": "{}\n", "k/s/t/x.jsonl": "{}\n"})
    repo.write(tracked, commit="data")
    repo.write({f"{d}/u.jsonl": "{}\n" for d in "abcdefg"})  # untracked beside them
    _old(repo.path)
    memo, root = _memo(tmp_path), str(repo.path)
    before = {case: datafiles.matches(p, root, memo) for case, (p, _) in MEMO_CASES.items()}
    for case, (pattern, _) in MEMO_CASES.items():
        _forge(memo, pattern)
        # Nothing changed: the kept resolution answers (its forged name shows it).
        forged = os.path.join(root, pattern.split("/")[0], "forged")
        assert datafiles.matches(pattern, root, memo) == [*before[case], forged], case
    for _, change in MEMO_CASES.values():
        change(repo)
    for case, (pattern, _) in MEMO_CASES.items():
        got = datafiles.matches(pattern, root, memo)
        assert got == datafiles.matches(pattern, root), case  # resolved again, no memo
        assert got != before[case], case


def test_a_resolution_through_a_symbolic_link_is_not_kept(repo: Repo, tmp_path: Path) -> None:
    """What a symbolic link leads to can change while its directory stays the same, so a
    pattern whose directories hold one is resolved each time: a link whose target went
    away is no data file from then on."""
    repo.write({"data/a.jsonl": "{}\n", "elsewhere/b.jsonl": "{}\n"}, commit="data")
    os.symlink("../elsewhere/b.jsonl", repo.path / "data" / "b.jsonl")
    _old(repo.path)
    memo, root = _memo(tmp_path), str(repo.path)
    assert len(datafiles.matches("data/*.jsonl", root, memo)) == 2
    assert not memo._globs
    os.remove(repo.path / "elsewhere" / "b.jsonl")
    assert datafiles.matches("data/*.jsonl", root, memo) == [str(repo.path / "data/a.jsonl")]


def test_a_directory_changed_within_the_racy_window_is_not_kept(repo: Repo, tmp_path: Path) -> None:
    """A directory changed less than 2 s ago may change again within the same timestamp
    tick without its times moving: its pattern's resolution is not kept."""
    repo.write({"data/a.jsonl": "{}\n"})
    memo = _memo(tmp_path)
    assert datafiles.matches("data/*.jsonl", str(repo.path), memo)
    assert not memo._globs


def test_a_kept_resolution_survives_the_process(repo: Repo, tmp_path: Path) -> None:
    """The resolution is kept in the store's code cache: another process reads it."""
    repo.write({"data/a.jsonl": "{}\n"}, commit="data")
    _old(repo.path)
    memo = _memo(tmp_path)
    datafiles.matches("data/*.jsonl", str(repo.path), memo)
    _forge(memo, "data/*.jsonl")
    memo.save()
    again = _memo(tmp_path)
    assert datafiles.matches("data/*.jsonl", str(repo.path), again)[-1] == str(
        repo.path / "data" / "forged"
    )


def test_a_build_after_an_edit_of_the_data_directory_sees_it(tmp_path: Path) -> None:
    """End to end under doit: once a no-op has kept the load's resolution, a file added
    (untracked) and a file renamed in the data directory are built by the next run, whose
    results equal a full build of the same tree in an empty store."""
    from tests.pipeline_project import calls, doit
    from tests.shard_project import make_project, state, write_part

    repo = make_project(Repo.init(tmp_path / "repo"))
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    _old(repo.path / "data")
    log.unlink()
    doit(repo, "run", "preprocess", log=log)  # a no-op: keeps the resolution of data/*.parquet
    assert calls(log) == Counter()
    cache = CodeCache(Store(str(repo.path / ".hfbuild")))
    assert cache.globbed(f"{datafiles._RULE}|{repo.path / 'data/*.parquet'}") is not None
    write_part(repo, "part-4", 400)
    os.rename(repo.path / "data/part-0.parquet", repo.path / "data/part-9.parquet")
    doit(repo, "run", "preprocess", log=log)
    assert {k.split(":", 1)[1] for k in calls(log) if k.startswith("feat:")} >= {"part-4"}
    env = {"HFBUILD_STORE": str(tmp_path / "fresh-store")}
    doit(repo, "run", "preprocess", log=tmp_path / "fresh.log", env=env)
    assert state(repo) == state(repo, env)


def test_files_of_one_directory_share_its_name_as_each_alone_gives_it(
    repo: Repo, tmp_path: Path
) -> None:
    """Identifying many files at once names each as identifying it alone does: files of a
    directory reached through a symbolic link (by the real directory's name), of the root,
    outside the project, and named through `..`."""
    repo.write({"real/a.txt": "a\n", "real/b.txt": "b\n", "top.txt": "t\n"}, commit="data")
    os.symlink("real", repo.path / "link")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "o.txt").write_text("o\n")
    files = [
        *(str(repo.path / "link" / n) for n in ("a.txt", "b.txt")),
        *(str(repo.path / "real" / n) for n in ("a.txt", "b.txt")),
        str(repo.path / "top.txt"),
        str(repo.path / "real" / ".." / "top.txt"),
        str(repo.path / "real" / ".." / "real" / "b.txt"),
        str(tmp_path / "out" / "o.txt"),
    ]
    together = file_identities(files, Snapshot(str(repo.path)), StatCache(None))
    alone = [file_identity(f, Snapshot(str(repo.path)), StatCache(None)) for f in files]
    assert together == alone
    assert [n for n, _ in together][:2] == ["real/a.txt", "real/b.txt"]


def test_a_hidden_directory_no_pattern_part_names_is_no_concern(repo: Repo, tmp_path: Path) -> None:
    """A `**` pattern never enters a hidden directory unless one of its parts starts with
    ".": a symbolic link there (a `.venv`'s `lib64`) leaves the resolution kept; a pattern
    naming hidden entries keeps nothing over such a link."""
    repo.write({"d/a.jsonl": "{}\n", "d/.venv/lib/x.jsonl": "{}\n"}, commit="data")
    os.symlink("lib", repo.path / "d" / ".venv" / "lib64")
    _old(repo.path)
    memo, root = _memo(tmp_path), str(repo.path)
    assert datafiles.matches("d/**/*.jsonl", root, memo) == datafiles.matches("d/**/*.jsonl", root)
    assert len(memo._globs) == 1
    datafiles.matches("d/.*/**", root, memo)
    assert len(memo._globs) == 1
