"""Failures a user meets with the remote or the terminal, each in one line (issue #23 item 2):
an unreachable remote (a closed port on loopback) for `hfbuild pull` and `doit run`, which
builds here unless HFBUILD_REMOTE_REQUIRED=1; missing S3 credentials; Ctrl-C under doit and
under `hfbuild`; HFBUILD_NO_REMOTE=1 with the Ray executor."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import Repo, run_hfbuild
from tests.pipeline_project import FILES, calls, doit, expected, make_project, results

HFBUILD = os.path.join(os.path.dirname(sys.executable), "hfbuild")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


@pytest.fixture
def down(monkeypatch: pytest.MonkeyPatch) -> str:
    """An S3 remote whose endpoint is a closed port on loopback, with credentials."""
    url = "s3://bucket/cache"
    monkeypatch.setenv("HFBUILD_REMOTE", url)
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return url


def _one_line(err: str) -> None:
    assert "Traceback" not in err and "internal error" not in err, err


def test_pull_with_the_remote_down_is_one_line(repo: Repo, down: str) -> None:
    """`hfbuild pull` with the remote unreachable: one message naming the remote and what
    to check, exit 1 (it was "internal error", exit 3)."""
    make_project(repo)
    out = run_hfbuild(repo, "pull")
    assert out.returncode == 1, out.stderr
    _one_line(out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"hfbuild: error: cannot reach the remote {down}")
    assert "FSSPEC_S3_ENDPOINT_URL" in lines[0] and "HFBUILD_NO_REMOTE=1" in lines[0]


def test_doit_run_with_the_remote_down_warns_once_and_builds_here(
    repo: Repo, tmp_path: pathlib.Path, down: str
) -> None:
    """`doit run` with the remote unreachable: one warning for the whole run (not one per
    stage), every stage built here with the right rows.
    With HFBUILD_REMOTE_REQUIRED=1 a fresh clone builds nothing and fails in one message."""
    make_project(repo)
    log = tmp_path / "calls.log"
    out = doit(repo, "run", "preprocess", log=log)
    _one_line(out.stderr)
    assert out.stderr.count(f"cannot reach the remote {down}") == 1, out.stderr
    assert "Building here instead" in out.stderr
    assert calls(log) == {"feat": 1, "keep": 1, "split": 1, "lens": 1}
    got = results(repo)
    assert got["kept"] == expected()["kept"] and got["lens"] == expected()["lens"]

    clone = repo.clone(tmp_path / "clone")
    log2 = tmp_path / "required.log"
    req = doit(
        clone, "run", "preprocess", log=log2, check=False, env={"HFBUILD_REMOTE_REQUIRED": "1"}
    )
    assert req.returncode != 0
    _one_line(req.stderr)
    assert "HFBUILD_REMOTE_REQUIRED=1 is set, so stage 'raw' is not built here" in (
        req.stdout + req.stderr
    )
    assert calls(log2) == {}
    status = run_hfbuild(clone, "status", "--json")
    assert '"failed"' not in status.stdout  # the remote failed, not the stage


def test_missing_s3_credentials_name_what_to_set(
    repo: Repo, tmp_path: pathlib.Path, down: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No S3 credentials anywhere: `hfbuild pull` says which variables (or fsspec
    configuration) a process and each Ray node needs, in one line, exit 1; `doit run` warns
    so once and builds here."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    make_project(repo)
    out = run_hfbuild(repo, "pull")
    assert out.returncode == 1
    _one_line(out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"the remote {down} needs credentials, and none were found" in out.stderr
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in out.stderr
    assert "`ray start` ran in on each node" in out.stderr

    run = doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    _one_line(run.stderr)
    assert run.stderr.count("needs credentials") == 1


SLOW_FEAT = textwrap.dedent(FILES["pkg/transforms.py"]).replace(
    '    log("feat")\n',
    '    log("feat")\n'
    "    import time\n"
    '    open(os.environ["STARTED"], "w").close()\n'
    "    time.sleep(120)\n",
)


def _interrupt(
    cmd: list[str], repo: Repo, tmp_path: pathlib.Path
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` in `repo` until the slow transform has started, then send it SIGINT (what
    Ctrl-C sends); its result."""
    started = tmp_path / "started"
    started.unlink(missing_ok=True)
    env = {**os.environ, "STARTED": str(started), "CALL_LOG": os.devnull, "HFBUILD_NO_REMOTE": "1"}
    proc = subprocess.Popen(
        cmd, cwd=repo.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_ctrl_c_is_one_line_and_exit_130(repo: Repo, tmp_path: pathlib.Path) -> None:
    """Ctrl-C while a stage builds, under `doit run` and under `hfbuild build`: one line,
    exit 130, no traceback; nothing of the stage is published (status: stale, not failed)."""
    make_project(repo)
    prefix = "import os\n" if "import os" not in SLOW_FEAT else ""
    repo.write({"pkg/transforms.py": prefix + SLOW_FEAT}, commit="a slow feat")
    out = _interrupt([sys.executable, "-m", "doit", "run", "preprocess"], repo, tmp_path)
    assert out.returncode == 130, out.stderr
    _one_line(out.stderr)
    assert "hfbuild: interrupted (stage 'feat'); nothing of it was published." in out.stderr

    out = _interrupt([HFBUILD, "build"], repo, tmp_path)
    assert out.returncode == 130, out.stderr
    _one_line(out.stderr)
    assert out.stderr.strip().splitlines()[-1] == "hfbuild: interrupted"

    states = {
        s["stage"]: s["state"] for s in json.loads(run_hfbuild(repo, "status", "--json").stdout)
    }
    assert states["raw"] == "up to date" and states["feat"] == "stale"


SLEEPY_DODO = """
import os
import time

from hfbuild import Pipeline

pipe = Pipeline()
open(os.environ["STARTED"], "w").close()
time.sleep(120)


def task_preprocess():
    yield from pipe.tasks()
"""


def test_ctrl_c_while_dodo_is_imported_is_one_line(repo: Repo, tmp_path: pathlib.Path) -> None:
    """Ctrl-C while dodo.py is being imported (after its `import hfbuild`), under `doit run`
    and under `hfbuild status`: one line, exit 130, no traceback (doit printed the import's
    traceback)."""
    make_project(repo)
    repo.write({"dodo.py": SLEEPY_DODO}, commit="a dodo.py slow to import")
    out = _interrupt([sys.executable, "-m", "doit", "run", "preprocess"], repo, tmp_path)
    assert out.returncode == 130, out.stderr
    _one_line(out.stderr)
    assert out.stderr.strip().splitlines() == [
        "hfbuild: interrupted while doit imported dodo.py; nothing was built."
    ]

    out = _interrupt([HFBUILD, "status"], repo, tmp_path)
    assert out.returncode == 130, out.stderr
    _one_line(out.stderr)
    assert out.stderr.strip().splitlines() == ["hfbuild: interrupted"]


def test_no_remote_with_the_ray_executor_says_why(
    repo: Repo, tmp_path: pathlib.Path, down: str
) -> None:
    """HFBUILD_NO_REMOTE=1 with the Ray executor: the message names HFBUILD_NO_REMOTE (it
    said "set HFBUILD_REMOTE", which is set); an unreachable remote with the Ray executor
    stops in one message instead of warning that it builds here."""
    make_project(repo)
    env = {"HFBUILD_EXECUTOR": "ray", "HFBUILD_NO_REMOTE": "1"}
    out = doit(repo, "run", "preprocess", log=tmp_path / "a.log", check=False, env=env)
    assert out.returncode != 0
    _one_line(out.stderr)
    assert "HFBUILD_NO_REMOTE=1 turns it off: unset HFBUILD_NO_REMOTE" in out.stdout + out.stderr
    assert "set HFBUILD_REMOTE or" not in out.stdout + out.stderr

    out = doit(
        repo,
        "run",
        "preprocess",
        log=tmp_path / "b.log",
        check=False,
        env={"HFBUILD_EXECUTOR": "ray"},
    )
    assert out.returncode != 0
    _one_line(out.stderr)
    assert "The Ray executor's workers read their inputs from it" in out.stdout + out.stderr
    assert "Building here instead" not in out.stderr
