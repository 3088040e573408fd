"""The no-import record (issue #20): a check whose facts all hold answers without importing
dodo.py's transform modules, and its answer equals the full path's.

Every check runs in a fresh process. The transform module appends a line to a log when it is
imported, so the number of imports is counted, not guessed. `HFBUILD_RECORD=0` gives the full
path's answer to compare with.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import Repo

PROJECT = {
    "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["IMPORT_LOG"]\n',
    ".gitignore": ".doit.db*\n",
    "pkg/__init__.py": "",
    "pkg/util.py": "OFFSET = 1\n",
    "pkg/heavy.py": """
        import os

        with open(os.environ["IMPORT_LOG"], "a") as f:  # the import, counted
            f.write("heavy\\n")

        import fakepkg

        from pkg.util import OFFSET


        def feat(row, k=1, vocab="data/vocab.txt"):
            scale = int(os.environ.get("SCALE", "1"))
            with open("data/extra.txt") as f:  # read at run time: observed
                extra = len(f.read())
            return {"y": row["x"] * k * scale + OFFSET + extra + fakepkg.ONE}
        """,
    "data/a.jsonl": '{"x": 1}\n{"x": 2}\n',
    "data/vocab.txt": "a b c\n",
    "data/extra.txt": "xyz\n",
    "dodo.py": """
        from hfbuild import Pipeline

        pipe = Pipeline()
        raw = pipe.load("raw", "json", data_files="data/*.jsonl", split="train")
        feat = pipe.map("feat", raw, "pkg.heavy:feat", {"k": 2, "vocab": "data/vocab.txt"})


        def task_preprocess():
            yield from pipe.tasks()
        """,
}


class Project:
    def __init__(self, tmp: pathlib.Path) -> None:
        self.repo = Repo.init(tmp / "repo").write(PROJECT, commit="project")
        self.site = tmp / "site"  # a third-party package outside the project, on PYTHONPATH
        (self.site / "fakepkg").mkdir(parents=True)
        (self.site / "fakepkg" / "__init__.py").write_text("ONE = 1\n")
        self.dist_info(version="1.0")
        self.log = tmp / "imports.log"
        self.log.write_text("")
        self.env = {
            **os.environ,
            "IMPORT_LOG": str(self.log),
            "PYTHONPATH": str(self.site),
            "HFBUILD_OBSERVE": "1",
        }

    def dist_info(self, version: str) -> None:
        for old in self.site.glob("fakepkg-*.dist-info"):
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        d = self.site / f"fakepkg-{version}.dist-info"
        d.mkdir()
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakepkg\nVersion: {version}\n")

    def imports(self) -> int:
        return len(self.log.read_text().splitlines())

    def run(self, *args: str, record: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if not record:
            env["HFBUILD_RECORD"] = "0"
        return subprocess.run(
            [sys.executable, *args], cwd=self.repo.path, env=env, capture_output=True, text=True
        )

    def doit(self, **how: Any) -> subprocess.Popen[str]:
        """`doit run preprocess` started, not waited for."""
        return subprocess.Popen(
            [sys.executable, "-m", "doit", "run", "preprocess"],
            cwd=self.repo.path,
            env=self.env,
            text=True,
            **how,
        )

    def status(self, *, record: bool = True) -> tuple[Any, bool]:
        """`hfbuild status --json` and whether it imported the transform module."""
        before = self.imports()
        out = self.run("-m", "hfbuild", "status", "--json", record=record)
        assert out.returncode in (0, 1), out.stderr
        return json.loads(out.stdout), self.imports() > before

    def build(self) -> None:
        out = self.run("-m", "doit", "run", "preprocess")
        assert out.returncode == 0, out.stdout + out.stderr

    def settle(self) -> Any:
        """Checks until one answers from the record (the entry new, then confirmed)."""
        for _ in range(4):
            answer, imported = self.status()
            if not imported:
                return answer
        raise AssertionError("the record never answered")


def _states(answer: Any) -> list[tuple[str, str, str, str | None, list[str]]]:
    return [
        (s["stage"], s["fingerprint"], s["state"], s["reason"], s["dirty_files"]) for s in answer
    ]


def _edit(p: Project, kind: str, n: int) -> None:
    """One edit of a fact of kind `kind` (n makes each edit's content new)."""
    root = p.repo.path
    if kind == "closure":
        (root / "pkg/util.py").write_text(f"OFFSET = {n}\n")
    elif kind == "dodo":
        text = (root / "dodo.py").read_text()
        (root / "dodo.py").write_text(text.replace('{"k": ', f'{{"k": {n} + 0 * ', 1))
    elif kind == "data":
        (root / "data/a.jsonl").write_text(f'{{"x": {n}}}\n')
    elif kind == "listing":
        (root / f"data/b{n}.jsonl").write_text('{"x": 7}\n')
    elif kind == "argpath":
        (root / "data/vocab.txt").write_text(f"v{n}\n")
    elif kind == "runtime-read":
        (root / "data/extra.txt").write_text("e" * n + "\n")
    elif kind == "env":
        p.env["SCALE"] = str(n)
    elif kind == "dist-info":
        p.dist_info(version=f"{n}.0")
    elif kind == "pythonpath":
        extra = root.parent / f"extra{n}"
        extra.mkdir(exist_ok=True)
        p.env["PYTHONPATH"] = f"{p.site}{os.pathsep}{extra}"
    elif kind == "module-value":  # dodo.py reassigns a value the transform reads
        text = (root / "dodo.py").read_text()
        (root / "dodo.py").write_text(text + f"\nimport pkg.util\npkg.util.OFFSET = {n}\n")
    elif kind == "stage":  # the index takes what the work tree holds (the hook's usual state)
        p.repo.git("add", "-A")
    elif kind == "git":
        p.repo.commit(f"edit {n}")
    elif kind == "store":  # the result removed from the store
        p.run("-m", "doit", "clean", "preprocess")
    elif kind == "volatile":  # an argument that differs between two imports of one tree
        text = (root / "dodo.py").read_text()
        (root / "dodo.py").write_text(
            "import random\n" + text.replace('{"k": ', '{"k": random.randrange(10**9) * 0 + ', 1)
            if "random" not in text
            else text.replace("random.randrange(10**9) * 0", "random.randrange(10**9)", 1)
        )
    else:
        raise AssertionError(kind)


KINDS = [
    "closure",
    "dodo",
    "data",
    "listing",
    "argpath",
    "runtime-read",
    "env",
    "dist-info",
    "pythonpath",
    "module-value",
    "git",
    "store",
]


def test_an_up_to_date_check_answers_without_importing_and_as_the_full_path(
    tmp_path: pathlib.Path,
) -> None:
    p = Project(tmp_path)
    p.build()
    answer = p.settle()
    assert [s["state"] for s in answer] == ["up to date", "up to date"]
    full, imported = p.status(record=False)
    assert imported and _states(full) == _states(answer)
    # doit's no-op answers from its own record too.
    for _ in range(3):
        before = p.imports()
        out = p.run("-m", "doit", "run", "preprocess")
        assert "feat (2 rows, up to date)" in out.stdout, out.stdout + out.stderr
    assert p.imports() == before


COMMANDS = [
    ("explain", "feat"),
    ("explain", "feat", "--json"),
    ("verify",),
    ("verify", "--staged"),
    ("status", "--strict"),
    ("graph",),
    ("graph", "--format", "dot"),
    ("build",),  # last: after an edit it builds, so the two runs cannot print the same
]


def _said(out: subprocess.CompletedProcess[str]) -> tuple[int, str, str]:
    return out.returncode, out.stdout, out.stderr


def test_each_command_answers_from_the_record_as_from_dodo(tmp_path: pathlib.Path) -> None:
    """Each command over one built project (none of them changes what the others answer:
    `build` last, with nothing to build): from the record without importing, as the full
    path; then after a staged edit of its own (a closure file's new content), each takes the
    full path and answers as it."""
    p = Project(tmp_path)
    p.build()
    p.repo.commit("the lock")  # so that verify --staged passes
    for args in COMMANDS:
        for _ in range(4):  # the entry new, then confirmed (a racy file may take one more)
            before = p.imports()
            out = p.run("-m", "hfbuild", *args)
            if p.imports() == before:
                break
        assert p.imports() == before, (args, out.stdout + out.stderr)
        full = p.run("-m", "hfbuild", *args, record=False)
        assert _said(out) == _said(full), args
    for n, args in enumerate(COMMANDS[:-1], start=3):
        # A staged edit: the check takes the full path, and answers as it.
        (p.repo.path / "pkg/util.py").write_text(f"OFFSET = {n}\n")
        p.repo.git("add", "-A")
        before = p.imports()
        out = p.run("-m", "hfbuild", *args)
        assert p.imports() > before, args
        full = p.run("-m", "hfbuild", *args, record=False)
        assert _said(out) == _said(full), args


@pytest.mark.parametrize("kind", KINDS)
def test_an_edit_of_each_fact_kind_takes_the_full_path(tmp_path: pathlib.Path, kind: str) -> None:
    p = Project(tmp_path)
    p.build()
    p.settle()
    _edit(p, kind, 5)
    answer, imported = p.status()
    assert imported, f"an edit of kind {kind} answered from the record"
    full, _ = p.status(record=False)
    assert _states(answer) == _states(full)
    assert _states(p.settle()) == _states(full)


def _volatile(p: Project) -> Project:
    """`p` with an argument drawn from `random` at each import of dodo.py, committed."""
    dodo = p.repo.path / "dodo.py"
    dodo.write_text(
        dodo.read_text()
        .replace('{"k": 2,', '{"k": random.random(),')
        .replace("from hfbuild import Pipeline", "import random\nfrom hfbuild import Pipeline")
    )
    p.repo.commit("volatile")
    return p


def test_a_volatile_pipeline_always_takes_the_full_path(tmp_path: pathlib.Path) -> None:
    p = _volatile(Project(tmp_path))
    for _ in range(4):
        _, imported = p.status()
        assert imported


EDITS = st.lists(
    st.tuples(st.sampled_from([*KINDS, "volatile", "none", "settle", "stage"]), st.integers(2, 40))
)


@settings(
    max_examples=int(os.environ.get("HFBUILD_RECORD_EXAMPLES", "2")),
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
@given(edits=EDITS.map(lambda xs: xs[:6]))
@example(
    edits=[
        ("data", 3),
        ("settle", 0),
        ("argpath", 4),
        ("none", 0),
        ("volatile", 5),
        ("volatile", 6),
    ]
)
@example(edits=[("closure", 3), ("settle", 0), ("stage", 0), ("data", 4), ("settle", 0)])
def test_record_answers_equal_the_full_path_over_random_edits(
    tmp_path_factory: pytest.TempPathFactory, edits: list[tuple[str, int]]
) -> None:
    p = Project(tmp_path_factory.mktemp("diff"))
    p.build()
    p.settle()
    volatile = False
    for kind, n in edits:
        if kind == "settle" and not volatile:
            p.settle()
        elif kind not in ("none", "settle"):
            _edit(p, kind, n)
        volatile = volatile or "random.randrange(10**9) +" in (p.repo.path / "dodo.py").read_text()
        answer, imported = p.status()
        if volatile:  # two full paths differ too: the record must never answer
            assert imported, (kind, n)
            continue
        full, _ = p.status(record=False)
        assert _states(answer) == _states(full), (kind, n)


# -- the hook's usual commit (issue #20's leftovers) ------------------------------------------

# What git and the pre-commit framework set for a commit's hook (the author date is new at each
# commit); `verify --staged` run by hand stands in for the hook with them.
HOOK_ENV = {
    "GIT_AUTHOR_DATE": "@1796433676 +0000",
    "GIT_AUTHOR_EMAIL": "a@example.com",
    "GIT_AUTHOR_NAME": "a",
    "GIT_EDITOR": ":",
    "GIT_EXEC_PATH": "/usr/lib/git-core",
    "GIT_INDEX_FILE": ".git/index",
    "GIT_PREFIX": "",
    "PRE_COMMIT": "1",
}


def _hook_env(p: Project) -> dict[str, str]:
    return {**p.env, **HOOK_ENV, "PATH": f"/usr/lib/git-core{os.pathsep}{p.env['PATH']}"}


def _staged_check(p: Project) -> tuple[tuple[int, str, str], tuple[int, str, str], bool]:
    """`verify --staged` as a hook runs it: its answer, the full path's, and whether it
    imported the transform module."""
    env = _hook_env(p)
    before = p.imports()
    out = subprocess.run(
        [sys.executable, "-m", "hfbuild", "verify", "--staged"],
        cwd=p.repo.path,
        env=env,
        capture_output=True,
        text=True,
    )
    imported = p.imports() > before
    full = subprocess.run(
        [sys.executable, "-m", "hfbuild", "verify", "--staged"],
        cwd=p.repo.path,
        env={**env, "HFBUILD_RECORD": "0"},
        capture_output=True,
        text=True,
    )
    return (
        (out.returncode, out.stdout, out.stderr),
        (full.returncode, full.stdout, full.stderr),
        imported,
    )


def test_the_hook_of_a_commit_staging_the_checked_work_tree_imports_nothing(
    tmp_path: pathlib.Path,
) -> None:
    """edit -> `doit run` -> a check (`hfbuild status`, twice: its entry new, then confirmed)
    -> `git add -A` -> `git commit`: the shipped hook, run by the real pre-commit framework,
    answers from the work tree's entry without importing the transform module; `status` after
    the `git add` too, with the files now staged, as the full path says."""
    from tests.test_hook_shipped import hooks_repo

    p = Project(tmp_path)
    hooks, rev = hooks_repo(tmp_path)
    cfg = f"repos:\n- repo: {hooks}\n  rev: {rev}\n  hooks: [{{id: hfbuild-verify}}]\n"
    (p.repo.path / ".pre-commit-config.yaml").write_text(cfg)
    p.env["HFBUILD_PYTHON"] = sys.executable  # the shell the user builds in sets it too
    env = p.env
    pre_commit = pathlib.Path(sys.executable).parent / "pre-commit"
    subprocess.run([str(pre_commit), "install"], cwd=p.repo.path, env=env, check=True)

    def commit(message: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "commit", "-m", message],
            cwd=p.repo.path,
            env=env,
            capture_output=True,
            text=True,
        )

    p.build()
    p.repo.git("add", "-A")
    first = commit("built")
    assert first.returncode == 0, first.stdout + first.stderr

    (p.repo.path / "pkg/util.py").write_text("OFFSET = 3\n")  # a closure file
    (p.repo.path / "data/b.jsonl").write_text('{"x": 5}\n')  # new data, untracked
    p.build()
    p.settle()
    p.repo.git("add", "-A")
    answer, imported = p.status()
    assert not imported
    full, _ = p.status(record=False)
    assert _states(answer) == _states(full)
    assert sorted(f.split(" ")[0] for s in answer for f in s["dirty_files"]) == [
        "data/b.jsonl",
        "pkg/util.py",
    ], answer
    before = p.imports()
    done = commit("edit, built")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hfbuild verify --staged" in done.stdout + done.stderr  # the hook ran
    assert p.imports() == before, "the hook imported the transform module"


@pytest.mark.parametrize("case", ["partial-add", "unstaged-closure-edit", "staged-data-reverted"])
def test_a_staged_state_other_than_the_work_tree_takes_the_full_path(
    tmp_path: pathlib.Path, case: str
) -> None:
    """When what is staged differs from the work tree the confirmed entry was computed over,
    `verify --staged` imports dodo.py and answers as the full path."""
    p = Project(tmp_path)
    p.build()
    p.repo.git("add", "-A")
    p.repo.commit("built")
    root = p.repo.path
    if case == "partial-add":
        (root / "pkg/util.py").write_text("OFFSET = 3\n")
        (root / "data/a.jsonl").write_text('{"x": 9}\n')
        p.build()
        p.repo.git("add", "pkg/util.py", "hfbuild.lock")
    elif case == "unstaged-closure-edit":
        (root / "pkg/util.py").write_text("OFFSET = 3\n")
        p.build()
        p.repo.git("add", "-A")
        (root / "pkg/util.py").write_text("OFFSET = 4\n")
        p.build()
    else:
        original = (root / "data/a.jsonl").read_text()
        (root / "data/a.jsonl").write_text('{"x": 9}\n')
        p.build()
        p.repo.git("add", "-A")
        (root / "data/a.jsonl").write_text(original)
        p.build()
    p.settle()
    got, full, imported = _staged_check(p)
    assert imported, f"{case}: answered from the record"
    assert got == full


def test_every_file_of_hfbuild_is_a_fact(tmp_path: pathlib.Path) -> None:
    """hfbuild's own modules, in each of its packages, are facts of the record, so an edit or
    an upgrade of hfbuild takes the full path (its files were listed from two directories)."""
    import hfbuild
    from hfbuild.source.recordfacts import capture
    from hfbuild.store.store import Store

    repo = Repo.init(tmp_path / "p")
    repo.write({"a.txt": "a\n"}, commit="init")
    store = Store(repo.path / ".hfbuild")
    facts = capture(str(repo.path), store, str(repo.path / "hfbuild.lock"))
    assert facts is not None
    package = pathlib.Path(hfbuild.__file__).parent
    ours = {str(p) for p in package.rglob("*.py")}
    assert {str(p.relative_to(package)) for p in package.rglob("*.py")} >= {
        "store/store.py",
        "cli/commands/gc.py",
    }
    assert sorted(ours - set(facts["files"])) == []


# -- the cycle: edit, `doit run`, `git add`, commit (a build's side check, pipeline/witness.py) --

# A module whose import costs `record.HEAVY` (1 s) of CPU: a build starts a side check only for
# a pipeline whose full check was seen to cost that or more (`Session.heavy`), and a check
# importing it costs that plus the interpreter's, doit's or the CLI's, hfbuild's and dodo.py's.
BURN = """
import time as _time

_t0 = _time.process_time()
while _time.process_time() - _t0 < 1.0:  # real import-time work, as a heavy library's
    pass
"""


def _heavy(p: Project, module: str = "pkg/heavy.py") -> None:
    """`module`'s import made to cost 1 s of CPU, committed; then one full check, which
    records what a check of this pipeline costs."""
    path = p.repo.path / module
    path.write_text(BURN + path.read_text())
    p.repo.git("add", "-A")
    p.repo.commit("a heavy import")
    _, imported = p.status()
    assert imported


def _with_hook(p: Project, tmp_path: pathlib.Path) -> None:
    """The shipped hook installed by the real pre-commit framework, with the project's Python."""
    from tests.test_hook_shipped import hooks_repo

    hooks, rev = hooks_repo(tmp_path)
    cfg = f"repos:\n- repo: {hooks}\n  rev: {rev}\n  hooks: [{{id: hfbuild-verify}}]\n"
    (p.repo.path / ".pre-commit-config.yaml").write_text(cfg)
    p.env["HFBUILD_PYTHON"] = sys.executable  # the shell the user builds in sets it too
    pre_commit = pathlib.Path(sys.executable).parent / "pre-commit"
    subprocess.run([str(pre_commit), "install"], cwd=p.repo.path, env=p.env, check=True)


def _commit(p: Project, message: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "commit", "-m", message],
        cwd=p.repo.path,
        env=p.env,
        capture_output=True,
        text=True,
    )


