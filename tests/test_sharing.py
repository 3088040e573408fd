"""A store shared by a team: group modes in a setgid store, two real Unix users, and
`hfbuild doctor`."""

from __future__ import annotations

import grp
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import Repo, run_hfbuild
from tests.pipeline_project import READ_RESULTS, calls, doit, expected, make_project

SITE = sysconfig.get_paths()["purelib"]


def modes(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    """{path relative to root: (mode bits, gid)} of everything under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for p in [dirpath, *(os.path.join(dirpath, n) for n in names)]:
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (stat.S_IMODE(st.st_mode), st.st_gid)
    return out


def test_a_setgid_store_is_group_writable_whatever_the_umask(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """Built with umask 022 into a setgid store, every directory is group-writable and
    setgid and every file group-readable and -writable (lock files, refs, manifests, data)."""
    make_project(repo)
    store = tmp_path / "store"
    store.mkdir()
    os.chmod(store, 0o2775)
    env = {"HFBUILD_STORE": str(store)}
    old = os.umask(0o022)
    try:
        doit(repo, "run", "preprocess", log=tmp_path / "log", env=env)
    finally:
        os.umask(old)
    found = modes(store)
    assert any(p.endswith("manifest.json") for p in found) and any("refs" in p for p in found)
    for path, (mode, _) in found.items():
        full = store / path
        if full.is_dir():
            assert mode & 0o2770 == 0o2770, (path, oct(mode))
        else:
            assert mode & 0o660 == 0o660, (path, oct(mode))


def test_a_private_store_keeps_ordinary_modes(repo: Repo, tmp_path: pathlib.Path) -> None:
    """Without setgid, files get the umask's ordinary modes: nothing is widened."""
    make_project(repo)
    store = tmp_path / "store"
    old = os.umask(0o022)
    try:
        doit(repo, "run", "preprocess", log=tmp_path / "log", env={"HFBUILD_STORE": str(store)})
    finally:
        os.umask(old)
    assert all(mode & 0o022 == 0 for mode, _ in modes(store).values())


def test_doctor_on_a_private_store(repo: Repo, tmp_path: pathlib.Path) -> None:
    """doctor passes a private store (saying how to share it), and `--shared` fails it with
    the commands that fix it."""
    make_project(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "log")
    out = run_hfbuild(repo, "doctor")
    assert out.returncode == 0, out.stderr
    assert "is private" in out.stdout and "flock works" in out.stdout
    out = run_hfbuild(repo, "doctor", "--shared")
    assert out.returncode == 1
    assert "not setgid" in out.stderr and "chmod -R g+rwX" in out.stderr


# -- two real users ---------------------------------------------------------------------------


class Team:
    """Two Unix users in one group, each with a clone of the project, sharing `base`."""

    def __init__(self, base: pathlib.Path, group: str, users: list[str], python: str) -> None:
        self.base = base
        self.group = group
        self.users = users
        self.python = python

    def env(self, user: str, **extra: str) -> dict[str, str]:
        home = self.base / f"home-{user}"
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "HF", "XDG"))}
        return {
            **keep,
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "HF_HOME": str(home / "hf"),
            "HF_DATASETS_CACHE": str(home / "hf" / "datasets"),
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"),
            "CALL_LOG": str(home / "calls.log"),
            "PYTHONPATH": str(self.base / user),
            **extra,
        }

    def run(self, user: str, module: str, *args: str, **env: str) -> Any:
        """`python -m module args` as `user` in their clone, umask 022."""
        code = (
            f"import runpy, site, sys; site.addsitedir({SITE!r}); "
            f"sys.argv = [{module!r}, *sys.argv[1:]]; "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
        )
        return subprocess.run(
            [self.python, "-c", code, *args],
            cwd=self.base / user,
            env=self.env(user, **env),
            user=user,
            group=user,
            extra_groups=[self.group],
            umask=0o022,
            capture_output=True,
            text=True,
            check=False,
        )

    def calls(self, user: str) -> Any:
        return calls(self.base / f"home-{user}" / "calls.log")


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _python_for(user: str) -> str | None:
    """An interpreter `user` can run with this venv's packages: the venv's own, else the
    system one of the same version (a venv's python links into its base install, which may
    sit in root's 0700 home)."""
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"]
    for py in candidates:
        try:
            probe = subprocess.run(
                [py, "-c", f"import site; site.addsitedir({SITE!r}); import hfbuild, datasets"],
                user=user,
                cwd="/",
                capture_output=True,
                check=False,
                env={"PATH": os.environ.get("PATH", ""), "HOME": "/"},
            )
        except OSError:  # not executable by that user
            continue
        if probe.returncode == 0:
            return py
    return None


