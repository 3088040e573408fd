"""hfbuild.lock, `hfbuild status`, `explain`, `verify` and the commit hooks, end to end."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
from typing import Any

import pytest

from tests.helpers import Repo, run_hfbuild, run_python
from tests.pipeline_project import doit, expected, make_project


@pytest.fixture
def built(repo: Repo, tmp_path: pathlib.Path) -> Repo:
    """The test project, built once, with hfbuild.lock committed."""
    make_project(repo)
    repo.write({".gitignore": ".doit.db*\n"})
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    repo.commit("build and lock")
    return repo


def lock(repo: Repo) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((repo.path / "hfbuild.lock").read_text())
    return doc


def test_lock_records_every_stage_and_changes_only_what_changed(
    built: Repo, tmp_path: pathlib.Path
) -> None:
    """A build writes one sorted entry per stage with fingerprint, inputs, code files, args,
    rows and content hash; rebuilding one leaf changes only that leaf's entry."""
    before = lock(built)["stages"]
    assert sorted(before) == ["feat", "kept", "lens", "raw", "split"]
    kept = before["kept"]
    assert kept["inputs"] == {"feat": before["feat"]["fingerprint"]}
    assert kept["rows"] == len(expected()["kept"]) and len(kept["content_hash"]) == 32
    files = dict(kept["manifest"]["code"]["files"])
    assert files["pkg/util/deep.py"] == built.git("rev-parse", "HEAD:pkg/util/deep.py")
    assert "dirty" not in kept

    dodo = built.path / "dodo.py"
    dodo.write_text(dodo.read_text().replace('{"scale": 1}', '{"scale": 3}'))
    doit(built, "run", "preprocess", log=tmp_path / "calls.log")
    after = lock(built)["stages"]
    assert {k for k in after if after[k] != before[k]} == {"lens"}
    text = (built.path / "hfbuild.lock").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def test_lock_marks_a_stage_built_from_a_dirty_closure(built: Repo, tmp_path: pathlib.Path) -> None:
    """A stage built from uncommitted code is marked with the dirty files in the lock."""
    (built.path / "pkg/text.py").write_text((built.path / "pkg/text.py").read_text() + "\n# x\n")
    doit(built, "run", "preprocess", log=tmp_path / "calls.log")
    assert lock(built)["stages"]["lens"]["dirty"] == ["pkg/text.py"]


def test_status_reports_each_stage_and_exit_code(built: Repo) -> None:
    """status says up to date (exit 0); after an edit, stale with the first reason and the
    dirty files (exit 1); --json gives the same as data; --quiet prints nothing."""
    out = run_hfbuild(built, "status")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "raw",
        "up",
        "to",
        "date",
        "feat",
        "up",
        "to",
        "date",
        "kept",
        "up",
        "to",
        "date",
        "split",
        "up",
        "to",
        "date",
        "lens",
        "up",
        "to",
        "date",
    ]
    deep = built.path / "pkg/util/deep.py"
    old_id = built.git("rev-parse", "HEAD:pkg/util/deep.py")
    deep.write_text("OFFSET = 7\n\ndef offset():\n    return OFFSET\n")
    new_id = built.git("hash-object", "pkg/util/deep.py")
    out = run_hfbuild(built, "status")
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert any(
        ln.startswith("feat")
        and "stale (from uncommitted changes: pkg/util/deep.py (modified)): code file "
        f"pkg/util/deep.py changed: {old_id[:12]} -> {new_id[:12]}"
        in ln
        for ln in lines
    )
    assert any(ln.startswith("lens") and ln.endswith("up to date") for ln in lines)
    data = json.loads(run_hfbuild(built, "status", "--json").stdout)
    states = {d["stage"]: d for d in data}
    assert states["kept"]["state"] == "stale" and states["raw"]["state"] == "up to date"
    assert states["feat"]["dirty_files"] == ["pkg/util/deep.py (modified)"]
    quiet = run_hfbuild(built, "status", "--quiet")
    assert (quiet.returncode, quiet.stdout) == (1, "")