def test_the_cycle_edit_build_add_commit_imports_nothing_in_the_hook(
    tmp_path: pathlib.Path,
) -> None:
    """edit -> `doit run` -> `git add -A` -> `git commit`, nothing else: the shipped hook,
    run by the real pre-commit framework, answers without importing the transform module (the
    build's side check confirmed the entry), as does `status` after it, as the full path;
    the next `doit run` too. The side check printed nothing (dodo.py prints when imported)."""
    p = Project(tmp_path)
    _heavy(p)
    dodo = p.repo.path / "dodo.py"
    dodo.write_text(dodo.read_text() + '\nimport sys\nprint("dodo.py imported", file=sys.stderr)\n')
    _with_hook(p, tmp_path)
    p.build()
    p.repo.git("add", "-A")
    first = _commit(p, "built")
    assert first.returncode == 0, first.stdout + first.stderr

    (p.repo.path / "pkg/util.py").write_text("OFFSET = 3\n")  # a closure file
    (p.repo.path / "data/b.jsonl").write_text('{"x": 5}\n')  # new data, untracked
    built = p.run("-m", "doit", "run", "preprocess")
    assert built.returncode == 0, built.stdout + built.stderr
    assert "feat: built" in built.stdout, built.stdout
    assert (built.stdout + built.stderr).count("dodo.py imported") == 1, built.stdout
    p.repo.git("add", "-A")
    before = p.imports()
    done = _commit(p, "edit, built")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hfbuild verify --staged" in done.stdout + done.stderr  # the hook ran
    assert p.imports() == before, "the hook imported the transform module"

    # The same cycle again, with the checks in between: what they answer is the full path's.
    (p.repo.path / "pkg/util.py").write_text("OFFSET = 4\n")
    p.build()
    before = p.imports()
    again = p.run("-m", "doit", "run", "preprocess")
    assert "feat (3 rows, up to date)" in again.stdout, again.stdout + again.stderr
    assert p.imports() == before, "the no-op after the build imported the transform module"
    p.repo.git("add", "-A")
    answer, imported = p.status()
    assert not imported
    full, _ = p.status(record=False)
    assert _states(answer) == _states(full)
    got, full_staged, imported = _staged_check(p)
    assert not imported
    assert got[:2] == full_staged[:2]  # (the full path's stderr holds dodo.py's line)
    assert got[0] == 0, got


