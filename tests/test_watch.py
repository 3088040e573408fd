"""Files opened by compiled code, and directories listed, while a stage builds (issue #18,
items 1, 3 and 5): a Rust tokenizer's `from_file`, Arrow's C++ `read_table` (in the build
process and in `num_proc` workers), `glob` over a folder. Real repositories, real `doit`
runs in fresh processes; the project is built once per module and copied for each test.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest

from tests.helpers import Repo, git, read_python
from tests.pipeline_project import calls

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify")

FILES = {
    "pyproject.toml": (
        '[tool.hfbuild]\nuntracked-env = ["CALL_LOG", "OUTSIDE_PARQUET", "WAIT_DIR"]\n'
    ),
    "pkg/__init__.py": "",
    "pkg/log.py": """
        import os

        def log(stage):
            with open(os.environ["CALL_LOG"], "a") as f:
                f.write(stage + "\\n")
        """,
    "pkg/toks.py": """
        import os
        import time

        from tokenizers import Tokenizer

        from pkg.log import log

        TOKENIZER = "tok/tokenizer.json"


        def encode(batch):
            log("tokens")
            tok = Tokenizer.from_file(TOKENIZER)  # Rust opens the file
            return {"ids": [e.ids for e in tok.encode_batch(batch["text"])]}


        def encode_slowly(batch):
            # Holds the build open until the test says go (WAIT_DIR): meanwhile, another
            # process touches project files.
            log("waiting")
            tok = Tokenizer.from_file(TOKENIZER)
            wait = os.environ.get("WAIT_DIR")
            if wait:
                open(os.path.join(wait, "ready"), "w").close()
                while not os.path.exists(os.path.join(wait, "go")):
                    time.sleep(0.05)
            return {"ids": [e.ids for e in tok.encode_batch(batch["text"])]}
        """,
    "pkg/tables.py": """
        import glob
        import os
        import pathlib

        import multiprocess
        import pyarrow.parquet as pq
        from pyarrow import fs

        from pkg.log import log

        ROOT = pathlib.Path(__file__).resolve().parent.parent


        def label(batch):
            log("labels")
            table = pq.read_table(ROOT / "tables" / "lookup.parquet")  # Arrow's C++ opens it
            names = dict(zip(table["x"].to_pylist(), table["label"].to_pylist()))
            return {"label": [names.get(x, "?") for x in batch["x"]]}


        def in_workers(batch):
            log("workers")
            extra = 0
            if multiprocess.parent_process() is not None:  # only the pool's workers read it
                extra = pq.read_table(ROOT / "tables" / "worker.parquet")["add"][0].as_py()
            return {"w": [x + extra for x in batch["x"]]}


        def listed(batch):
            log("listing")
            found = glob.glob(str(ROOT / "extra" / "*"))
            names = ",".join(sorted(os.path.basename(p) for p in found))
            return {"names": [names] * len(batch["x"])}


        def arrow_listed(batch):
            log("arrowlisting")
            # Arrow's C++ lists the folder (opendir): no Python listing, no file opened.
            infos = fs.LocalFileSystem().get_file_info(fs.FileSelector(str(ROOT / "shelf")))
            names = ",".join(sorted(i.base_name for i in infos))
            return {"names": [names] * len(batch["x"])}


        def outside(batch):
            log("outside")
            table = pq.read_table(os.environ["OUTSIDE_PARQUET"])  # outside the project
            return {"o": [x + table["add"][0].as_py() for x in batch["x"]]}
        """,
    "extra/a.txt": "a\n",
    "extra/b.txt": "b\n",
    "shelf/one.csv": "x\n1\n",
    "shelf/two.csv": "x\n2\n",
    "README.md": "a project\n",
    "docs/guide.md": "a guide\n",
    "dodo.py": """
        from hfbuild import Pipeline
        from pkg import tables, toks

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        tokens = pipe.map("tokens", raw, toks.encode, batched=True)
        waiting = pipe.map("waiting", raw, toks.encode_slowly, batched=True)
        labels = pipe.map("labels", raw, tables.label, batched=True)
        workers = pipe.map(
            "workers", raw, tables.in_workers, batched=True, batch_size=4, num_proc=2
        )
        listing = pipe.map("listing", raw, tables.listed, batched=True)
        arrowlisting = pipe.map("arrowlisting", raw, tables.arrow_listed, batched=True)
        outside = pipe.map("outside", raw, tables.outside, batched=True)


        def task_preprocess():
            yield from pipe.tasks()
        """,
    ".gitignore": ".hfbuild/\n.doit.db*\n__pycache__/\n",
}
ROWS = 12
STAGES = ["tokens", "waiting", "labels", "workers", "listing", "arrowlisting", "outside"]


def train_tokenizer(words: list[str], path: pathlib.Path) -> None:
    """A tiny word-level tokenizer: ids follow the words' frequency in `words`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def write_table(path: pathlib.Path, **columns: list[Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def run_doit(path: pathlib.Path, log: pathlib.Path, **env: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "doit", "run", "preprocess"],
        cwd=path,
        env={**os.environ, **env, "CALL_LOG": str(log)},
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
        env={**os.environ, "CALL_LOG": os.devnull},
        capture_output=True,
        text=True,
        check=False,
    )


