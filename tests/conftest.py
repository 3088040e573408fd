"""Shared fixtures: an isolated environment for every test and a one-call real git repo."""

from __future__ import annotations

import os
import pathlib

import pytest

from tests.helpers import Repo, offline_env


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test (and every subprocess it starts) runs offline, with a pinned git identity,
    and with HOME and every cache under a temporary directory: nothing touches ~/.cache."""
    home = tmp_path_factory.mktemp("home")
    for k, v in offline_env(home).items():
        monkeypatch.setenv(k, v)
    for k in ("HFBUILD_STRICT", "HFBUILD_STORE", "HFBUILD_REMOTE", "PYTHONHASHSEED"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def repo(tmp_path: pathlib.Path) -> Repo:
    """An empty git repository in tmp_path/repo."""
    return Repo.init(tmp_path / "repo")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-stress", action="store_true", help="run the long fault runs")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-stress"):
        return
    skip = pytest.mark.skip(reason="a long fault run: `make stress` runs it")
    for item in items:
        if "stress" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