def test_a_volatile_pipeline_is_never_answered_from_the_record_after_a_build(
    tmp_path: pathlib.Path,
) -> None:
    """An argument from `random`: the build's side check computes another one, so the entry
    is volatile, and every check after the build imports dodo.py (and answers as the full
    path: the stage is stale in both)."""
    p = _volatile(Project(tmp_path))
    _heavy(p)
    p.build()
    p.repo.git("add", "-A")
    for _ in range(3):
        answer, imported = p.status()
        assert imported, "a volatile pipeline answered from the record after a build"
        assert [s["state"] for s in answer][1] != "up to date"
        got, full, imported = _staged_check(p)
        assert imported
        assert got[0] == full[0] == 1  # (each import draws another value for its message)


SLOW = """
import os
import pathlib

with open(os.environ["IMPORT_LOG"], "a") as f:  # the import, counted
    f.write("slow\\n")


def feat(row, k=1):
    gate = pathlib.Path({gate!r})
    (gate / "started").touch()
    while not (gate / "go").exists():  # the test edits the project meanwhile
        pass
    return {{"y": row["x"] * k}}
"""


def test_an_edit_during_the_build_records_nothing(tmp_path: pathlib.Path) -> None:
    """dodo.py takes an argument from a file; the file is edited while the stage builds (after
    the side check has imported dodo.py, as the building process had): nothing is recorded, so
    the check after the build imports dodo.py and finds the stage stale, as the full path."""
    p = Project(tmp_path)
    gate = tmp_path / "gate"
    gate.mkdir()
    root = p.repo.path
    (root / "pkg/slow.py").write_text(BURN + SLOW.format(gate=str(gate)))
    (root / "conf").mkdir()
    (root / "conf/k.txt").write_text("2\n")
    dodo = root / "dodo.py"
    dodo.write_text(
        dodo.read_text().replace(
            '"pkg.heavy:feat", {"k": 2, "vocab": "data/vocab.txt"}',
            '"pkg.slow:feat", {"k": int(open("conf/k.txt").read())}',
        )
    )
    p.repo.git("add", "-A")
    p.repo.commit("slow")
    _, imported = p.status()  # what a check costs, recorded: a side check will start
    assert imported
    doit = p.doit(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(1200):
            if (gate / "started").exists() or doit.poll() is not None:
                break
            time.sleep(0.05)
        assert (gate / "started").exists(), "the build never started"
        (root / "conf/k.txt").write_text("3\n")
    finally:
        (gate / "go").touch()
        out, _ = doit.communicate(timeout=300)
    assert doit.returncode == 0, out
    answer, imported = p.status()
    assert imported, "an entry was recorded over an edit made during the build"
    full, _ = p.status(record=False)
    assert _states(answer) == _states(full)
    assert [s["state"] for s in answer][1] != "up to date"


def _left(pgid: int, mark: str) -> list[str]:
    """The command lines of the live processes (zombies aside) of process group `pgid` or
    naming `mark` (wherever they are)."""
    out = []
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z" and (int(fields[2]) == pgid or mark in cmd):
            out.append(cmd)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["ctrl-c", "killed"])
