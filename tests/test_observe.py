"""Run-time observation (issue #9, items 1 and 2): files a transform reads and modules it
imports while it runs are in its key. Real repositories, real `doit` runs in fresh processes.

The project is built once per module and copied for each test (a copy of a repository and its
store is an ordinary clone-with-cache: nothing in either names an absolute path that matters).
"""

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

from tests.helpers import Repo, fork_python, git, run_python
from tests.pipeline_project import calls

FILES = {
    # Test instrumentation (the call log, the path of a file outside the project) never
    # changes an output: those variables stay out of the key.
    "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG", "OUTSIDE_FILE"]\n',
    "pkg/__init__.py": "",
    "pkg/log.py": """
        import os

        def log(stage):
            with open(os.environ["CALL_LOG"], "a") as f:
                f.write(stage + "\\n")
        """,
    "pkg/vocab.py": """
        import pathlib

        HERE = pathlib.Path(__file__).resolve().parent

        def words():
            # A helper reading a data file by path at run time: neither imported nor declared.
            with open(HERE.parent / "conf" / "vocab.txt") as f:
                return set(f.read().split())
        """,
    "pkg/transforms.py": """
        import os
        import pathlib

        from pkg import vocab
        from pkg.log import log

        ROOT = pathlib.Path(__file__).resolve().parent.parent


        def count(batch):
            log("count")
            words = vocab.words()
            return {"n": [sum(w in words for w in t.split()) for t in batch["text"]]}


        def twice(batch):
            log("twice")
            return {"n2": [2 * n for n in batch["n"]]}


        def in_workers(batch):
            log("workers")
            import multiprocess

            # Only the pool's worker processes read the file: the parent never does.
            extra = 0
            if multiprocess.parent_process() is not None:
                extra = int((ROOT / "conf" / "worker.txt").read_text())
            return {"w": [x + extra for x in batch["x"]]}


        def outside(batch):
            log("outside")
            import importlib.metadata

            with open(os.environ["OUTSIDE_FILE"]) as f:  # outside the project: never a dependency
                f.read()
            importlib.metadata.distribution("datasets").read_text("METADATA")  # site-packages
            return {"o": list(batch["x"])}
        """,
    "pkg/scaling.py": """
        import pathlib

        from pkg.log import log

        # Read when the module is imported, before any build starts.
        CONF = pathlib.Path(__file__).resolve().parent.parent / "conf"
        SCALE = int((CONF / "scale.txt").read_text())


        def scaled(batch):
            log("scaled")
            return {"s": [x * SCALE for x in batch["x"]]}
        """,
    "pkg/plugging.py": """
        import importlib

        from pkg.log import log


        def plugged(batch, plugin):
            log("plugged")
            mod = importlib.import_module("plugins." + plugin)
            return {"p": [mod.apply(x) for x in batch["x"]]}
        """,
    "plugins/__init__.py": "",
    "plugins/double.py": "def apply(x):\n    return 2 * x\n",
    "conf/vocab.txt": "row x\n",
    "conf/scale.txt": "3\n",
    "conf/worker.txt": "100\n",
    "dodo.py": """
        from hfbuild import Pipeline
        from pkg import plugging, scaling, transforms as t

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        count = pipe.map("count", raw, t.count, batched=True)
        twice = pipe.map("twice", count, t.twice, batched=True)
        scaled = pipe.map("scaled", raw, scaling.scaled, batched=True)
        workers = pipe.map("workers", raw, t.in_workers, batched=True, batch_size=4, num_proc=2)
        outside = pipe.map("outside", raw, t.outside, batched=True)
        plugged = pipe.map("plugged", raw, plugging.plugged, {"plugin": "double"}, batched=True)


        def task_preprocess():
            yield from pipe.tasks()
        """,
    ".gitignore": ".hfbuild/\n.doit.db*\n__pycache__/\n",
}
ROWS = 12
STAGES = ["count", "twice", "scaled", "workers", "outside", "plugged"]