@pytest.fixture
def team(repo: Repo) -> Iterator[Team]:
    """Two new Unix users in a new group, a world-traversable directory holding a clone of
    the project for each, all removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating Unix users needs root (CI runs as root)")
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    tag = uuid.uuid4().hex[:6]
    group, users = f"hfbt{tag}", [f"hfba{tag}", f"hfbb{tag}"]
    base = pathlib.Path(tempfile.mkdtemp(prefix="hfbuild-team-", dir="/tmp"))
    made: list[tuple[str, str]] = []
    try:
        os.chmod(base, 0o755)
        _sh("groupadd", group)
        made.append(("groupdel", group))
        for u in users:
            _sh("useradd", "--no-create-home", "--user-group", "--groups", group, u)
            made.insert(0, ("userdel", u))
        python = _python_for(users[0])
        if python is None:
            pytest.skip(
                f"no Python that another user can run with {SITE}'s packages (its path is "
                f"not readable by others)"
            )
        make_project(repo)
        for u in users:
            repo.clone(base / u)
            home = base / f"home-{u}"
            home.mkdir()
            _sh("chown", "-R", f"{u}:{u}", str(base / u), str(home))
        yield Team(base, group, users, python)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        for cmd, name in made:
            subprocess.run([cmd, name], capture_output=True, check=False)


def _store(team: Team, name: str, mode: int) -> pathlib.Path:
    store = team.base / name
    store.mkdir()
    _sh("chgrp", team.group, str(store))
    os.chmod(store, mode)
    return store


def test_two_users_share_one_setgid_store(team: Team) -> None:
    """User A builds into a setgid group store; user B reuses every result (no rebuild, no
    permission error), reads them, builds a changed stage into the same store, and A then
    reuses B's result; doctor finds nothing wrong."""
    a, b = team.users
    store = _store(team, "store", 0o2775)
    env = {"HFBUILD_STORE": str(store)}
    out = team.run(a, "doit", "run", "preprocess", **env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert team.calls(a) == {"feat": 1, "keep": 1, "split": 1, "lens": 1}
    gid = grp.getgrnam(team.group).gr_gid
    assert {g for _, g in modes(store).values()} == {gid}

    out = team.run(b, "doit", "run", "preprocess", **env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert team.calls(b) == {}
    code = textwrap.dedent(READ_RESULTS)
    read = subprocess.run(
        [team.python, "-c", f"import site; site.addsitedir({SITE!r})\n{code}"],
        cwd=team.base / b,
        env=team.env(b, **env),
        user=b,
        capture_output=True,
        text=True,
        check=False,
    )
    assert read.returncode == 0, read.stderr
    got = json.loads(read.stdout.strip().splitlines()[-1])
    assert got["kept"] == expected()["kept"] and got["lens"] == expected()["lens"]

    dodo = team.base / b / "dodo.py"
    subprocess.run(["sed", "-i", 's/{"scale": 1}/{"scale": 2}/', str(dodo)], check=True, user=b)
    out = team.run(b, "doit", "run", "preprocess", **env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert team.calls(b) == {"lens": 1}
    _sh("cp", str(dodo), str(team.base / a / "dodo.py"))
    out = team.run(a, "doit", "run", "preprocess", **env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert team.calls(a)["lens"] == 1  # still the first build's single call: B's was reused

    out = team.run(b, "hfbuild.cli.main", "doctor", **env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"shared with group {team.group}" in out.stdout


def test_doctor_flags_a_group_store_made_without_setgid(team: Team) -> None:
    """A group-writable store without setgid gets files in the builder's own group that
    others cannot write: the other user's build fails with a message pointing at doctor
    (no traceback); doctor says why and prints the chgrp/chmod commands that fix it, after
    which it passes and the other user reuses every result."""
    a, b = team.users
    store = _store(team, "store", 0o775)
    env = {"HFBUILD_STORE": str(store)}
    out = team.run(a, "doit", "run", "preprocess", **env)
    assert out.returncode == 0, out.stdout + out.stderr
    out = team.run(b, "doit", "run", "preprocess", **env)
    assert out.returncode != 0
    assert "permission denied" in out.stdout + out.stderr
    assert "Run `hfbuild doctor`" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    out = team.run(b, "hfbuild.cli.main", "doctor", **env)
    assert out.returncode == 1
    assert "not setgid" in out.stderr and f"not {team.group}" in out.stderr
    fixes = [line.strip() for line in out.stderr.splitlines() if line.startswith("  ch")]
    fixes += [line.strip() for line in out.stderr.splitlines() if line.startswith("  find")]
    assert len(fixes) == 3, out.stderr
    for cmd in fixes:
        _sh("sh", "-c", cmd)  # as root, who owns nothing there but may fix everything
    out = team.run(b, "hfbuild.cli.main", "doctor", **env)
    assert out.returncode == 0, out.stderr
    out = team.run(b, "doit", "run", "preprocess", **env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert team.calls(b) == {}


MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
fs1:/export /shared nfs4 rw,vers=4.2,local_lock=none,addr=10.0.0.1 0 0
fs1:/scratch /shared/local\\040lock nfs4 rw,vers=4.2,local_lock=flock,addr=10.0.0.1 0 0
10.0.0.2@tcp:/lfs /lustre lustre rw,localflock,lazystatfs 0 0
10.0.0.2@tcp:/lfs2 /lustre2 lustre rw,flock,lazystatfs 0 0
"""


def test_flock_local_to_one_machine_is_detected_from_the_mount(tmp_path: pathlib.Path) -> None:
    """A store on NFS mounted with local_lock=flock, or on Lustre with localflock (where
    flock silently excludes only this machine's processes), is named with its mount; NFS
    with real locking, Lustre with cluster-wide flock and local disks are not."""
    from hfbuild.store.sharing import local_only_flock

    table = tmp_path / "mounts"
    table.write_text(MOUNTS)
    nfs_local = local_only_flock("/shared/local lock/hfbuild", str(table))
    assert nfs_local is not None
    assert "nfs4 mounted at /shared/local lock with local_lock=flock" in nfs_local
    lustre = local_only_flock("/lustre/team/store", str(table))
    assert lustre is not None and "lustre mounted at /lustre with localflock" in lustre
    for fine in ("/shared/hfbuild", "/lustre2/store", "/home/me/store"):
        assert local_only_flock(fine, str(table)) is None, fine