def test_the_side_check_dies_with_the_build_and_records_nothing(
    tmp_path: pathlib.Path, how: str
) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) or SIGKILL of `doit run` while its side
    check imports dodo.py: no process of the group is left, and nothing is recorded."""
    p = Project(tmp_path)
    _heavy(p)
    root = p.repo.path
    heavy = root / "pkg/heavy.py"
    heavy.write_text(heavy.read_text().replace("import fakepkg", "import time\ntime.sleep(60)"))
    p.repo.commit("slow import")
    doit = p.doit(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        mark = f"--witness {root / 'dodo.py'}"
        for _ in range(1200):
            if any(mark in c for c in _left(doit.pid, mark)):
                break
            time.sleep(0.05)
        assert any(mark in c for c in _left(doit.pid, mark)), "no side check started"
        if how == "ctrl-c":
            os.killpg(doit.pid, signal.SIGINT)
        else:
            doit.kill()
        doit.wait(timeout=8)  # at once: the side check is not waited for (WAIT_MIN is 10 s)
        for _ in range(100):
            if not _left(doit.pid, mark):
                break
            time.sleep(0.05)
        assert _left(doit.pid, mark) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(doit.pid, signal.SIGKILL)
    records = list((root / ".hfbuild" / "records").glob("*.json"))
    entries = [e for r in records for e in json.loads(r.read_text())["entries"]]
    assert [e["state"] for e in entries if e["state"] == "confirmed"] == []


def test_hfbuild_build_confirms_its_record_too(tmp_path: pathlib.Path) -> None:
    """`hfbuild build` after an edit has the same side check as `doit run`: the `status`
    after it answers without importing, as the full path."""
    p = Project(tmp_path)
    _heavy(p)
    p.build()
    (p.repo.path / "pkg/util.py").write_text("OFFSET = 3\n")
    out = p.run("-m", "hfbuild", "build")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "feat: built" in out.stdout, out.stdout
    answer, imported = p.status()
    assert not imported, "the status after `hfbuild build` imported the transform module"
    full, _ = p.status(record=False)
    assert _states(answer) == _states(full)


def test_a_light_pipeline_starts_no_side_check(tmp_path: pathlib.Path) -> None:
    """A pipeline whose full check costs less than `record.HEAVY`: its build starts no side
    check (a second import would cost as much as the one it saves), so the check after the
    build imports, and answers as the full path; the record holds what a check cost."""
    p = Project(tmp_path)
    p.build()
    _, imported = p.status()
    assert imported
    records = list((p.repo.path / ".hfbuild" / "records").glob("*.json"))
    costs = [e["cost"] for r in records for e in json.loads(r.read_text())["entries"]]
    assert costs and all(0 < c < 1.0 for c in costs), costs
    (p.repo.path / "pkg/util.py").write_text("OFFSET = 3\n")
    p.build()
    answer, imported = p.status()
    assert imported, "a light pipeline's build started a side check"
    full, _ = p.status(record=False)
    assert _states(answer) == _states(full)


def test_the_cycle_over_a_sharded_load_imports_nothing_in_the_hook(tmp_path: pathlib.Path) -> None:
    """A parquet load over several files is sharded (a shard per file) and so is the map over
    it: after edit -> `doit run` -> `git add -A`, the hook's `verify --staged` answers from the
    record (the load's shards derived from the work tree's entry, each file staged with its
    id), as the full path does; a data file staged with other content than the build's is
    taken by the full path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Project(tmp_path)
    root = p.repo.path
    (root / "data/a.jsonl").unlink()
    for i in range(3):
        pq.write_table(pa.table({"x": [i, i + 1]}), root / f"data/part-{i}.parquet")
    dodo = root / "dodo.py"
    dodo.write_text(
        dodo.read_text().replace(
            '"json", data_files="data/*.jsonl"', '"parquet", data_files="data/*.parquet"'
        )
    )
    _heavy(p)
    p.build()
    (root / "pkg/util.py").write_text("OFFSET = 3\n")
    built = p.run("-m", "doit", "run", "preprocess")
    assert built.returncode == 0, built.stdout + built.stderr
    assert "feat: built 3 of 3 shards" in built.stdout, built.stdout
    p.repo.git("add", "-A")
    got, full, imported = _staged_check(p)
    assert not imported, "the hook imported the transform module over a sharded load"
    assert got[:2] == full[:2]
    assert got[0] == 0, got

    # A data file staged with other rows than those built, the work tree then put back.
    part = root / "data/part-1.parquet"
    kept = part.read_bytes()
    pq.write_table(pa.table({"x": [7, 8]}), part)
    p.repo.git("add", "-A")
    part.write_bytes(kept)
    got, full, imported = _staged_check(p)
    assert imported
    assert got[:2] == full[:2]
    assert got[0] != 0, got


