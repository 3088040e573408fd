"""One real Ray cluster on loopback (a head and a second node, 1 CPU each) with its own moto S3
server, shared by every test that takes the `cluster` fixture (or `remote`, which takes it).

Starting a cluster costs a test run seconds of CPU on a 2-core machine, so the process keeps
one while consecutive tests use it: `cluster` starts it on first use; conftest's
`pytest_runtest_teardown` stops it when the next test of this process takes no `cluster` (or
there is none), and the session's end stops it at the latest. conftest also puts every test
that takes `cluster` in one xdist group ("ray"), so under `make test` (`--dist loadgroup`)
they all run in one worker, one after another, on one cluster.

Each test stays independent of the others on it: its own project and clones in its own
tmp_path, its own bucket (`remote`), and keys of its own where it looks at the nodes' stores
(`NODE_TMPDIRS`, which outlive a test). A test that needs a cluster of its own (killing a
node, say) starts one itself instead of taking this fixture."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import pytest

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# Each node's TMPDIR, set when the cluster starts: a node's store (`worker_store`) is under it.
NODE_TMPDIRS: list[pathlib.Path] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _session_pids(pgids: set[int]) -> list[int]:
    """Processes still alive in the cluster's process groups."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.getpgid(int(d)) in pgids:
                out.append(int(d))
        except OSError:
            continue
    return out


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop the nodes this module started, by their process groups: `ray start --block`
    stops its node's processes on SIGTERM; anything left in the groups is then killed."""
    pgids = {p.pid for p in procs}
    for p in reversed(procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5  # what ignores SIGTERM is killed: a stop waited 20 s
    while _session_pids(pgids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _session_pids(pgids):
        os.kill(pid, signal.SIGKILL)
    for p in procs:
        p.wait(timeout=10)


def _popen(cmd: list[str], env: dict[str, str], log: pathlib.Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(
            cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_for(
    address: str,
    env: dict[str, str],
    nodes: int,
    proc: subprocess.Popen[bytes],
    log: pathlib.Path,
) -> None:
    code = (
        "import ray, sys, time\n"
        f"ray.init(address={address!r}, logging_level='ERROR')\n"
        "for _ in range(120):\n"
        f"    if len([n for n in ray.nodes() if n['Alive']]) >= {nodes}:\n"
        "        sys.exit(0)\n"
        "    time.sleep(0.5)\n"
        "sys.exit(1)\n"
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ray start exited:\n{log.read_text()[-3000:]}")
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, check=False
        )
        if out.returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"the Ray cluster at {address} did not come up with {nodes} nodes")


class _Cluster:
    """The process's running cluster and S3 server, if any."""

    env: dict[str, str] | None = None
    procs: list[subprocess.Popen[bytes]] = []
    shorts: list[str] = []
    s3_url: str | None = None


def start(base: pathlib.Path) -> dict[str, str]:
    """Start the cluster (its files under `base`) and its S3 server; the environment a driver
    needs to use both."""
    from tests.test_remote import start_s3_server

    s3_url = start_s3_server()
    _Cluster.s3_url = s3_url
    home = base / "home"
    home.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "HOME": str(home),
        "TMPDIR": str(base),
        "HF_HOME": str(home / "hf"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": s3_url,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("HFBUILD_STORE", None)
    common = [
        "--num-cpus",
        "1",
        "--node-ip-address",
        "127.0.0.1",
        "--block",
        "--disable-usage-stats",
        "--object-store-memory",
        str(80 * 1024 * 1024),  # tiny data; leave the shared machine's memory alone
    ]
    # Each node its own temporary directory, as on separate machines: two nodes sharing one
    # unpack a package shared by their tasks into one directory, and Ray's unpacking removes
    # and re-creates it, under the other node's worker running in it.
    _Cluster.shorts = [tempfile.mkdtemp(prefix="hfr-", dir="/tmp") for _ in range(2)]
    _Cluster.procs = procs = []
    head = [RAY, "start", "--head", "--port", str(port), "--include-dashboard=false"]
    # Ray's sockets live under --temp-dir, and a Unix socket path is at most 107 bytes:
    # pytest's directories (deeper under xdist) are too long for it.
    head += ["--temp-dir", _Cluster.shorts[0], *common]
    # Each node its own TMPDIR too, so its workers' store (`worker_store`) is its own, as on
    # separate machines, and a transform can tell the nodes apart by it.
    tmps = [base / "tmp-head", base / "tmp-n2"]
    for t in tmps:
        t.mkdir()
    NODE_TMPDIRS[:] = tmps
    try:
        procs.append(_popen(head, {**env, "TMPDIR": str(tmps[0])}, base / "head.log"))
        address = f"127.0.0.1:{port}"
        _wait_for(address, env, 1, procs[-1], base / "head.log")
        node = [RAY, "start", "--address", address, "--temp-dir", _Cluster.shorts[1], *common]
        procs.append(_popen(node, {**env, "TMPDIR": str(tmps[1])}, base / "n2.log"))
        _wait_for(address, env, 2, procs[-1], base / "n2.log")
    except BaseException:
        stop()
        raise
    _Cluster.env = {
        "RAY_ADDRESS": address,
        **{k: env[k] for k in env if k.startswith(("AWS", "FSSPEC"))},
    }
    return _Cluster.env


def stop() -> None:
    """Stop the cluster and its S3 server, if running."""
    from tests.test_remote import SERVERS

    _Cluster.env = None
    try:
        _stop(_Cluster.procs)
    finally:
        _Cluster.procs = []
        for d in _Cluster.shorts:
            shutil.rmtree(d, ignore_errors=True)
        _Cluster.shorts = []
        if _Cluster.s3_url is not None:
            server = SERVERS.pop(_Cluster.s3_url, None)
            _Cluster.s3_url = None
            if server is not None:
                server.stop()


def running() -> bool:
    return _Cluster.env is not None


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A Ray head and a second node, each with 1 CPU, on 127.0.0.1, and an S3 server (moto)
    on loopback; the environment a driver needs to use them (RAY_ADDRESS, the AWS keys and
    FSSPEC_S3_ENDPOINT_URL). Started on first use, shared with the tests that follow."""
    if _Cluster.env is None:
        start(tmp_path_factory.mktemp("ray"))
    assert _Cluster.env is not None
    return dict(_Cluster.env)


@pytest.fixture
def remote(cluster: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the cluster's S3 server, configured as the remote."""
    import s3fs

    for k, v in cluster.items():
        monkeypatch.setenv(k, v)
    fs = s3fs.S3FileSystem(
        endpoint_url=cluster["FSSPEC_S3_ENDPOINT_URL"], key="testing", secret="testing"
    )
    bucket = f"hfbuild-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    url = f"s3://{bucket}/cache"
    monkeypatch.setenv("HFBUILD_REMOTE", url)
    return url


def uses_cluster(item: Any) -> bool:
    """Whether a collected test takes the cluster (directly or through `remote`)."""
    return "cluster" in getattr(item, "fixturenames", ())
