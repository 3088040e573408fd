"""One stage that cannot be fingerprinted fails alone; the rest of the pipeline builds."""

from __future__ import annotations

import json
import pathlib
import textwrap

from tests.helpers import Repo, run_hfbuild
from tests.pipeline_project import FILES, calls, doit, expected, make_project, results

UNHASHABLE = "cannot fingerprint an object of type _thread.lock"


def test_bad_argument_fails_its_stage_and_consumers_only(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A lock in `feat`'s arguments (the second stage) fails `feat` and the two stages built
    from it with that message, under a plain `doit run`; `raw` and `lens` still build, and
    `hfbuild status` shows the failures with their message and the others normally, and
    `explain` on a failed stage exits 1 with its cause."""
    make_project(repo)
    dodo = textwrap.dedent(FILES["dodo.py"]).replace(
        '{"k": 2}', '{"k": 2, "lock": threading.Lock()}'
    )
    repo.write({"dodo.py": "import threading\n" + dodo}, commit="a lock as an argument")
    log = tmp_path / "calls.log"
    out = doit(repo, "run", "preprocess", log=log, check=False)
    assert out.returncode != 0
    assert "fn_kwargs['lock']: " + UNHASHABLE in out.stdout + out.stderr
    assert calls(log) == {"lens": 1}
    assert results_of(repo, "lens") == expected()["lens"]

    states = {s["stage"]: s for s in json.loads(run_hfbuild(repo, "status", "--json").stdout)}
    assert {n: s["state"] for n, s in states.items()} == {
        "raw": "up to date",
        "feat": "failed",
        "kept": "failed",
        "split": "failed",
        "lens": "up to date",
    }
    assert UNHASHABLE in str(states["feat"]["reason"])
    assert "because stage 'feat'" in str(states["split"]["reason"])
    assert UNHASHABLE in str(states["split"]["reason"])
    text = run_hfbuild(repo, "status")
    assert text.returncode == 1
    assert "feat   failed: stage 'feat': fn_kwargs['lock']: " + UNHASHABLE in text.stdout
    assert "lens   up to date" in text.stdout
    ex = run_hfbuild(repo, "explain", "kept")
    assert ex.returncode == 1
    assert "stage 'kept' cannot be fingerprinted because stage 'feat'" in ex.stderr

    # Fixing the argument builds the rest, reusing raw and lens.
    repo.write({"dodo.py": FILES["dodo.py"]}, commit="fixed")
    doit(repo, "run", "preprocess", log=log)
    assert calls(log) == {"lens": 1, "feat": 1, "keep": 1, "split": 1}
    assert results(repo)["kept"] == expected()["kept"]


def results_of(repo: Repo, stage: str) -> object:
    from tests.helpers import run_python

    code = f"""
        import json, warnings
        warnings.simplefilter("ignore")
        import dodo
        print(json.dumps(list(dodo.pipe.result({stage!r})["n"])))
        """
    return json.loads(run_python(code, repo.path).stdout)


def test_status_after_a_failed_build_names_the_failure(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A transform that raises: after the failed `doit run`, `status` says `feat` failed
    with the error's first line and the stages built from it are blocked by it (not "never
    built"), exit 1; `explain` says the same of each. Fixing the transform builds it and
    `status` is clean again."""
    make_project(repo)
    raising = textwrap.dedent(FILES["pkg/transforms.py"]).replace(
        '    log("feat")\n', '    log("feat")\n    raise ValueError("no feat today")\n'
    )
    repo.write({"pkg/transforms.py": raising}, commit="feat raises")
    log = tmp_path / "calls.log"
    out = doit(repo, "run", "preprocess", log=log, check=False)
    assert out.returncode != 0
    assert "ValueError: no feat today" in out.stdout + out.stderr

    states = {s["stage"]: s for s in json.loads(run_hfbuild(repo, "status", "--json").stdout)}
    assert {n: s["state"] for n, s in states.items() if n != "lens"} == {
        "raw": "up to date",
        "feat": "failed",
        "kept": "blocked",
        "split": "blocked",
    }
    assert states["feat"]["reason"] == (
        "its last build failed: stage 'feat' failed: ValueError: no feat today"
    )
    assert states["kept"]["reason"] == "input 'feat' failed"
    assert states["split"]["reason"] == "input 'kept' is blocked: stage 'feat' failed"
    text = run_hfbuild(repo, "status")
    assert text.returncode == 1
    assert (
        "feat   failed: its last build failed: stage 'feat' failed: ValueError: no feat today"
        in (text.stdout)
    )
    assert "kept   blocked: input 'feat' failed" in text.stdout
    assert "never built" not in "".join(
        line for line in text.stdout.splitlines() if not line.startswith("lens")
    )
    ex = run_hfbuild(repo, "explain", "feat")
    assert ex.returncode == 1
    assert "ValueError: no feat today" in ex.stdout.splitlines()[0]
    ex = run_hfbuild(repo, "explain", "split")
    assert ex.returncode == 1
    assert "blocked: input 'kept' is blocked: stage 'feat' failed" in ex.stdout

    repo.write({"pkg/transforms.py": FILES["pkg/transforms.py"]}, commit="fixed")
    doit(repo, "run", "preprocess", log=log)
    fixed = run_hfbuild(repo, "status")
    assert fixed.returncode == 0, fixed.stdout
    # The failing code again: its key's failure is still on record.
    repo.write({"pkg/transforms.py": raising}, commit="feat raises again")
    again = {
        s["stage"]: s["state"] for s in json.loads(run_hfbuild(repo, "status", "--json").stdout)
    }
    assert again["feat"] == "failed" and again["kept"] == "blocked"


def test_a_success_under_the_failed_key_clears_the_failure(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A build that failed for a reason outside its key (here the call log, an untracked
    variable, naming a directory) and then succeeds under the same key: the failure is
    forgotten, so once the result is removed again `status` calls the stage stale, not
    failed."""
    make_project(repo)
    bad = tmp_path / "a-directory"
    bad.mkdir()
    out = doit(repo, "run", "preprocess:feat", log=bad, check=False)
    assert out.returncode != 0
    feat = {s["stage"]: s for s in json.loads(run_hfbuild(repo, "status", "--json").stdout)}
    assert feat["feat"]["state"] == "failed"
    assert "IsADirectoryError" in str(feat["feat"]["reason"])

    doit(repo, "run", "preprocess:feat", log=tmp_path / "calls.log")
    doit(repo, "clean", "preprocess:feat", log=tmp_path / "calls.log")
    states = {s["stage"]: s for s in json.loads(run_hfbuild(repo, "status", "--json").stdout)}
    assert states["feat"]["state"] == "stale", states["feat"]
