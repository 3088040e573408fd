"""The GitHub Actions workflow shipped in docs/examples, checked by the real actionlint."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "docs" / "examples" / "hfbuild-ci.yml"
ACTIONLINT = str(pathlib.Path(sys.executable).parent / "actionlint")


def test_docs_show_the_workflow_file_unchanged() -> None:
    """docs/ci.md's inline workflow is exactly docs/examples/hfbuild-ci.yml."""
    doc = (ROOT / "docs" / "ci.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    assert WORKFLOW.read_text() in blocks


def test_actionlint_passes_the_workflow_and_fails_a_broken_one(tmp_path: pathlib.Path) -> None:
    """actionlint accepts the shipped workflow and rejects it with a misspelt job name, so
    `make lint` really checks it."""
    ok = subprocess.run([ACTIONLINT, str(WORKFLOW)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("needs: verify", "needs: verfy"))
    bad = subprocess.run([ACTIONLINT, str(broken)], capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert 'needs job "verfy" which does not exist' in bad.stdout
