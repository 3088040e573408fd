"""Shared fixtures: an isolated environment for every test and a one-call real git repo."""

from __future__ import annotations

import os
import pathlib

import pytest

from tests.helpers import Repo


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test (and every subprocess it starts) runs offline, with a pinned git identity,
    and with HOME and every cache under a temporary directory: nothing touches ~/.cache."""
    home = tmp_path_factory.mktemp("home")
    env = {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "HF_HOME": str(home / "hf"),
        "HF_DATASETS_CACHE": str(home / "hf" / "datasets"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HFBUILD_STRICT", "HFBUILD_STORE", "HFBUILD_REMOTE", "PYTHONHASHSEED"):
        monkeypatch.delenv(k, raising=False)
    (home / ".gitconfig").write_text(
        '[init]\n\tdefaultBranch = main\n[protocol "file"]\n\tallow = always\n'
    )


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