def _env(base: pathlib.Path) -> dict[str, str]:
    """An isolated environment for processes started outside a test's own fixtures."""
    home = base / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / ".gitconfig").write_text(
        '[init]\n\tdefaultBranch = main\n[protocol "file"]\n\tallow = always\n'
    )
    outside = base / "outside.txt"
    if not outside.exists():
        outside.write_text("first\n")
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HFBUILD_", "HF_"))},
        "HOME": str(home),
        "HF_HOME": str(home / "hf"),
        "HF_DATASETS_CACHE": str(home / "hf" / "datasets"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"),
        "OUTSIDE_FILE": str(outside),
        "UNRELATED": "a",
    }


def run_doit(
    path: pathlib.Path, log: pathlib.Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "doit", "run", "preprocess"],
        cwd=path,
        env={**env, "CALL_LOG": str(log)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, f"doit failed:\n{out.stdout}\n{out.stderr}"
    return out


def hfbuild(
    path: pathlib.Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(pathlib.Path(sys.executable).parent / "hfbuild"), *args],
        cwd=path,
        env={**env, "CALL_LOG": os.devnull},
        capture_output=True,
        text=True,
        check=False,
    )


def lock(path: pathlib.Path) -> dict[str, Any]:
    stages: dict[str, Any] = json.loads((path / "hfbuild.lock").read_text())["stages"]
    return stages


READ = """
import json, sys, warnings
warnings.simplefilter("ignore")
import dodo
print(json.dumps({c: list(dodo.pipe.result(s)[c]) for s, c in json.loads(sys.argv[1]).items()}))
"""


