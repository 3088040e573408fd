"""A real notebook kernel that keeps a module loaded while its file is edited and committed
(issue #9, item 4): its result must never be filed under the edited code's key."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tests.helpers import Repo

KERNEL = "hfbuild-test"

SETUP = """
import importlib, json, os, sys
sys.path.insert(0, os.getcwd())
import hfbuild
from hfbuild.builds.stage import build
import transforms

def run():
    pipe = hfbuild.Pipeline(root=os.getcwd())
    raw = pipe.load("raw", "json", data_files="data.jsonl", split="train")
    pipe.map("shout", raw, transforms.shout)
    build(pipe, "shout")
    return sorted(pipe.result("shout")["t"])
"""
RUN = "print(json.dumps({'exe': sys.executable, 'rows': run()}))"
RELOAD = "importlib.reload(transforms)\n" + RUN


@pytest.fixture
def kernel(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec whose interpreter is this test's own (the worktree venv's), found through
    JUPYTER_PATH only; Jupyter's and IPython's own directories are temporary."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "jupyter-config"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("HFBUILD_STORE", str(tmp_path / "store"))
    return KERNEL


class Kernel:
    """One live kernel, running cells one at a time in the repository."""

    def __init__(self, name: str, cwd: pathlib.Path) -> None:
        self.nb = nbformat.v4.new_notebook()
        self.client = NotebookClient(
            self.nb, kernel_name=name, timeout=180, resources={"metadata": {"path": str(cwd)}}
        )

    def __enter__(self) -> Kernel:
        self._ctx = self.client.setup_kernel()
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)

    def run(self, source: str) -> Any:
        """Run a cell; its last printed line, parsed as JSON."""
        cell = nbformat.v4.new_code_cell(source)
        self.nb.cells.append(cell)
        self.client.execute_cell(cell, len(self.nb.cells) - 1)
        text = "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")
        return json.loads(text.strip().splitlines()[-1]) if text.strip() else None


def test_kernel_refuses_code_edited_after_import(repo: Repo, kernel: str) -> None:
    """A kernel that imported transforms, built a stage, and then saw transforms.py edited
    and committed refuses the next build with StaleModuleError (restart or reload); after
    `importlib.reload` it builds the edited code; a fresh kernel gets the edited output."""
    repo.write(
        {
            "transforms.py": "def shout(ex):\n    return {'t': ex['t'].upper()}\n",
            "data.jsonl": '{"t": "a"}\n{"t": "b"}\n',
            ".gitignore": "__pycache__/\n",
        },
        commit="project",
    )
    with Kernel(kernel, repo.path) as k:
        k.run(SETUP)
        first = k.run(RUN)
        assert first["exe"] == sys.executable  # the kernel runs the worktree's interpreter
        assert first["rows"] == ["A", "B"]
        repo.write({"transforms.py": "def shout(ex):\n    return {'t': ex['t'] * 2}\n"})
        repo.commit("edit transforms between cells")
        with pytest.raises(CellExecutionError) as refused:
            k.run(RUN)
        assert refused.value.ename == "StaleModuleError"
        assert "Restart the kernel" in refused.value.evalue
        assert "importlib.reload(transforms)" in refused.value.evalue
        assert k.run(RELOAD)["rows"] == ["aa", "bb"]
    with Kernel(kernel, repo.path) as fresh:
        fresh.run(SETUP)
        assert fresh.run(RUN)["rows"] == ["aa", "bb"]


def test_kernel_without_reload_never_fills_the_new_key(repo: Repo, kernel: str) -> None:
    """The refused build stored nothing: a fresh kernel after the edit builds the edited code
    itself (the store had no entry for its fingerprint), and gets its output."""
    repo.write(
        {
            "transforms.py": "def shout(ex):\n    return {'t': ex['t'].upper()}\n",
            "data.jsonl": '{"t": "a"}\n',
            ".gitignore": "__pycache__/\n",
        },
        commit="project",
    )
    with Kernel(kernel, repo.path) as k:
        k.run(SETUP)
        assert k.run(RUN)["rows"] == ["A"]
        repo.write({"transforms.py": "def shout(ex):\n    return {'t': ex['t'] + '!'}\n"})
        repo.commit("edit")
        with pytest.raises(CellExecutionError):
            k.run(RUN)
    with Kernel(kernel, repo.path) as fresh:
        fresh.run(SETUP)
        check = (
            "pipe = hfbuild.Pipeline(root=os.getcwd())\n"
            "raw = pipe.load('raw', 'json', data_files='data.jsonl', split='train')\n"
            "pipe.map('shout', raw, transforms.shout)\n"
            "print(json.dumps(pipe.store.has(pipe['shout'].fingerprint)))"
        )
        assert fresh.run(check) is False
        assert fresh.run(RUN)["rows"] == ["a!"]