def test_the_status_a_user_types_after_a_build_imports_nothing(tmp_path: pathlib.Path) -> None:
    """`hfbuild status` typed in a shell runs the console script (its directory first on
    `sys.path`, not the working directory as `python -m hfbuild`): after a build its entry was
    confirmed too, so it answers without importing, as the full path does."""
    script = pathlib.Path(sys.executable).parent / "hfbuild"
    assert script.is_file(), "the console script is installed beside the interpreter"
    p = Project(tmp_path)
    _heavy(p)
    p.build()
    (p.repo.path / "pkg/util.py").write_text("OFFSET = 3\n")
    p.build()
    before = p.imports()
    out = subprocess.run(
        [str(script), "status", "--json"],
        cwd=p.repo.path,
        env=p.env,
        capture_output=True,
        text=True,
    )
    assert p.imports() == before, "the console script's status imported the transform module"
    full, _ = p.status(record=False)
    assert _states(json.loads(out.stdout)) == _states(full)


def test_one_interpreter_by_two_names_is_one_context(tmp_path: pathlib.Path) -> None:
    """A venv's `python3` (doit's shebang) builds and its `python` runs the hook (the user's
    HFBUILD_PYTHON): one interpreter, so the hook answers from what the build confirmed."""
    other = pathlib.Path(sys.executable).with_name("python3")
    if pathlib.Path(sys.executable).name == "python3":
        other = pathlib.Path(sys.executable).with_name("python")
    assert other.exists() and other.name != pathlib.Path(sys.executable).name
    p = Project(tmp_path)
    _heavy(p)
    p.build()
    (p.repo.path / "pkg/util.py").write_text("OFFSET = 3\n")
    built = subprocess.run(
        [str(other), "-m", "doit", "run", "preprocess"],
        cwd=p.repo.path,
        env=p.env,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    p.repo.git("add", "-A")
    got, full, imported = _staged_check(p)
    assert not imported, "the hook's interpreter, by another name, imported"
    assert got[:2] == full[:2]
