"""The lock and ref bookkeeping of a run: cheap when nothing changed, and losing nothing."""

from __future__ import annotations

import json
import pathlib
import time

import pytest

from tests.helpers import Repo, run_python
from tests.pipeline_project import doit, make_project

HEAVY = ("datasets", "pyarrow", "pandas")

# Counts the real opens of hfbuild.lock in this process (an audit hook sees every open()), and
# reports which heavy libraries were imported, once the command has run.
PROBE = """
import json, os, sys
lock = os.path.realpath("hfbuild.lock")
opens = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        try:
            if os.path.realpath(os.fsdecode(args[0])) == lock:
                opens.append(args[1])
        except (TypeError, ValueError):
            pass
sys.addaudithook(hook)
{command}
print(json.dumps({{"rc": rc, "lock_opens": len(opens),
                   "heavy": sorted(m for m in {heavy} if m in sys.modules)}}))
"""

DOIT_RUN = """
from doit.doit_cmd import DoitMain
from doit.cmd_base import ModuleTaskLoader
import dodo
rc = DoitMain(ModuleTaskLoader(dodo)).run(["run", "preprocess"])
"""

STATUS = """
from hfbuild.cli.main import main
rc = main(["status"])
"""


def _probe(repo: Repo, command: str, log: pathlib.Path) -> dict[str, object]:
    code = PROBE.format(command=command, heavy=HEAVY)
    out = run_python(code, repo.path, env={"CALL_LOG": str(log)})
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture
def project(repo: Repo) -> Repo:
    return make_project(repo)


def test_noop_run_and_status_import_nothing_heavy_and_read_the_lock_once(
    project: Repo, tmp_path: pathlib.Path
) -> None:
    """A no-op `doit run preprocess` and `hfbuild status` import none of datasets, pyarrow,
    pandas, and open hfbuild.lock at most once in the process."""
    log = tmp_path / "calls.log"
    doit(project, "run", "preprocess", log=log)
    project.commit("lock")
    # Past the racy window (recordfacts.RACY_NS): a lock written within it is also read by the
    # no-import record, to key its content, since its stat data cannot show an edit yet.
    time.sleep(2.1)
    built = log.read_text()
    run = _probe(project, DOIT_RUN, log)
    assert run == {"rc": 0, "lock_opens": 1, "heavy": []}
    status = _probe(project, STATUS, log)
    assert status["rc"] == 0
    assert status["heavy"] == []
    assert isinstance(status["lock_opens"], int) and status["lock_opens"] <= 1
    assert log.read_text() == built  # and no transform ran


def test_entries_written_by_another_run_meanwhile_are_kept(
    project: Repo, tmp_path: pathlib.Path
) -> None:
    """A run that read hfbuild.lock before another run rewrote it merges its own entries into
    the file as it is then: the other run's entries survive."""
    log = tmp_path / "calls.log"
    doit(project, "run", "preprocess", log=log)
    lock = project.path / "hfbuild.lock"
    full = json.loads(lock.read_text())
    partial = {**full, "stages": {k: v for k, v in full["stages"].items() if k == "raw"}}
    lock.write_text(json.dumps(partial))
    code = """
import json, subprocess, sys, dodo
pipe = dodo.pipe
assert pipe.is_built("raw")  # reads the lock: only "raw" is in it
# Another run restores every entry meanwhile.
subprocess.run([sys.executable, "-m", "doit", "run", "preprocess"], check=True,
               capture_output=True)
assert pipe.is_built("feat")  # not in what this process read: written, merged
with open("hfbuild.lock") as f:
    print(json.dumps(sorted(json.load(f)["stages"])))
"""
    out = run_python(code, project.path, env={"CALL_LOG": str(log)})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == sorted(full["stages"])
    assert json.loads(lock.read_text()) == full


def test_a_long_lived_process_sees_the_store_and_the_lock_change(
    project: Repo, tmp_path: pathlib.Path
) -> None:
    """In one process, an entry removed from the store since the last check is not built
    any more, and a lock entry lost since the last check (a checkout, an edit) is written
    again."""
    log = tmp_path / "calls.log"
    doit(project, "run", "preprocess", log=log)
    code = """
import json, dodo
pipe = dodo.pipe
assert pipe.is_built("feat") and pipe.is_built("raw")
pipe.store.remove(pipe.manifests()["feat"].fingerprint)  # as `hfbuild gc` elsewhere would
with open("hfbuild.lock") as f:
    doc = json.load(f)
del doc["stages"]["raw"]
with open("hfbuild.lock", "w") as f:  # in place, as an editor would
    json.dump(doc, f)
print(pipe.is_built("feat"), pipe.is_built("raw"))
with open("hfbuild.lock") as f:
    print("raw" in json.load(f)["stages"])
"""
    out = run_python(code, project.path, env={"CALL_LOG": str(log)})
    assert out.stdout.split() == ["False", "True", "True"]
