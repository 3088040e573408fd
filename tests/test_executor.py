"""Choosing the executor, and the remote's first-writer-wins publish (no cluster needed)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from hfbuild.errors import ConfigError
from hfbuild.executor import executor_name
from hfbuild.remote import Remote
from hfbuild.store import Store
from tests.helpers import Repo
from tests.pipeline_project import make_project
from tests.test_remote import s3, s3_server  # noqa: F401  (moto's S3 server and a bucket)

FP = "0123456789abcdef0123456789abcdef"


def test_executor_choice_order(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--executor beats HFBUILD_EXECUTOR, which beats [tool.hfbuild] executor; local is the
    default, and an unknown name is an error naming the choices."""
    assert executor_name(str(tmp_path)) == "local"
    (tmp_path / "pyproject.toml").write_text('[tool.hfbuild]\nexecutor = "ray"\n')
    assert executor_name(str(tmp_path)) == "ray"
    monkeypatch.setenv("HFBUILD_EXECUTOR", "local")
    assert executor_name(str(tmp_path)) == "local"
    assert executor_name(str(tmp_path), "ray") == "ray"
    monkeypatch.setenv("HFBUILD_EXECUTOR", "dask")
    with pytest.raises(ConfigError, match="unknown executor 'dask': use one of local, ray"):
        executor_name(str(tmp_path))


def _hfbuild(repo: Repo, *args: str, prelude: str = "", **env: str) -> Any:
    code = f"import sys\n{prelude}\nfrom hfbuild.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=repo.path,
        env={**os.environ, "CALL_LOG": os.devnull, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_ray_missing_says_what_to_install(repo: Repo) -> None:
    """Choosing Ray where it cannot be imported fails with one message naming the extra."""
    make_project(repo)
    out = _hfbuild(repo, "build", "--executor", "ray", prelude="sys.modules['ray'] = None")
    assert out.returncode == 1, out.stderr
    assert "the Ray executor needs Ray" in out.stderr
    assert "pip install 'hfbuild[ray]'" in out.stderr
    assert "Traceback" not in out.stderr


def test_ray_without_a_remote_is_an_error(repo: Repo) -> None:
    """The Ray executor without a remote cache fails before contacting any cluster, saying
    how to configure one."""
    make_project(repo)
    out = _hfbuild(repo, "build", "raw", HFBUILD_EXECUTOR="ray")
    assert out.returncode == 1, out.stderr
    assert "the Ray executor needs a remote cache" in out.stderr
    assert "HFBUILD_REMOTE" in out.stderr


def test_build_command_builds_locally(repo: Repo) -> None:
    """`hfbuild build` builds every stage with the local executor, then finds them built."""
    make_project(repo)
    out = _hfbuild(repo, "build")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(": built ") == 5
    again = _hfbuild(repo, "build", "kept")
    assert again.stdout.strip() == "kept: up to date (26 rows)"


# -- first writer wins --------------------------------------------------------------------------


def _entry(store: Store) -> None:
    """A small real entry under FP."""
    import datasets

    from hfbuild.content import dataset_hash

    tmp = store.new_build_dir(FP)
    datasets.Dataset.from_dict({"x": list(range(100))}).save_to_disk(os.path.join(tmp, "data"))
    h = dataset_hash(datasets.load_from_disk(os.path.join(tmp, "data")))
    store.publish(tmp, FP, {"content_hash": h, "rows": 100})


@pytest.fixture(params=["file", "s3"])
def remote_url(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A file:// remote, and a bucket on moto's S3 server (fsspec configured for it)."""
    if request.param == "file":
        yield f"file://{tmp_path / 'remote'}"
        return
    import fsspec

    bucket = request.getfixturevalue("s3")
    endpoint = os.environ["FSSPEC_S3_ENDPOINT_URL"]
    conf = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    monkeypatch.setitem(fsspec.config.conf, "s3", conf)
    yield f"s3://{bucket.bucket}/cache"


def test_manifest_write_is_create_only(remote_url: str) -> None:
    """The manifest write refuses to replace an existing one: the second writer learns it
    lost and the first writer's bytes stay."""
    r = Remote(remote_url)
    key = r._key(FP, "manifest.json")
    r.fs.makedirs(os.path.dirname(key), exist_ok=True)
    assert r._create(key, b"first") is True
    assert r._create(key, b"second") is False
    assert r.fs.cat_file(key) == b"first"


def test_concurrent_pushes_publish_once(remote_url: str, tmp_path: pathlib.Path) -> None:
    """Eight pushes of one entry at once: one publishes, the others send nothing or delete
    their copy; the remote holds one manifest and one data directory, and pulls intact."""
    store = Store(tmp_path / "store")
    _entry(store)
    sent: list[int] = []
    start = threading.Barrier(8)

    def push() -> None:
        start.wait()
        sent.append(Remote(remote_url).push(store, FP, "x"))

    threads = [threading.Thread(target=push) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([n for n in sent if n > 0]) == 1
    r = Remote(remote_url)
    names = sorted(os.path.basename(p.rstrip("/")) for p in r.fs.ls(r._key(FP), detail=False))
    assert len(names) == 2 and names[0].startswith("data-") and names[1] == "manifest.json"
    fresh = Store(tmp_path / "fresh")
    assert r.pull(fresh, FP, "x") > 0 and fresh.has(FP)
