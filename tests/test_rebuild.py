"""`hfbuild verify --rebuild`: every stage rebuilt from scratch, whatever caches exist."""

from __future__ import annotations

import pathlib

import pytest

from tests.helpers import Repo, run_hfbuild
from tests.pipeline_project import doit, make_project

NOISE = """import random

def jitter(batch):
    return {"z": [random.random() for _ in batch["x"]]}
"""


def tree(path: pathlib.Path) -> dict[str, tuple[int, int]]:
    """Every file under `path` with its size and mtime: what a write would change."""
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_rebuild_ignores_a_remote_and_the_store_holding_the_results(
    repo: Repo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a remote (configured in pyproject.toml) and the local store both holding every
    result, `verify --rebuild` still rebuilds: an unseeded-random stage is reported as not
    reproducible, and neither the remote nor the user's store is written to."""
    remote = tmp_path / "remote"
    make_project(repo)
    repo.write(
        {
            "pkg/noise.py": NOISE,
            "pyproject.toml": (
                f'[tool.hfbuild]\nremote = "file://{remote}"\n'
                'untracked-env = ["CALL_LOG", "KILL_IN"]\n'
            ),
            "dodo.py": (repo.path / "dodo.py")
            .read_text()
            .replace(
                "\n\ndef task_preprocess",
                "\nfrom pkg import noise\n"
                "noisy = pipe.map('noisy', raw, noise.jitter, batched=True)"
                "\n\n\ndef task_preprocess",
            ),
        },
        commit="noise, and a remote",
    )
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log", env={"HFBUILD_PUSH": "1"})
    repo.commit("lock")
    store = repo.path / ".hfbuild"
    assert len(list((remote / "objects").glob("*/*/manifest.json"))) == 6
    before = tree(remote), tree(store)

    monkeypatch.setenv("HFBUILD_PUSH", "1")  # not even a push: the scratch results go nowhere
    out = run_hfbuild(repo, "verify", "--rebuild")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "stage 'noisy' is not reproducible" in out.stderr
    assert "'split'" not in out.stderr and "'kept'" not in out.stderr
    assert (tree(remote), tree(store)) == before
