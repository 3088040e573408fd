"""Shared fixtures: an isolated environment for every test and a one-call real git repo."""

from __future__ import annotations

import os
import pathlib
import signal
from typing import Any

import pytest

from tests import raycluster
from tests.helpers import Repo, offline_env
from tests.raycluster import cluster, remote  # noqa: F401  (fixtures for every module)

# Run first: a test this long started late is the run's tail (`make test` runs three workers).
LONG_FIRST = ("tests/test_differential.py::",)
# The tests on the shared Ray cluster (tests/raycluster.py), by node id: one worker runs them
# one after another on one cluster. A test taking `cluster` elsewhere is named here.
RAY_GROUP = ("tests/test_ray.py::", "tests/test_argpaths.py::test_ray_worker_receives_")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test (and every subprocess it starts) runs offline, with a pinned git identity,
    and with HOME and every cache under a temporary directory: nothing touches ~/.cache."""
    home = tmp_path_factory.mktemp("home")
    for k, v in offline_env(home).items():
        monkeypatch.setenv(k, v)
    for k in ("HFBUILD_STRICT", "HFBUILD_STORE", "HFBUILD_REMOTE", "PYTHONHASHSEED"):
        monkeypatch.delenv(k, raising=False)
    # Every process a test starts inherits this one's signal mask and ignored signals. A test
    # sending SIGINT (what Ctrl-C sends) needs what a terminal gives: SIGINT delivered. Seen
    # once in a `.ci/run`: in one xdist worker every Ctrl-C test's child ignored SIGINT until
    # its timeout (blocked: even the handler hfbuild installs never ran), in no run since.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def repo(tmp_path: pathlib.Path) -> Repo:
    """An empty git repository in tmp_path/repo."""
    return Repo.init(tmp_path / "repo")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-stress", action="store_true", help="run the long fault runs")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    astray = [i.nodeid for i in items if raycluster.uses_cluster(i) and not _ray_group(i.nodeid)]
    if astray:
        raise pytest.UsageError(f"tests taking the Ray cluster outside RAY_GROUP: {astray}")
    items.sort(key=lambda item: not item.nodeid.startswith(LONG_FIRST))  # stable
    if config.getoption("--run-stress"):
        return
    skip = pytest.mark.skip(reason="a long fault run: `make stress` runs it")
    for item in items:
        if "stress" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """The shared Ray cluster stops when the next test of this process does not take it."""
    if raycluster.running() and (nextitem is None or not raycluster.uses_cluster(nextitem)):
        raycluster.stop()


def pytest_sessionfinish(session: pytest.Session) -> None:
    if raycluster.running():
        raycluster.stop()


def _ray_group(nodeid: str) -> bool:
    return nodeid.startswith(RAY_GROUP)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`-n N` (xdist's default `load`): the Ray group is one unit of work, sent first (one
    worker, one cluster), then single tests one at a time in collection order, the longest
    first. xdist's own `--dist loadgroup` does this by a suffix on the node id, which pytest 9
    no longer lets it set (pytest-xdist issue #1386): the tests spread over both workers."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class RayGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "ray" if _ray_group(nodeid) else nodeid

    return RayGroupScheduling(config, log)