def test_explain_an_edited_helper(built: Repo) -> None:
    """explain names the changed file with old and new blob ids and the diff's line counts,
    and the input stage that changed downstream."""
    built.write(
        {"pkg/util/deep.py": "OFFSET = 2\n\ndef offset():\n    return OFFSET + 0\n"},
        commit="edit helper",
    )
    old = lock(built)["stages"]["feat"]["manifest"]["code"]["files"]
    old_id = dict(old)["pkg/util/deep.py"]
    new_id = built.git("rev-parse", "HEAD:pkg/util/deep.py")
    out = run_hfbuild(built, "explain", "feat")
    assert out.returncode == 1
    assert (
        f"  code file pkg/util/deep.py changed: {old_id[:12]} -> {new_id[:12]} (+2 -2 lines)"
    ) in out.stdout.splitlines()
    kept = run_hfbuild(built, "explain", "kept").stdout
    # kept's key holds feat's result, known once feat is built (issue #19); kept's own code
    # (its closure holds the helper too) changed, which it names first (issue #24 item 5).
    assert kept.startswith(
        "stage 'kept' is stale: its own definition changed:\n"
        f"  code file pkg/util/deep.py changed: {old_id[:12]} -> {new_id[:12]}\n"
        "Its input 'feat' is being rebuilt too (may be cut off).\n"
    ), kept
    assert "Run `doit run preprocess:kept` to build it." in kept
    doit(built, "run", "preprocess:feat", log=built.path.parent / "feat.log")
    kept = run_hfbuild(built, "explain", "kept").stdout
    assert "input stage feat changed: " in kept
    assert "Run `doit run preprocess:kept` to build it." in kept


def test_a_stage_whose_own_argument_changed_says_so_before_its_pending_input(
    built: Repo,
) -> None:
    """kept's argument changed while its input feat is being rebuilt (feat's argument
    changed too): status and explain name kept's argument first (it rebuilds kept whatever
    feat's result), then the input being rebuilt (issue #24 item 5); split, which only
    waits for kept, names its input alone."""
    dodo = built.path / "dodo.py"
    text = dodo.read_text().replace('{"m": 3}', '{"m": 4}').replace('{"k": 2}', '{"k": 3}')
    built.write({"dodo.py": text}, commit="feat's and kept's arguments")
    states = {d["stage"]: d for d in json.loads(run_hfbuild(built, "status", "--json").stdout)}
    assert states["kept"]["reason"] == (
        "argument fn_kwargs['m'] changed: 3 -> 4; input 'feat' is being rebuilt (may be cut off)"
    ), states["kept"]
    assert states["split"]["reason"] == "input 'kept' is being rebuilt (may be cut off)"
    lines = run_hfbuild(built, "explain", "kept").stdout.splitlines()
    assert lines[:3] == [
        "stage 'kept' is stale: its own definition changed:",
        "  argument fn_kwargs['m'] changed: 3 -> 4",
        "Its input 'feat' is being rebuilt too (may be cut off).",
    ], lines
    split = run_hfbuild(built, "explain", "split").stdout  # nothing of its own changed
    assert split.startswith(
        "stage 'split' is stale: input 'kept' is being rebuilt (may be cut off)."
    ), split


def test_explain_a_changed_argument(built: Repo) -> None:
    """explain names the argument path with its old and new value."""
    dodo = built.path / "dodo.py"
    dodo.write_text(dodo.read_text().replace('{"scale": 1}', '{"scale": 2.5}'))
    out = run_hfbuild(built, "explain", "lens").stdout.splitlines()
    assert "  argument fn_kwargs['scale'] changed: 1 -> 2.5" in out
    assert len([ln for ln in out if ln.startswith("  ")]) == 1


def test_explain_a_changed_data_file(built: Repo) -> None:
    """explain names the data file and its old and new ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = built.path / "data/part-0.parquet"
    old_id = built.git("rev-parse", "HEAD:data/part-0.parquet")
    pq.write_table(pa.table({"x": [1], "text": ["a"]}), f)
    new_id = built.git("hash-object", "data/part-0.parquet")
    out = run_hfbuild(built, "explain", "raw").stdout.splitlines()
    assert f"  data file data/part-0.parquet changed: {old_id[:12]} -> {new_id[:12]}" in out


def test_explain_when_nothing_changed(built: Repo) -> None:
    """explain says so, and where the result is: an ordinary entry's `data/`, which
    `datasets.load_from_disk` reads as the stage's result."""
    import datasets

    out = run_hfbuild(built, "explain", "lens")
    assert out.returncode == 0
    assert out.stdout.startswith("stage 'lens' is up to date: nothing changed since it was built.")
    fp = lock(built)["stages"]["lens"]["fingerprint"]
    data = built.path / ".hfbuild" / "objects" / fp[:2] / fp / "data"
    assert out.stdout.splitlines()[1] == f"fingerprint {fp}; result at {data}"
    assert datasets.load_from_disk(str(data))["n"] == expected()["lens"]


