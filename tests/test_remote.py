"""The remote cache over a real S3 protocol server on loopback (moto's server mode + s3fs)."""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from hfbuild.store.paths import manifest_digest
from tests.helpers import Repo, run_hfbuild
from tests.pipeline_project import calls, doit, expected, make_project, results

ALL = {"feat": 1, "keep": 1, "split": 1, "lens": 1}


# The session's moto server by its URL: `outage` stops it and starts another on its port.
SERVERS: dict[str, Any] = {}


def start_s3_server() -> str:
    """A moto S3 server started on an ephemeral loopback port (where `outage` finds it)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    SERVERS[url] = server
    return url


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on an ephemeral loopback port, for the whole session."""
    url = start_s3_server()
    yield url
    SERVERS.pop(url).stop()


@contextlib.contextmanager
def outage(url: str) -> Iterator[None]:
    """The S3 server at `url` down (connections refused) for the block, then back on the
    same port with what it held (moto keeps its buckets in the process)."""
    from moto.server import ThreadedMotoServer

    SERVERS[url].stop()
    try:
        yield
    finally:
        port = int(url.rsplit(":", 1)[1])
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        SERVERS[url] = server


@contextlib.contextmanager
def s3_requests() -> Iterator[list[str]]:
    """The request lines ('GET /bucket/key HTTP/1.1') the session's moto server (in this
    process) answers during the block, from its werkzeug request log."""
    lines: list[str] = []

    class _Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # werkzeug's colours
            if '"' in msg:
                lines.append(msg.split('"', 2)[1])

    log = logging.getLogger("werkzeug")
    handler, level, propagate = _Lines(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh bucket; fsspec is pointed at the server by its own environment variables, the
    way a user configures credentials and endpoint for hfbuild."""
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": s3_server,
    }.items():
        monkeypatch.setenv(k, v)
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=s3_server, key="testing", secret="testing", use_listings_cache=False
    )
    bucket = f"hfbuild-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    monkeypatch.setenv("HFBUILD_REMOTE", f"s3://{bucket}/cache")
    fs.bucket = bucket  # type: ignore[attr-defined]
    return fs


@pytest.fixture
def pushed(repo: Repo, tmp_path: pathlib.Path, s3: Any) -> Repo:
    """The project built in one clone and pushed to the bucket."""
    make_project(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "first.log")
    out = run_hfbuild(repo, "push")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("pushed") == 5
    return repo


def remote_objects(s3: Any) -> list[str]:
    return sorted(s3.find(f"{s3.bucket}/cache/objects"))


def test_push_then_pull_on_miss_builds_nothing(
    pushed: Repo, tmp_path: pathlib.Path, s3: Any
) -> None:
    """A second clone with an empty store fetches every stage from the remote during
    `doit run preprocess` and runs no transform; the results are the right ones."""
    clone = pushed.clone(tmp_path / "second")
    log = tmp_path / "second.log"
    out = doit(clone, "run", "preprocess", log=log)
    assert calls(log) == {}
    assert out.stdout.count("pulled") == 5
    got = results(clone)
    assert got["kept"] == expected()["kept"] and got["lens"] == expected()["lens"]
    assert run_hfbuild(clone, "status").returncode == 0


def test_pull_command_and_opt_out(pushed: Repo, tmp_path: pathlib.Path, s3: Any) -> None:
    """`hfbuild pull STAGE` fetches just that stage, with the entry its rows are selected
    from (a filter's input); HFBUILD_NO_REMOTE=1 makes doit build the rest."""
    # The committed lock names the inputs' results, which kept's key holds (issue #19):
    # without it, `pull kept` pulls the stages before it to learn its key.
    pushed.git("add", "hfbuild.lock")
    pushed.commit("lock")
    clone = pushed.clone(tmp_path / "second")
    out = run_hfbuild(clone, "pull", "kept")
    size = _size(pushed, "kept") + _size(pushed, "feat")  # kept holds indices over feat's rows
    assert out.stdout.strip() == f"kept: pulled {size:,} bytes"
    log = tmp_path / "second.log"
    doit(clone, "run", "preprocess", log=log, env={"HFBUILD_NO_REMOTE": "1"})
    assert calls(log) == {"split": 1, "lens": 1}  # kept, and feat with it, were already local


def _size(repo: Repo, stage: str) -> int:
    lock = json.loads((repo.path / "hfbuild.lock").read_text())["stages"]
    fp = lock[stage]["fingerprint"]
    m = json.loads((repo.path / ".hfbuild/objects" / fp[:2] / fp / "manifest.json").read_text())
    return sum(m["files"].values())


def test_corrupted_remote_object_is_refused(pushed: Repo, tmp_path: pathlib.Path, s3: Any) -> None:
    """A remote Arrow file whose bytes were altered (same size) fails the content check: it is
    reported, never published, and the stage is built locally instead."""
    lock = json.loads((pushed.path / "hfbuild.lock").read_text())["stages"]
    fp = lock["lens"]["fingerprint"]
    key = next(k for k in remote_objects(s3) if fp in k and k.endswith(".arrow"))
    data = bytearray(s3.cat_file(key))
    data[-200] ^= 0xFF  # inside the last record batch's values
    s3.pipe_file(key, bytes(data))

    clone = pushed.clone(tmp_path / "second")
    log = tmp_path / "second.log"
    out = doit(clone, "run", "preprocess", log=log)
    assert calls(log) == {"lens": 1}
    assert f"remote entry {fp} (lens) fails its content check" in out.stderr
    assert results(clone)["lens"] == expected()["lens"]


def test_interrupted_upload_is_invisible(pushed: Repo, tmp_path: pathlib.Path, s3: Any) -> None:
    """Data uploaded without its manifest (an upload cut short) is never pulled."""
    lock = json.loads((pushed.path / "hfbuild.lock").read_text())["stages"]
    fp = lock["split"]["fingerprint"]
    s3.rm_file(f"{s3.bucket}/cache/objects/{fp[:2]}/{fp}/manifest.json")
    assert any(fp in k for k in remote_objects(s3))  # the data is still there

    clone = pushed.clone(tmp_path / "second")
    log = tmp_path / "second.log"
    doit(clone, "run", "preprocess", log=log)
    assert calls(log) == {"split": 1}


def test_push_after_build(repo: Repo, tmp_path: pathlib.Path, s3: Any) -> None:
    """HFBUILD_PUSH=1 uploads each stage as soon as it is built."""
    make_project(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "log", env={"HFBUILD_PUSH": "1"})
    manifests = [k for k in remote_objects(s3) if k.endswith("manifest.json")]
    assert len(manifests) == 5


def test_unsafe_remote_paths_are_refused(pushed: Repo, tmp_path: pathlib.Path, s3: Any) -> None:
    """A remote manifest naming a file outside its entry ('../..') is refused, nothing is
    written outside the store, and the stage is built locally."""
    lock = json.loads((pushed.path / "hfbuild.lock").read_text())["stages"]
    fp = lock["raw"]["fingerprint"]
    key = f"{s3.bucket}/cache/objects/{fp[:2]}/{fp}/manifest.json"
    doc = json.loads(s3.cat_file(key))
    doc["files"]["../../../../escaped.txt"] = 3
    doc["manifest_digest"] = manifest_digest(doc)  # past the checksum: the paths are checked
    s3.pipe_file(key, json.dumps(doc).encode())

    clone = pushed.clone(tmp_path / "second")
    log = tmp_path / "second.log"
    out = doit(clone, "run", "preprocess", log=log)
    assert "lists unsafe or malformed file paths" in out.stderr
    assert not list(tmp_path.rglob("escaped.txt"))


def test_file_remote_from_pyproject(
    repo: Repo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file:// remote configured in pyproject.toml [tool.hfbuild] works like S3."""
    monkeypatch.delenv("HFBUILD_REMOTE", raising=False)
    remote = tmp_path / "remote"
    make_project(repo)
    config = (repo.path / "pyproject.toml").read_text() + f'remote = "file://{remote}"\n'
    repo.write({"pyproject.toml": config}, commit="remote")
    doit(repo, "run", "preprocess", log=tmp_path / "log")
    assert run_hfbuild(repo, "push").returncode == 0
    clone = repo.clone(tmp_path / "second")
    log = tmp_path / "second.log"
    doit(clone, "run", "preprocess", log=log)
    assert calls(log) == {}


def test_no_remote_configured_is_a_clear_error(
    repo: Repo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hfbuild push` without a remote says the three ways to configure one."""
    monkeypatch.delenv("HFBUILD_REMOTE", raising=False)
    make_project(repo)
    out = run_hfbuild(repo, "push")
    assert out.returncode == 1
    assert "no remote cache configured: pass --remote URL, set HFBUILD_REMOTE" in out.stderr


def test_holding_lists_what_the_remote_stores_in_few_requests_and_keeps_no_stale_listing(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which of many keys the remote has anything for (an entry, or an upload without its
    manifest yet): on a small remote, one flat listing of `objects/` answers for every
    directory of entries; a prefix holding more than a page of names is split down to its
    directories of entries, each listed whole; for too few keys per directory it declines
    (None: asking for each is cheaper). The listing leaves nothing cached: an entry
    published after it is seen (`remove` finds it)."""
    import os

    import fsspec.config

    from hfbuild.store import remotefiles
    from hfbuild.store.remote import Remote

    # In this process fsspec read its configuration when first imported, maybe before the
    # fixture set the endpoint: set it as that configuration holds it.
    endpoint = {"endpoint_url": os.environ["FSSPEC_S3_ENDPOINT_URL"]}
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), **endpoint})
    remote = Remote(f"s3://{s3.bucket}/cache")
    base = f"{s3.bucket}/cache/objects"
    ab = [f"ab{i:030x}" for i in range(4)]
    cd = [f"cd{i:030x}" for i in range(2)]
    s3.pipe(f"{base}/ab/{ab[0]}/manifest.json", b"{}")
    s3.pipe(f"{base}/ab/{ab[1]}/data-{'0' * 32}/x.arrow", b"x")  # an upload under way
    s3.pipe(f"{base}/cd/{cd[1]}/manifest.json", b"{}")
    with s3_requests() as asked:
        assert remote.holding(ab + cd) == {ab[0], ab[1], cd[1]}
    assert len(asked) == 1 and "list-type=2" in asked[0], asked  # one listing for two dirs
    assert remote.holding([ab[0], cd[0]]) is None  # one key per directory: not listed
    assert remote.holding([f"ef{i:030x}" for i in range(3)]) == set()  # no such directory
    s3.pipe(f"{base}/ab/{ab[2]}/manifest.json", b"{}")
    assert remote.remove(ab[2])  # the listing answered nothing after it

    # More names than a page holds (S3's 1,000; 5 here) under objects/ and objects/a: ab/
    # is listed whole, c flat.
    monkeypatch.setattr(remotefiles, "PAGE", 5)
    many = [f"ab{i:030x}" for i in range(100, 106)]
    s3.pipe({f"{base}/ab/{fp}/manifest.json": b"{}" for fp in many})
    with s3_requests() as asked:
        got = remote.holding(ab + cd + many[-3:])
    assert got == {ab[0], ab[1], cd[1], *many[-3:]}
    lists = [line for line in asked if "list-type=2" in line]
    assert len(lists) == len(asked) == 1 + 2 + 1, asked  # objects/; a and c; ab/


def test_holding_lists_s3_for_keys_spread_over_many_directories(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ray build's 200 missing shards fall in ~140 directories of entries: on S3 one flat
    listing answers for them all on a small remote, and even a large one lists fewer
    prefixes than there are keys, so `holding` lists rather than asking for each (a GET per
    shard: 1.3 s of a 200-shard stage's driver on moto)."""
    import os

    import fsspec.config

    from hfbuild.store.remote import Remote

    endpoint = {"endpoint_url": os.environ["FSSPEC_S3_ENDPOINT_URL"]}
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), **endpoint})
    remote = Remote(f"s3://{s3.bucket}/cache")
    keys = [f"{i % 140:02x}{i:030x}" for i in range(200)]  # 140 directories, 60 of them two
    held = keys[::7]
    s3.pipe({f"{s3.bucket}/cache/objects/{fp[:2]}/{fp}/manifest.json": b"{}" for fp in held})
    with s3_requests() as asked:
        assert remote.holding(keys) == set(held)
    assert len(asked) == 1 and "list-type=2" in asked[0], asked
