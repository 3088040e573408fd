"""datasets', pyarrow's and Python's versions are in every stage's key; explain names them."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import HFBUILD, Repo, run_hfbuild, run_python
from tests.pipeline_project import doit, make_project


def fake_distribution(tmp_path: pathlib.Path, name: str, version: str) -> str:
    """A directory that, first on sys.path, makes `name` report `version` to importlib.metadata
    and to a dist-info listing, while its code still imports from site-packages."""
    d = tmp_path / "fake-dists"
    info = d / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return str(d)


def test_datasets_upgrade_rebuilds_every_stage_and_explain_names_it(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """Built under datasets 3.0.0, the pipeline is stale under the installed datasets: every
    stage (load, map, filter, apply) says `package datasets changed: 3.0.0 -> <installed>`."""
    make_project(repo)
    fake = fake_distribution(tmp_path, "datasets", "3.0.0")
    doit(repo, "run", "preprocess", log=tmp_path / "log", env={"PYTHONPATH": fake})
    stored = json.loads((repo.path / "hfbuild.lock").read_text())["stages"]
    assert all("datasets==3.0.0" in e["manifest"]["packages"] for e in stored.values())

    installed = importlib.metadata.version("datasets")
    out = run_hfbuild(repo, "explain", "raw")
    assert out.returncode == 1
    assert f"package datasets changed: 3.0.0 -> {installed}" in out.stdout
    states = json.loads(run_hfbuild(repo, "status", "--json").stdout)
    assert {s["stage"]: s["state"] for s in states} == dict.fromkeys(stored, "stale")
    assert states[0]["reason"] == f"package datasets changed: 3.0.0 -> {installed}"
    for name in stored:
        ex = json.loads(run_hfbuild(repo, "explain", name, "--json").stdout)
        assert ["package", "datasets", "3.0.0", installed] in [
            [c["part"], c["path"], c["old"], c["new"]] for c in ex["changes"]
        ]
    # Back under the version it was built with, everything is up to date again.
    back = subprocess.run(
        [HFBUILD, "status"],
        cwd=repo.path,
        env={**os.environ, "PYTHONPATH": fake},
        capture_output=True,
        text=True,
        check=False,
    )
    assert back.returncode == 0, back.stdout + back.stderr


def _hfbuild(repo: Repo, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HFBUILD, *args],
        cwd=repo.path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_team_on_two_versions_keeps_one_lock(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A lock committed under datasets 3.0.0: under the installed datasets every stage is
    built once (other keys), each to the same result, so the lock is left as it is, and
    `verify`, `verify --staged` and `status` pass on both sides. A clone that has not built
    under its versions is refused by the hook (its store holds no result of its own); a real
    change under either version rewrites the entry."""
    make_project(repo)
    old = {"PYTHONPATH": fake_distribution(tmp_path, "datasets", "3.0.0")}
    doit(repo, "run", "preprocess", log=tmp_path / "a.log", env=old)
    repo.git("add", "hfbuild.lock")
    repo.commit("lock, under datasets 3.0.0")
    lock = (repo.path / "hfbuild.lock").read_text()

    clone = repo.clone(tmp_path / "clone")
    hook = run_hfbuild(clone, "verify", "--staged")
    assert hook.returncode == 1 and "package datasets changed" in hook.stderr, hook.stderr

    out = doit(repo, "run", "preprocess", log=tmp_path / "b.log")
    assert "built" in out.stdout  # every stage: its key holds the versions it ran under
    assert (repo.path / "hfbuild.lock").read_text() == lock
    for env in ({}, old):
        for args in (("verify",), ("verify", "--staged"), ("status",)):
            got = _hfbuild(repo, env, *args)
            assert got.returncode == 0, (env, args, got.stdout + got.stderr)

    # A real change is recorded whoever makes it.
    deep = repo.path / "pkg" / "util" / "deep.py"
    deep.write_text(deep.read_text().replace("OFFSET = 0", "OFFSET = 1"))
    repo.commit("another offset")
    doit(repo, "run", "preprocess", log=tmp_path / "c.log")
    assert (repo.path / "hfbuild.lock").read_text() != lock


@pytest.mark.parametrize("name", ["datasets", "pyarrow"])
def test_runtime_packages_are_read_without_importing_them(repo: Repo, name: str) -> None:
    """A fingerprint records datasets, pyarrow and Python major.minor without importing
    datasets or pyarrow (an up-to-date check stays cheap)."""
    repo.write({"t.py": "def f(x):\n    return x\n"}, commit="t")
    code = f"""
        import json, sys, warnings
        warnings.simplefilter("ignore")
        import hfbuild, t
        _, m = hfbuild.fingerprint(t.f, return_manifest=True)
        print(json.dumps([m.doc["packages"], {name!r} in sys.modules]))
        """
    packages, imported = json.loads(run_python(code, repo.path).stdout)
    assert not imported
    assert f"{name}=={importlib.metadata.version(name)}" in packages
    assert f"python=={sys.version_info[0]}.{sys.version_info[1]}" in packages