def column(path: pathlib.Path, env: dict[str, str], stage: str, col: str) -> list[Any]:
    """A built stage's column as a process of its own reads it (forked: `fork_python`)."""
    environ = {**env, "PYTHONPATH": str(path), "CALL_LOG": os.devnull}
    out = fork_python(READ, path, environ, [json.dumps({stage: col})])  # fails on an error
    values: list[Any] = json.loads(out.stdout.strip().splitlines()[-1])[col]
    return values


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The project, committed and built once (with its lock committed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = tmp_path_factory.mktemp("observe")
    env = _env(base)
    path = base / "repo"
    repo = Repo.init(path)
    repo.write(FILES)
    (path / "data").mkdir()
    pq.write_table(
        pa.table({"x": list(range(ROWS)), "text": [f"row {'x ' * i}" for i in range(ROWS)]}),
        path / "data" / "part-0.parquet",
    )
    subprocess.run(["git", "add", "-A"], cwd=path, env=env, check=True)
    subprocess.run(["git", "commit", "-qm", "project"], cwd=path, env=env, check=True)
    out = run_doit(path, base / "build.log", env)
    assert set(calls(base / "build.log")) == set(STAGES), out.stdout + out.stderr
    # Before any build observed it, the dynamic import is reported as a possible gap.
    assert "stage 'plugged': pkg/plugging.py:" in out.stderr
    subprocess.run(["git", "add", "hfbuild.lock"], cwd=path, env=env, check=True)
    subprocess.run(["git", "commit", "-qm", "lock"], cwd=path, env=env, check=True)
    return path


@pytest.fixture
def project(built: pathlib.Path, tmp_path: pathlib.Path) -> tuple[pathlib.Path, dict[str, str]]:
    """A private copy of the built project (repository and store) and its environment."""
    path = tmp_path / "repo"
    shutil.copytree(built, path, symlinks=True)
    return path, _env(tmp_path)


def test_file_read_by_a_helper_at_run_time_is_in_the_key(
    project: tuple[pathlib.Path, dict[str, str]], tmp_path: pathlib.Path
) -> None:
    """Editing a file a helper opens by path rebuilds the stage and those after it; explain
    names it with its old and new ids; restoring it is a hit again."""
    path, env = project
    entry = lock(path)["count"]
    assert [p for p, _ in entry["observed"]] == ["conf/vocab.txt"]
    assert entry["fingerprint"] != entry["static_fingerprint"]
    assert column(path, env, "count", "n")[:3] == [1, 2, 3]

    (path / "conf" / "vocab.txt").write_text("row\n")
    ex = hfbuild(path, env, "explain", "count")
    assert ex.returncode == 1
    old_id = entry["observed"][0][1][:12]
    assert f"file conf/vocab.txt read at run time changed: {old_id} -> " in ex.stdout, ex.stdout
    status = json.loads(hfbuild(path, env, "status", "--json").stdout)
    by_stage = {s["stage"]: s for s in status}
    assert by_stage["count"]["reason"].startswith("file conf/vocab.txt read at run time changed")
    assert by_stage["count"]["observed"] == ["conf/vocab.txt"]
    assert by_stage["twice"]["state"] == "stale"  # its input's key changed

    run_doit(path, tmp_path / "edit.log", env)
    assert calls(tmp_path / "edit.log") == Counter(["count", "twice"])
    assert column(path, env, "count", "n")[:3] == [1, 1, 1]
    assert column(path, env, "twice", "n2")[:3] == [2, 2, 2]

    (path / "conf" / "vocab.txt").write_text("row x\n")
    run_doit(path, tmp_path / "revert.log", env)
    assert calls(tmp_path / "revert.log") == Counter()


def test_file_read_while_a_module_is_imported_is_in_the_key(
    project: tuple[pathlib.Path, dict[str, str]], tmp_path: pathlib.Path
) -> None:
    """A module-level read (before any build starts) is attributed to the module, and so
    to every stage whose closure holds it: editing the file rebuilds the stage."""
    path, env = project
    assert [p for p, _ in lock(path)["scaled"]["observed"]] == ["conf/scale.txt"]
    assert column(path, env, "scaled", "s")[:3] == [0, 3, 6]
    (path / "conf" / "scale.txt").write_text("5\n")
    ex = hfbuild(path, env, "explain", "scaled")
    assert "file conf/scale.txt read at run time changed" in ex.stdout, ex.stdout
    run_doit(path, tmp_path / "edit.log", env)
    assert calls(tmp_path / "edit.log") == Counter(["scaled"])
    assert column(path, env, "scaled", "s")[:3] == [0, 5, 10]


def test_reads_in_num_proc_workers_are_observed(
    project: tuple[pathlib.Path, dict[str, str]], tmp_path: pathlib.Path
) -> None:
    """A file only datasets' num_proc=2 worker processes read is in the key: editing it
    rebuilds the stage, with the new content."""
    path, env = project
    assert [p for p, _ in lock(path)["workers"]["observed"]] == ["conf/worker.txt"]
    assert column(path, env, "workers", "w")[:2] == [100, 101]
    (path / "conf" / "worker.txt").write_text("7\n")
    run_doit(path, tmp_path / "edit.log", env)
    assert calls(tmp_path / "edit.log")["workers"] >= 1
    assert set(calls(tmp_path / "edit.log")) == {"workers"}
    assert column(path, env, "workers", "w")[:2] == [7, 8]


def test_module_imported_by_a_computed_name_is_in_the_key(
    project: tuple[pathlib.Path, dict[str, str]], tmp_path: pathlib.Path
) -> None:
    """A plugin loaded with importlib.import_module(computed name) is a dependency: editing
    it rebuilds the stage, explain names it, and once observed the closure is no longer
    reported incomplete."""
    path, env = project
    observed = [p for p, _ in lock(path)["plugged"]["observed"]]
    assert "plugins/double.py" in observed
    assert column(path, env, "plugged", "p")[:3] == [0, 2, 4]
    (path / "plugins" / "double.py").write_text("def apply(x):\n    return 2 * x + 1\n")
    ex = hfbuild(path, env, "explain", "plugged")
    assert "module plugins/double.py imported at run time changed" in ex.stdout, ex.stdout
    rebuilt = run_doit(path, tmp_path / "edit.log", env)
    assert calls(tmp_path / "edit.log") == Counter(["plugged"])
    assert "stage 'plugged': pkg/plugging.py:" not in rebuilt.stderr  # now a known fact
    assert column(path, env, "plugged", "p")[:3] == [1, 3, 5]


def test_no_spurious_rebuilds(
    project: tuple[pathlib.Path, dict[str, str]], tmp_path: pathlib.Path
) -> None:
    """Reads outside the project (a /tmp file, site-packages) and unrelated environment
    changes never enter a key; a stage that read nothing keeps its static fingerprint; a
    second identical build builds nothing."""
    path, env = project
    entry = lock(path)["outside"]
    assert "observed" not in entry and "static_fingerprint" not in entry
    pathlib.Path(env["OUTSIDE_FILE"]).write_text("changed\n")
    env = {**env, "UNRELATED": "b", "SOMETHING_NEW": "1"}
    run_doit(path, tmp_path / "again.log", env)
    assert calls(tmp_path / "again.log") == Counter()
    assert git(path, "status", "--porcelain") == ""  # the lock did not change either


def test_fresh_clone_pulls_from_a_remote_and_verify_needs_no_store(
    built: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """Results pushed to a file:// remote are found by a fresh clone (its keys computed from
    the lock's record of what was read): it builds nothing. `verify` in a clone without any
    store passes, and fails naming a file read at run time once it is edited."""
    env = _env(tmp_path)
    remote = f"file://{tmp_path / 'remote'}"
    src = tmp_path / "src"
    shutil.copytree(built, src, symlinks=True)
    pushed = hfbuild(src, {**env, "HFBUILD_REMOTE": remote}, "push")
    assert pushed.returncode == 0, pushed.stderr

    clone = Repo(src).clone(tmp_path / "clone")
    out = run_doit(clone.path, tmp_path / "clone.log", {**env, "HFBUILD_REMOTE": remote})
    assert calls(tmp_path / "clone.log") == Counter(), out.stdout + out.stderr
    assert out.stdout.count("pulled") == len(STAGES) + 1

    ci = Repo(src).clone(tmp_path / "ci")
    ok = hfbuild(ci.path, env, "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (ci.path / "conf" / "vocab.txt").write_text("edited\n")
    bad = hfbuild(ci.path, env, "verify")
    assert bad.returncode == 1
    assert "file conf/vocab.txt read at run time changed" in bad.stdout + bad.stderr


def test_nothing_observed_without_the_hook(repo: Repo) -> None:
    """HFBUILD_OBSERVE=0 (the benchmark's switch) installs no hook; by default it is installed."""
    out = run_python(
        "import hfbuild.source.observe as o, hfbuild; print(o.installed())",
        repo.path,
        env={"HFBUILD_OBSERVE": "0"},
    )
    assert out.stdout.strip() == "False"
    out = run_python("import hfbuild.source.observe as o, hfbuild; print(o.installed())", repo.path)
    assert out.stdout.strip() == "True"


def test_recording_keeps_project_reads_only(tmp_path: pathlib.Path) -> None:
    """Within a recording: reads under the root are noted (relative paths, os.open too);
    writes, the excluded store, files outside the root and module bytecode are not."""
    from hfbuild.source import observe

    assert observe.installed()
    root = tmp_path / "root"
    (root / "store").mkdir(parents=True)
    for name in ("read.txt", "osopen.txt", "write.txt", "store/entry.txt", "mod.pyc"):
        (root / name).write_text("x")
    (tmp_path / "outside.txt").write_text("x")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with observe.recording(str(root), [str(root / "store")], str(tmp_path / "spool")) as rec:
            with open("read.txt") as f:
                f.read()
            os.close(os.open(root / "osopen.txt", os.O_RDONLY))
            with open(root / "write.txt", "w") as f:
                f.write("y")
            with open(root / "new.txt", "x") as f:
                f.write("y")
            with open(root / "write.txt", "a") as f:
                f.write("y")
            (root / "store" / "entry.txt").read_text()
            (tmp_path / "outside.txt").read_text()
            (root / "mod.pyc").read_bytes()
    finally:
        os.chdir(cwd)
    assert rec.collect() == {str(root / "read.txt"), str(root / "osopen.txt")}


def test_recording_resolves_names_opened_relative_to_a_directory_fd(
    tmp_path: pathlib.Path,
) -> None:
    """`os.open(name, dir_fd=fd)` is noted under the directory `fd` refers to, not the working
    directory (shutil.rmtree's fd walk notes no root file named like a subdirectory); when
    the call's dir_fd cannot be read (a partial, **kwargs) every directory it could be
    relative to is noted, the working directory included: the file read is never missed.
    Reading the call's source to find its dir_fd is not noted as a read."""
    import functools

    from hfbuild.source import observe

    root = tmp_path / "root"
    (root / "sub" / "a").mkdir(parents=True)
    for name in ("x.txt", "sub/x.txt", "a", "sub/a/f.txt"):
        (root / name).write_text("x")
    cwd = os.getcwd()
    os.chdir(root)
    spool = str(tmp_path / "spool")

    def recorded(fn: Any) -> set[str]:
        with observe.recording(str(root), [], spool) as rec:
            fn()
        return {os.path.relpath(p, root) for p in rec.collect()}

    try:
        sub = os.open("sub", os.O_RDONLY)
        assert recorded(lambda: os.close(os.open("x.txt", os.O_RDONLY, dir_fd=sub))) == {
            "sub/x.txt"
        }
        assert recorded(lambda: os.close(os.open("x.txt", os.O_RDONLY, dir_fd=None))) == {"x.txt"}
        assert recorded(lambda: os.close(os.open("x.txt", os.O_RDONLY))) == {"x.txt"}
        partial = functools.partial(os.open, dir_fd=sub)
        assert {"x.txt", "sub/x.txt"} <= recorded(lambda: os.close(partial("x.txt", 0)))
        kwargs = {"dir_fd": sub}
        assert {"x.txt", "sub/x.txt"} <= recorded(
            lambda: os.close(os.open("x.txt", os.O_RDONLY, **kwargs))
        )
        tool = root / "tool"  # a script without .py: its source is not module code
        tool.write_text("import os\ndef run(fd):\n    os.close(os.open('x.txt', 0, dir_fd=fd))\n")
        scope: dict[str, Any] = {}
        exec(compile(tool.read_text(), str(tool), "exec"), scope)
        assert recorded(lambda: scope["run"](sub)) == {"sub/x.txt"}
        os.close(sub)
        walked = recorded(lambda: shutil.rmtree("sub"))
        assert "a" not in walked and "sub/a" in walked
    finally:
        os.chdir(cwd)


def test_a_stage_that_read_nothing_keeps_its_static_fingerprint() -> None:
    """The full key of an empty observation is the static fingerprint itself, and any
    observed file's id changes it."""
    from hfbuild.keys.manifest import full_key

    static = "0" * 32
    assert full_key(static, ()) == static
    one = full_key(static, (("conf/x.yaml", "a" * 40),))
    assert one != static
    assert full_key(static, (("conf/x.yaml", "b" * 40),)) != one


def test_a_module_imported_before_hfbuild_is_warned_about(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A closure module imported before hfbuild (its import-time reads unseen) is named in an
    ObservationWarning when the stage builds; importing hfbuild first silences it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dodo = """
        {first}
        {second}

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        m = pipe.map("m", raw, early.f, batched=True)


        def task_preprocess():
            yield from pipe.tasks()
        """
    early, hf = "from pkg import early", "from hfbuild import Pipeline"
    repo.write(
        {
            "pkg/__init__.py": "",
            "pkg/early.py": """
                WORDS = open("conf/early.txt").read()

                def f(batch):
                    return {"y": [len(WORDS)] * len(batch["x"])}
                """,
            "conf/early.txt": "abc\n",
            "dodo.py": dodo.format(first=early, second=hf),
            ".gitignore": ".hfbuild/\n.doit.db*\n__pycache__/\n",
        }
    )
    (repo.path / "data").mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), repo.path / "data" / "p.parquet")
    repo.commit("project")
    late = run_doit(repo.path, tmp_path / "a.log", dict(os.environ))
    assert "pkg/early.py was imported before hfbuild" in late.stderr, late.stderr
    assert "observed" not in lock(repo.path)["m"]

    repo.write({"dodo.py": dodo.format(first=hf, second=early)}, commit="hfbuild first")
    # A result built while the warning was given counts as having read nothing: build anew.
    fresh = {**os.environ, "HFBUILD_STORE": str(tmp_path / "store2")}
    first = run_doit(repo.path, tmp_path / "b.log", fresh)
    assert "imported before hfbuild" not in first.stderr
    assert [p for p, _ in lock(repo.path)["m"]["observed"]] == ["conf/early.txt"]


def test_pre_commit_check_sees_a_file_read_at_run_time(
    project: tuple[pathlib.Path, dict[str, str]], tmp_path: pathlib.Path
) -> None:
    """`verify --staged` takes the staged content of files read at run time: a rebuilt lock
    staged without the edited file it read fails, naming the file; staging it passes."""
    path, env = project
    (path / "conf" / "vocab.txt").write_text("row\n")
    run_doit(path, tmp_path / "edit.log", env)
    subprocess.run(["git", "add", "hfbuild.lock"], cwd=path, env=env, check=True)
    bad = hfbuild(path, env, "verify", "--staged")
    assert bad.returncode == 1
    assert "file conf/vocab.txt read at run time changed" in bad.stdout + bad.stderr
    subprocess.run(["git", "add", "conf/vocab.txt"], cwd=path, env=env, check=True)
    ok = hfbuild(path, env, "verify", "--staged")
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_explain_wording_for_files_and_modules_used_at_run_time() -> None:
    """A changed file read at run time and a changed module imported at run time are told
    apart, with abbreviated old and new ids; unchanged and unknown files are not reported."""
    from hfbuild.keys.diff import diff_observed

    old = [["conf/x.yaml", "a" * 40], ["plugins/p.py", "b" * 40], ["conf/same.txt", "c" * 40]]
    now = {"conf/x.yaml": "d" * 40, "plugins/p.py": "missing", "conf/same.txt": "c" * 40}
    assert [c.describe() for c in diff_observed(old, now)] == [
        f"file conf/x.yaml read at run time changed: {'a' * 12} -> {'d' * 12}",
        f"module plugins/p.py imported at run time changed: {'b' * 12} -> missing",
    ]
    assert diff_observed(old, {}) == []


def test_gc_removes_the_read_records_of_results_it_removes(
    project: tuple[pathlib.Path, dict[str, str]], tmp_path: pathlib.Path
) -> None:
    """`hfbuild gc` drops the run-time read record of a static fingerprint whose results it
    removed, keeps those of results it keeps (here, the original clone's, which registered
    with the store), and the stage stays up to date."""
    path, env = project
    records = path / ".hfbuild" / "observed"
    t = path / "pkg" / "transforms.py"
    statics = [lock(path)["count"]["static_fingerprint"]]
    for n in (1, 2):
        t.write_text(t.read_text().replace('log("count")', f'log("count")  # edit {n}'))
        run_doit(path, tmp_path / f"edit{n}.log", env)
        subprocess.run(["git", "commit", "-qam", f"edit {n}"], cwd=path, env=env, check=True)
        statics.append(lock(path)["count"]["static_fingerprint"])
    assert len(set(statics)) == 3
    assert all((records / s[:2] / f"{s}.json").is_file() for s in statics)
    out = hfbuild(path, env, "gc", "--keep-days", "0", "--keep-commits", "1")
    assert out.returncode == 0, out.stderr
    first, middle, last = statics
    assert f"observed/{middle[:2]}/{middle}.json" in out.stdout
    assert not (records / middle[:2] / f"{middle}.json").exists()
    assert (records / first[:2] / f"{first}.json").is_file()  # the original clone's lock
    assert (records / last[:2] / f"{last}.json").is_file()
    run_doit(path, tmp_path / "after.log", env)
    assert calls(tmp_path / "after.log") == Counter()


DIR_FD_FILES = {
    "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG"]\n',
    "pkg/__init__.py": "",
    "pkg/viafd.py": """
        import os

        from pkg.log import log


        def _text(fd):
            with os.fdopen(fd) as f:
                return f.read().strip()


        def named(batch):
            # The fd walk of shutil.rmtree: a name opened relative to a directory fd.
            log("named")
            sub = os.open("sub", os.O_RDONLY)
            try:
                fd = os.open("x.txt", os.O_RDONLY, dir_fd=sub)
            finally:
                os.close(sub)
            return {"v": [_text(fd)] * len(batch["x"])}


        def nested(batch):
            log("nested")
            fd = os.open("x.txt", os.O_RDONLY, dir_fd=os.open("sub", os.O_RDONLY))
            return {"v": [_text(fd)] * len(batch["x"])}
        """,
    "pkg/log.py": FILES["pkg/log.py"],
    "sub/x.txt": "first\n",
    "dodo.py": """
        from hfbuild import Pipeline
        from pkg import viafd

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        named = pipe.map("named", raw, viafd.named, batched=True)
        nested = pipe.map("nested", raw, viafd.nested, batched=True)


        def task_preprocess():
            yield from pipe.tasks()
        """,
    ".gitignore": ".hfbuild/\n.doit.db*\n__pycache__/\n",
}


def test_file_opened_relative_to_a_directory_fd_is_recorded_under_that_directory(
    tmp_path: pathlib.Path,
) -> None:
    """A transform that opens `x.txt` relative to a directory fd of `sub` (the event names
    only `x.txt`) has `sub/x.txt` in its key: editing it rebuilds the stage with the new
    content, creating a `x.txt` at the root rebuilds nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    env = _env(tmp_path)
    path = tmp_path / "repo"
    repo = Repo.init(path)
    repo.write(DIR_FD_FILES)
    (path / "data").mkdir()
    pq.write_table(pa.table({"x": [1, 2, 3]}), path / "data" / "part-0.parquet")
    repo.commit("project")
    run_doit(path, tmp_path / "build.log", env)
    assert calls(tmp_path / "build.log") == Counter(["named", "nested"])
    for stage in ("named", "nested"):
        assert [p for p, _ in lock(path)[stage]["observed"]] == ["sub/x.txt"], stage
        assert column(path, env, stage, "v") == ["first"] * 3

    (path / "x.txt").write_text("at the root\n")
    run_doit(path, tmp_path / "root.log", env)
    assert calls(tmp_path / "root.log") == Counter()

    (path / "sub" / "x.txt").write_text("second\n")
    run_doit(path, tmp_path / "edit.log", env)
    assert calls(tmp_path / "edit.log") == Counter(["named", "nested"])
    for stage in ("named", "nested"):
        assert column(path, env, stage, "v") == ["second"] * 3


def test_a_file_read_through_a_link_is_judged_by_where_it_leads(tmp_path: pathlib.Path) -> None:
    """A read file's real path decides whether it is an input (the store and environments
    are not): a link to a file in the store is left out like the store's file, wherever
    the link lies; a project file reached through a linked directory or `..` is kept, under
    its name in its real directory."""
    from hfbuild.keys.fullkey import observed_paths
    from hfbuild.source.gitstate import Snapshot

    root = tmp_path / "root"
    (root / "store").mkdir(parents=True)
    (root / "data" / "sub").mkdir(parents=True)
    (root / "store" / "entry.txt").write_text("x")
    (root / "data" / "a.txt").write_text("x")
    (root / "data" / "b.txt").write_text("x")
    (root / "data" / "to-store.txt").symlink_to(root / "store" / "entry.txt")
    (root / "linked").symlink_to(root / "data")
    (root / "in-store").symlink_to(root / "store")
    used = [
        str(root / "data" / "a.txt"),
        str(root / "data" / "to-store.txt"),  # a link into the store, among project files
        str(root / "linked" / "b.txt"),
        str(root / "data" / "sub" / ".." / "b.txt"),
        str(root / "in-store" / "entry.txt"),
    ]
    snap = Snapshot(str(root))
    got = observed_paths(used, {}, snap, [str(root / "store")])
    assert got == ["data/a.txt", "data/b.txt"]