@pytest.mark.parametrize("stage", ["kept", "split"])
def test_explain_an_indices_entry_names_its_base_and_how_to_load_it(
    built: Repo, stage: str
) -> None:
    """For a result stored as indices over another entry's rows (a filter's Dataset, a
    train_test_split's DatasetDict), explain names the indices, the entry holding the rows
    and `pipe.result`, never `<entry>/data` alone as the result."""
    out = run_hfbuild(built, "explain", stage)
    assert out.returncode == 0
    stages = lock(built)["stages"]
    fp, base = stages[stage]["fingerprint"], stages["feat"]["fingerprint"]
    objects = built.path / ".hfbuild" / "objects"
    assert out.stdout.splitlines()[1] == (
        f"fingerprint {fp}; result: indices at {objects / fp[:2] / fp / 'data'} over the rows "
        f"of the entry {objects / base[:2] / base}; load it with pipe.result({stage!r})"
    )
    doc = json.loads(run_hfbuild(built, "explain", stage, "--json").stdout)
    assert (doc["result_kind"], doc["result_base"]) == ("indices", str(objects / base[:2] / base))


SPLITS = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
print(json.dumps({s: len(d) for s, d in dodo.pipe.result("split").items()}))
"""


def test_split_rows_are_reported_in_the_datasets_split_order(repo: Repo) -> None:
    """A DatasetDict's rows per split are written in the order datasets gives its splits
    (train before test), on the "built" line, the "up to date" line and doit's no-op line
    alike, though the stored manifest's JSON keys are sorted."""
    make_project(repo)
    out = run_hfbuild(repo, "build", "split")
    assert out.returncode == 0, out.stderr
    order = json.loads(run_python(SPLITS, repo.path).stdout.strip().splitlines()[-1])
    assert list(order) == ["train", "test"]
    rows = ", ".join(f"{s} {n}" for s, n in order.items()) + " rows"
    assert f"split: built {rows} in " in out.stdout
    assert run_hfbuild(repo, "build", "split").stdout.strip() == f"split: up to date ({rows})"
    noop = doit(repo, "run", "preprocess", log=repo.path / ".." / "calls.log")
    assert f"split ({rows}, up to date)" in noop.stdout


def test_unknown_stage_is_a_clear_error(built: Repo) -> None:
    """A stage name the pipeline lacks exits 1 with a message listing the stages."""
    out = run_hfbuild(built, "explain", "nope")
    assert out.returncode == 1
    assert (
        "hfbuild: error: no stage named 'nope' (stages: raw, feat, kept, split, lens)" in out.stderr
    )


def test_verify_against_head(built: Repo) -> None:
    """verify passes when the committed lock matches HEAD, and fails naming the stage, cause
    and fix after a code change is committed without rebuilding."""
    assert run_hfbuild(built, "verify").returncode == 0
    built.write(
        {"pkg/util/deep.py": "OFFSET = 3\n\ndef offset():\n    return OFFSET\n"},
        commit="no rebuild",
    )
    out = run_hfbuild(built, "verify")
    assert out.returncode == 1
    assert (
        "stage 'feat' was not built from the committed code: code file pkg/util/deep.py changed: "
    ) in out.stderr
    assert "Fix: `doit run preprocess && git add hfbuild.lock`" in out.stderr
    assert "'lens'" not in out.stderr


def test_verify_strict_refuses_uncommitted_code(built: Repo) -> None:
    """--strict (or HFBUILD_STRICT=1) makes uncommitted closure files an error."""
    (built.path / "pkg/text.py").write_text((built.path / "pkg/text.py").read_text() + "# x\n")
    out = run_hfbuild(built, "verify", "--strict")
    assert out.returncode == 1
    assert "stage 'lens' has uncommitted code: pkg/text.py (modified)" in out.stderr