def explain(path: pathlib.Path, stage: str) -> str:
    out = hfbuild(path, "explain", stage)
    return out.stdout + out.stderr


def observed(path: pathlib.Path, stage: str) -> dict[str, str]:
    entry = json.loads((path / "hfbuild.lock").read_text())["stages"][stage]
    return {p: i for p, i in entry.get("observed", [])}


def keyed(path: pathlib.Path, stage: str) -> dict[str, str]:
    """The files a stage's key holds by content beyond its code: those its builds were seen
    to read, and those an argument or module constant names (the `paths` part, argpaths.py:
    a file a constant names is keyed from the first build on, so it is not observed again)."""
    entry = json.loads((path / "hfbuild.lock").read_text())["stages"][stage]
    named = {p: i for _, p, i in entry["manifest"].get("paths", []) if isinstance(i, str)}
    return {**observed(path, stage), **named}


READ = """
import json, sys, warnings
warnings.simplefilter("ignore")
import dodo
print(json.dumps(list(dodo.pipe.result(sys.argv[1])[sys.argv[2]])))
"""


def column(path: pathlib.Path, stage: str, col: str) -> list[Any]:
    """A built stage's column as a process of its own reads it (forked: `read_python`)."""
    out = read_python(READ, path, env={"CALL_LOG": os.devnull}, args=[stage, col])
    values: list[Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return values


def commit(path: pathlib.Path, message: str) -> None:
    git(path, "add", "-A")
    git(path, "commit", "-qm", message)


WORDS = ["row", "row", "row", "x", "x", "y"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The project, committed and built once, its lock committed."""
    base = tmp_path_factory.mktemp("watch")
    path = base / "repo"
    Repo.init(path).write(FILES)
    train_tokenizer(WORDS, path / "tok" / "tokenizer.json")
    write_table(path / "data" / "part-0.parquet", x=list(range(ROWS)), text=["row x y"] * ROWS)
    write_table(path / "tables" / "lookup.parquet", x=[0, 1, 2], label=["zero", "one", "two"])
    write_table(path / "tables" / "worker.parquet", add=[100])
    write_table(base / "outside.parquet", add=[1])
    commit(path, "project")
    run_doit(path, base / "build.log", OUTSIDE_PARQUET=str(base / "outside.parquet"))
    assert set(calls(base / "build.log")) == set(STAGES)
    commit(path, "lock")
    return path


@pytest.fixture
def project(
    built: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> pathlib.Path:
    """A private copy of the built project (repository and store), with its own file
    outside the project."""
    path = tmp_path / "repo"
    shutil.copytree(built, path, symlinks=True)
    shutil.copy(built.parent / "outside.parquet", tmp_path / "outside.parquet")
    monkeypatch.setenv("OUTSIDE_PARQUET", str(tmp_path / "outside.parquet"))
    return path


def test_tokenizer_file_opened_by_rust_is_in_the_key(
    project: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """`Tokenizer.from_file(TOKENIZER)` (a module constant; Rust opens the file) puts
    tok/tokenizer.json in the key: retrained and committed, the stage is rebuilt with the
    new ids, and explain names the file with its old and new ids. A second identical build
    builds nothing."""
    from tokenizers import Tokenizer

    path = project
    before = keyed(path, "tokens")
    assert list(before) == ["tok/tokenizer.json"]
    old_ids = Tokenizer.from_file(str(path / "tok" / "tokenizer.json")).encode("row x y").ids
    assert column(path, "tokens", "ids")[0] == old_ids

    train_tokenizer(["y", "y", "y", "x", "x", "row", "zzz"], path / "tok" / "tokenizer.json")
    commit(path, "retrained")
    new_ids = Tokenizer.from_file(str(path / "tok" / "tokenizer.json")).encode("row x y").ids
    assert new_ids != old_ids
    text = explain(path, "tokens")
    old = before["tok/tokenizer.json"][:12]
    assert f"TOKENIZER names tok/tokenizer.json: changed {old} -> " in text, text

    run_doit(path, tmp_path / "retrained.log")
    assert calls(tmp_path / "retrained.log") == Counter(["tokens", "waiting"])
    assert column(path, "tokens", "ids")[0] == new_ids
    run_doit(path, tmp_path / "again.log")
    assert calls(tmp_path / "again.log") == Counter()


def test_parquet_read_by_arrow_is_in_the_key(project: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """`pyarrow.parquet.read_table` of a committed lookup file (Arrow's C++ opens it) is in
    the key: the lookup edited and committed, the stage serves the new labels."""
    path = project
    assert list(observed(path, "labels")) == ["tables/lookup.parquet"]
    assert column(path, "labels", "label")[:4] == ["zero", "one", "two", "?"]
    write_table(path / "tables" / "lookup.parquet", x=[0, 1, 2, 3], label=["0", "1", "2", "3"])
    commit(path, "lookup")
    run_doit(path, tmp_path / "edit.log")
    assert calls(tmp_path / "edit.log") == Counter(["labels"])
    assert column(path, "labels", "label")[:5] == ["0", "1", "2", "3", "?"]


def test_file_read_by_compiled_code_in_a_num_proc_worker_is_in_the_key(
    project: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A parquet file only datasets' num_proc=2 workers read, through Arrow, is in the key:
    edited, the stage rebuilds with the new content."""
    path = project
    assert list(observed(path, "workers")) == ["tables/worker.parquet"]
    assert column(path, "workers", "w")[:2] == [100, 101]
    write_table(path / "tables" / "worker.parquet", add=[7])
    run_doit(path, tmp_path / "edit.log")
    assert set(calls(tmp_path / "edit.log")) == {"workers"}
    assert column(path, "workers", "w")[:2] == [7, 8]


def test_a_listed_folder_gaining_a_file_rebuilds(
    project: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A folder the transform globs is keyed by its names: a file added there rebuilds the
    stage (explain: `listing of extra changed: +new.txt`); a file of it edited, which the
    transform never opens, leaves the listing and the stage as they were."""
    assert_a_new_file_rebuilds(project, tmp_path, "listing", "extra", "a.txt", "new.txt")


def test_a_folder_listed_by_compiled_code_gaining_a_file_rebuilds(
    project: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A folder Arrow's C++ lists (`pyarrow.fs` FileSelector: an `opendir` Python never
    sees) is keyed by its names, as a folder Python lists: a file added there rebuilds the
    stage, and explain names it; its files edited (never opened) rebuild nothing; and no
    other stage keys a listing it did not make."""
    assert all(
        not any(p.endswith("/.") or p == "." for p in observed(project, s))
        for s in STAGES
        if s not in ("listing", "arrowlisting")
    )
    assert_a_new_file_rebuilds(project, tmp_path, "arrowlisting", "shelf", "one.csv", "three.csv")


def assert_a_new_file_rebuilds(
    path: pathlib.Path, tmp_path: pathlib.Path, stage: str, folder: str, old: str, new: str
) -> None:
    """`stage` keys `folder`'s listing (its names in its `names` column): `old`, a file
    there, edited rebuilds nothing; `new` added rebuilds the stage, explain names it."""
    names = sorted(p.name for p in (path / folder).iterdir())
    assert list(observed(path, stage)) == [f"{folder}/."]
    assert column(path, stage, "names")[0] == ",".join(names)

    (path / folder / old).write_text("edited, never read\n")
    run_doit(path, tmp_path / "edited.log")
    assert calls(tmp_path / "edited.log") == Counter()

    (path / folder / new).write_text("new\n")
    text = explain(path, stage)
    assert f"listing of {folder} changed: +{new}" in text, text
    run_doit(path, tmp_path / "added.log")
    assert calls(tmp_path / "added.log") == Counter([stage])
    assert column(path, stage, "names")[0] == ",".join(sorted([*names, new]))
    run_doit(path, tmp_path / "again.log")
    assert calls(tmp_path / "again.log") == Counter()


def test_verify_staged_keys_a_listing_by_what_is_staged(
    project: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """`verify --staged` takes a listed folder's names from the index (what the commit
    holds), with the names git ignores there: a build that listed an untracked file, its
    lock staged without that file, is refused until the file is staged; a git-ignored file
    there is not asked for."""
    path = project

    def rebuild_and_verify(log: str) -> subprocess.CompletedProcess[str]:
        run_doit(path, tmp_path / log)
        assert calls(tmp_path / log) == Counter(["listing"])
        git(path, "add", "hfbuild.lock")
        return hfbuild(path, "verify", "--staged")

    (path / ".gitignore").write_text((path / ".gitignore").read_text() + "extra/*.log\n")
    commit(path, "ignore logs")
    (path / "extra" / "run.log").write_text("ignored\n")
    out = rebuild_and_verify("ignored.log")
    assert out.returncode == 0, out.stdout + out.stderr
    commit(path, "lock")

    (path / "extra" / "new.txt").write_text("new\n")
    out = rebuild_and_verify("added.log")
    assert out.returncode != 0 and "listing" in out.stdout + out.stderr, out.stdout + out.stderr
    git(path, "add", "extra/new.txt")
    out = hfbuild(path, "verify", "--staged")
    assert out.returncode == 0, out.stdout + out.stderr


def test_reads_outside_the_project_change_nothing(
    project: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A parquet file outside the project read through Arrow is never in a key: changing it
    rebuilds nothing, and the stage that read it keeps its static fingerprint."""
    path = project
    entry = json.loads((path / "hfbuild.lock").read_text())["stages"]["outside"]
    assert "observed" not in entry and "static_fingerprint" not in entry
    assert observed(path, "labels")  # the project's reads are seen in the same builds
    write_table(tmp_path / "outside.parquet", add=[5])
    run_doit(path, tmp_path / "again.log")
    assert calls(tmp_path / "again.log") == Counter()
    assert git(path, "status", "--porcelain") == ""


def test_another_process_touching_project_files_during_a_build_rebuilds_nothing_later(
    project: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """While a stage builds (its tokenizer retrained), another process creates a file,
    appends to one and reads a third in the project: the build's key has the tokenizer it
    read, not the files written; the next run builds nothing, and editing the file written
    meanwhile changes nothing either."""
    path = project
    train_tokenizer(["x", "x", "y", "row", "w"], path / "tok" / "tokenizer.json")
    commit(path, "retrained")
    wait = tmp_path / "wait"
    wait.mkdir()
    build = subprocess.Popen(
        [sys.executable, "-m", "doit", "run", "preprocess"],
        cwd=path,
        env={**os.environ, "CALL_LOG": str(tmp_path / "build.log"), "WAIT_DIR": str(wait)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (wait / "ready").exists():
            assert build.poll() is None, build.communicate()[0]
            assert time.monotonic() < deadline, "the build never started its stage"
            time.sleep(0.05)
        other = "touch notes.txt && echo more >> README.md && cat docs/guide.md >/dev/null"
        subprocess.run(["sh", "-c", other], cwd=path, check=True)
        (wait / "go").touch()
        out, _ = build.communicate(timeout=300)
    finally:
        if build.poll() is None:
            build.kill()
    assert build.returncode == 0, out
    seen = keyed(path, "waiting")
    assert "tok/tokenizer.json" in seen
    assert "notes.txt" not in seen and "README.md" not in seen

    run_doit(path, tmp_path / "again.log")
    assert calls(tmp_path / "again.log") == Counter()
    (path / "README.md").write_text("edited after the build\n")
    (path / "notes.txt").write_text("edited after the build\n")
    run_doit(path, tmp_path / "edited.log")
    assert calls(tmp_path / "edited.log") == Counter()


FLOOD_FILES = {
    "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG", "FLOOD"]\n',
    "pkg/__init__.py": "",
    "pkg/log.py": FILES["pkg/log.py"],
    "pkg/flood.py": """
        import os
        import subprocess
        import sys

        from hfbuild.source import watch
        from pkg.log import log

        OPENS = "for _ in range(20000): open('conf/a.txt').close()"


        def flood(batch):
            log("flood")
            with open("conf/a.txt") as f:
                text = f.read().strip()
            if os.environ.get("FLOOD"):
                # The reader thread cannot drain while its lock is held: 40,000 events from
                # another process overflow the kernel's queue (16,384 by default).
                with watch._watchers[os.path.realpath(os.getcwd())].lock:
                    subprocess.run([sys.executable, "-c", OPENS], check=True)
            return {"t": [text] * len(batch["x"])}


        def after(batch):
            log("after")
            return {"u": [t.upper() for t in batch["t"]]}
        """,
    "conf/a.txt": "a\n",
    "dodo.py": """
        from hfbuild import Pipeline
        from pkg import flood

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        flooded = pipe.map("flooded", raw, flood.flood, batched=True)
        after = pipe.map("after", flooded, flood.after, batched=True)


        def task_preprocess():
            yield from pipe.tasks()
        """,
    ".gitignore": ".hfbuild/\n.doit.db*\n__pycache__/\n",
}


def test_a_build_whose_events_were_lost_is_built_again(repo: Repo, tmp_path: pathlib.Path) -> None:
    """When inotify's queue overflows during a build, its reads are unknown: the run that
    built it goes on (the stage after it takes it as its input), but the next process does
    not find it up to date (explain says why) and builds it again (the stage after it is cut
    off: the same result); then a no-op."""
    path = repo.path
    repo.write(FLOOD_FILES)
    write_table(path / "data" / "p.parquet", x=[1, 2, 3])
    commit(path, "project")
    run_doit(path, tmp_path / "flood.log", FLOOD="1")
    assert calls(tmp_path / "flood.log") == Counter(["flood", "after"])
    seen = observed(path, "flooded")
    assert seen["?reads-not-all-observed"] == "unknown" and "conf/a.txt" in seen

    text = explain(path, "flooded")
    assert "the last build's reads were not all observed" in text, text
    run_doit(path, tmp_path / "again.log")
    # Built again to the same rows: the stage after it, keyed by its result, is cut off.
    assert calls(tmp_path / "again.log") == Counter(["flood"])
    assert list(observed(path, "flooded")) == ["conf/a.txt"]
    assert column(path, "after", "u") == ["A"] * 3
    run_doit(path, tmp_path / "noop.log")
    assert calls(tmp_path / "noop.log") == Counter()


def _recorded(root: pathlib.Path, tmp_path: pathlib.Path, fn: Any) -> Any:
    from hfbuild.source import observe

    with observe.recording(str(root), [], str(tmp_path / "spool"), True) as rec:
        fn()
        files = {os.path.relpath(p, root) for p in rec.collect()}
        listings = {os.path.relpath(p, root) for p in rec.collect_listings()}
        return files, listings, rec.unknown


def test_window_tells_reads_by_any_process_from_writes(tmp_path: pathlib.Path) -> None:
    """Within a recording, files other processes read are noted (a read-write open that
    reads first too); files created, overwritten or appended to are not, nor is a file
    read back after it was written, nor anything under `.git`, nor the files of a directory
    made or moved in during the window. Those directories are watched from then on: a
    later recording sees their files read."""
    root = tmp_path / "root"
    (root / ".git").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "in.txt").write_text("x\n")
    for name in ("read.txt", "over.txt", "append.txt", "rw.txt", "back.txt", ".git/HEAD"):
        (root / name).write_text("x\n")
    first = (
        "cat read.txt .git/HEAD > /dev/null; echo y > over.txt; echo y >> append.txt; "
        "touch new.txt; echo y > back.txt; cat back.txt > /dev/null; "
        "mkdir -p sub/deeper; echo z > sub/deeper/made.txt; mv ../elsewhere moved; "
        "cat sub/deeper/made.txt moved/in.txt > /dev/null; "
        f"{sys.executable} -c \"f = open('rw.txt', 'r+'); f.read(); f.write('w'); f.close()\""
    )
    files, _, unknown = _recorded(
        root, tmp_path, lambda: subprocess.run(["sh", "-c", first], cwd=root, check=True)
    )
    assert files == {"read.txt", "rw.txt"}
    assert unknown is None
    later = "cat sub/deeper/made.txt moved/in.txt > /dev/null"
    files, _, _ = _recorded(
        root, tmp_path, lambda: subprocess.run(["sh", "-c", later], cwd=root, check=True)
    )
    assert files == {"sub/deeper/made.txt", "moved/in.txt"}


def test_directories_opened_by_compiled_code_are_listings_the_import_systems_are_not(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within a recording, a directory another process lists (`ls`: C's opendir) is a
    listing; one the import system lists to find a module (Python's os.listdir, which the
    watch sees opened as well) is not, nor is one nobody opens."""
    import importlib

    root = tmp_path / "root"
    for d in ("mods", "seen", "quiet"):
        (root / d).mkdir(parents=True)
    (root / "mods" / "watch_test_newmod.py").write_text("X = 1\n")
    (root / "seen" / "a.txt").write_text("a\n")
    (root / "quiet" / "b.txt").write_text("b\n")
    monkeypatch.syspath_prepend(str(root / "mods"))

    def build() -> None:
        importlib.invalidate_caches()
        importlib.import_module("watch_test_newmod")  # the import system lists mods/
        subprocess.run(["ls", "seen"], cwd=root, check=True, capture_output=True)

    files, listings, unknown = _recorded(root, tmp_path, build)
    assert listings == {"seen"} and unknown is None
    assert files == {"mods/watch_test_newmod.py"}  # the module executed, as always


def test_lost_events_make_a_windows_reads_unknown(tmp_path: pathlib.Path) -> None:
    """An overflow of the kernel's queue (the reader held off while another process opens a
    file 20,000 times) leaves the recording's reads unknown."""
    from hfbuild.source import watch

    root = tmp_path / "root"
    root.mkdir()
    (root / "f.txt").write_text("x")
    opens = "for _ in range(20000): open('f.txt').close()"

    def flood() -> None:
        with watch._watchers[os.path.realpath(root)].lock:
            subprocess.run([sys.executable, "-c", opens], cwd=root, check=True)

    _, _, unknown = _recorded(root, tmp_path, flood)
    assert unknown == watch.OVERFLOW


def test_listings_by_the_program_are_recorded_not_the_import_systems(
    tmp_path: pathlib.Path,
) -> None:
    """os.listdir, os.scandir (by path and by fd), glob and os.walk inside the root are
    noted; importlib.metadata scanning the root for distributions, and an import finding a
    module there, are not."""
    import glob
    import importlib
    import importlib.metadata

    root = tmp_path / "root"
    for d in ("a", "b", "c", "d/e", "f", "mods"):
        (root / d).mkdir(parents=True)
    (root / "mods" / "listed_mod_x.py").write_text("X = 1\n")

    def program() -> None:
        os.listdir(root / "a")
        list(os.scandir(root / "b"))
        fd = os.open(root / "c", os.O_RDONLY)
        try:
            list(os.scandir(fd))
        finally:
            os.close(fd)
        list(os.walk(root / "d"))
        glob.glob(str(root / "f" / "*.txt"))
        list(importlib.metadata.distributions(path=[str(root)]))
        sys.path.insert(0, str(root / "mods"))
        try:
            importlib.import_module("listed_mod_x")
        finally:
            sys.path.remove(str(root / "mods"))
            sys.modules.pop("listed_mod_x", None)

    _, listings, _ = _recorded(root, tmp_path, program)
    assert listings == {"a", "b", "c", "d", "d/e", "f"}


SHIPPED = """
import json, os, warnings
warnings.simplefilter("ignore")
import dodo
from hfbuild.builds import raytree as rx

ms = dodo.pipe.manifests()
out = {"tokens": [p for p, _ in rx.shipped_files(ms["tokens"])]}
files = rx.shipped_files(ms["listing"])
with rx.tree(dodo.pipe, files) as d:
    out["listing"] = {
        name: open(os.path.join(d, "extra", name)).read()
        for name in sorted(os.listdir(os.path.join(d, "extra")))
    }
print(json.dumps(out))
"""


def test_ray_ships_a_file_read_by_compiled_code_and_a_listed_folder(
    project: pathlib.Path,
) -> None:
    """A Ray unit's tree holds the tokenizer its builds were seen to open through Rust, and
    the folder its builds listed, with the names its listing holds and their bytes (so the
    worker lists what the driver lists)."""
    out = subprocess.run(
        [sys.executable, "-c", SHIPPED],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(project), "CALL_LOG": os.devnull},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "tok/tokenizer.json" in got["tokens"]
    assert got["listing"] == {"a.txt": "a\n", "b.txt": "b\n"}


def test_every_directory_of_a_tree_is_watched_leaves_unlisted(tmp_path: pathlib.Path) -> None:
    """Every directory of the project is watched, those with one subdirectory (link count 3)
    or several as much as the leaves that are not listed (link count 2): a file read deep in
    it by another process is recorded; an environment in it is not watched; a directory made
    in a leaf after the watch exists is watched from then on."""
    from hfbuild.source import watch

    root = tmp_path / "root"
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.txt").write_text("x")
    (root / "a" / "leaf").mkdir()
    (root / "venv" / "lib").mkdir(parents=True)
    (root / "venv" / "pyvenv.cfg").write_text("home = /usr\n")
    (root / "venv" / "lib" / "mod.txt").write_text("x")
    (tmp_path / "outside" / "made").mkdir(parents=True)
    (tmp_path / "outside" / "made" / "in.txt").write_text("x")
    script = "cat a/b/c/deep.txt venv/lib/mod.txt > /dev/null"
    files, _, unknown = _recorded(
        root, tmp_path, lambda: subprocess.run(["sh", "-c", script], cwd=root, check=True)
    )
    assert files == {"a/b/c/deep.txt"} and unknown is None
    watcher = watch._watchers[os.path.realpath(root)]
    assert watcher is not None
    assert watcher.directories == 5  # root, a, a/b, a/b/c, a/leaf
    (tmp_path / "outside" / "made").rename(root / "a" / "leaf" / "made")
    later = "cat a/leaf/made/in.txt a/b/c/deep.txt > /dev/null"
    files, _, _ = _recorded(
        root, tmp_path, lambda: subprocess.run(["sh", "-c", later], cwd=root, check=True)
    )
    assert files == {"a/leaf/made/in.txt", "a/b/c/deep.txt"}
    assert watcher.directories == 6