def test_verify_rebuild_catches_unseeded_randomness(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A transform using unseeded randomness builds, but `verify --rebuild` reports it as
    not reproducible; the seeded stages pass."""
    make_project(repo)
    repo.write(
        {
            "pkg/noise.py": "import random\n\ndef jitter(batch):\n"
            "    return {'z': [random.random() for _ in batch['x']]}\n",
            "dodo.py": (repo.path / "dodo.py")
            .read_text()
            .replace(
                "\n\ndef task_preprocess",
                "\nfrom pkg import noise\n"
                "noisy = pipe.map('noisy', raw, noise.jitter, batched=True)"
                "\n\n\ndef task_preprocess",
            ),
        },
        commit="noise",
    )
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    repo.commit("lock")
    out = run_hfbuild(repo, "verify", "--rebuild")
    assert out.returncode == 1
    assert "stage 'noisy' is not reproducible" in out.stderr
    assert "'split'" not in out.stderr and "'kept'" not in out.stderr


def git_commit(repo: Repo, message: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "commit", "-m", message],
        cwd=repo.path,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "CALL_LOG": "/dev/null"},
    )


def test_install_hook_whose_python_is_gone_says_how_to_fix_it(
    built: Repo, tmp_path: pathlib.Path
) -> None:
    """A hook installed from an environment that was later removed (the project moved to
    another virtualenv) refuses the commit saying so and naming `hfbuild install-hook`,
    not with the shell's "not found"."""
    import site
    import sys

    env = tmp_path / "old-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    # The new environment sees this one's packages (hfbuild among them), as a copy would.
    (purelib,) = (env / "lib").glob("python3*/site-packages")
    paths = ", ".join(repr(p) for p in site.getsitepackages())
    (purelib / "shared.pth").write_text(f"import site; list(map(site.addsitedir, [{paths}]))\n")
    old = env / "bin" / "python"
    out = subprocess.run(
        [str(old), "-m", "hfbuild", "install-hook"],
        cwd=built.path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr

    def commit(message: str) -> subprocess.CompletedProcess[str]:
        built.write({"notes.txt": message})
        built.git("add", "notes.txt")
        return git_commit(built, message)

    assert commit("with the old environment").returncode == 0

    shutil.rmtree(env)
    refused = commit("after the environment moved")
    assert refused.returncode == 1
    assert f"hfbuild hook: {old}" in refused.stderr
    assert "hfbuild install-hook" in refused.stderr and "not found" not in refused.stderr
    assert run_hfbuild(built, "install-hook").returncode == 0  # from the project's Python
    assert commit("with the new environment").returncode == 0


def test_install_hook_runs_the_dodo_file_it_was_given(built: Repo, tmp_path: pathlib.Path) -> None:
    """`hfbuild --dodo pipeline.py install-hook` writes a hook that checks that file's
    pipeline, also where no dodo.py exists."""
    built.git("mv", "dodo.py", "pipeline.py")
    built.commit("the pipeline is in pipeline.py")
    out = run_hfbuild(built, "--dodo", "pipeline.py", "install-hook")
    assert out.returncode == 0, out.stderr
    built.write({"pkg/text.py": (built.path / "pkg/text.py").read_text() + "# edit\n"})
    built.git("add", "-A")
    refused = git_commit(built, "not rebuilt")
    assert refused.returncode == 1 and "stage 'lens'" in refused.stderr, refused.stderr
    doit(built, "-f", "pipeline.py", "run", "preprocess", log=tmp_path / "calls.log")
    built.git("add", "hfbuild.lock")
    assert git_commit(built, "rebuilt").returncode == 0


def test_staged_check_names_unstaged_differences(built: Repo, tmp_path: pathlib.Path) -> None:
    """Building from a work tree that differs from what is staged does not satisfy the
    hook, and the message names the file to stage or stash."""
    (built.path / "pkg/util/deep.py").write_text("OFFSET = 4\n\ndef offset():\n    return OFFSET\n")
    doit(built, "run", "preprocess", log=tmp_path / "calls.log")
    built.git("add", "hfbuild.lock")
    out = run_hfbuild(built, "verify", "--staged")
    assert out.returncode == 1
    assert "the work tree differs from what is staged in pkg/util/deep.py" in out.stderr


def test_install_hook_plain_git(built: Repo, tmp_path: pathlib.Path) -> None:
    """`hfbuild install-hook` writes a pre-commit shim that a real `git commit` runs; it
    refuses to replace someone else's hook without --force."""
    out = run_hfbuild(built, "install-hook")
    assert out.returncode == 0, out.stderr
    built.write({"pkg/text.py": (built.path / "pkg/text.py").read_text() + "# edit\n"})
    built.git("add", "-A")
    refused = git_commit(built, "not rebuilt")
    assert refused.returncode != 0 and "stage 'lens'" in refused.stderr
    doit(built, "run", "preprocess", log=tmp_path / "calls.log")
    built.git("add", "hfbuild.lock")
    assert git_commit(built, "rebuilt").returncode == 0

    hook = built.path / ".git/hooks/pre-commit"
    hook.write_text("#!/bin/sh\nexit 0\n")
    again = run_hfbuild(built, "install-hook")
    assert again.returncode == 1 and "is not hfbuild's" in again.stderr
