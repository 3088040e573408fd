"""Choosing the executor, and the remote's first-writer-wins publish (no cluster needed)."""

from __future__ import annotations

import io
import json
import os
import pathlib
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from hfbuild.builds.executor import executor_name
from hfbuild.core.errors import ConfigError
from hfbuild.store.remote import Remote
from hfbuild.store.store import Store
from tests.helpers import Repo, fork_python, read_python
from tests.pipeline_project import doit, make_project
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
    code = f"import sys\n{prelude}\nfrom hfbuild.cli.main import main\nsys.exit(main(sys.argv[1:]))"
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


def test_a_stage_its_store_holds_connects_no_cluster_on_ray(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """On the Ray executor with a remote, a stage the store holds is neither pulled nor built:
    the command imports no ray and contacts no cluster (a stage the store lacks starts the
    connection, `executor.expect`, while the remote is asked)."""
    make_project(repo)
    assert _hfbuild(repo, "build", "raw").returncode == 0
    (tmp_path / "remote").mkdir()
    prelude = "import atexit\natexit.register(lambda: print('ray:', 'ray' in sys.modules))"
    out = _hfbuild(
        repo,
        "build",
        "raw",
        "--executor",
        "ray",
        prelude=prelude,
        HFBUILD_REMOTE=f"file://{tmp_path / 'remote'}",
        RAY_ADDRESS="127.0.0.1:1",  # no cluster there
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["raw: up to date (40 rows)", "ray: False"]


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

    from hfbuild.store.content import dataset_hash

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
    key = r.key(FP, "manifest.json")
    r.fs.makedirs(os.path.dirname(key), exist_ok=True)
    assert r.create(key, b"first") is True
    assert r.create(key, b"second") is False
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
    names = sorted(os.path.basename(p.rstrip("/")) for p in r.fs.ls(r.key(FP), detail=False))
    assert len(names) == 2 and names[0].startswith("data-") and names[1] == "manifest.json"
    fresh = Store(tmp_path / "fresh")
    assert r.pull(fresh, FP, "x") > 0 and fresh.has(FP)


# -- a sharded stage as one unit per shard (the driver's side, and a worker's, without Ray) -----

SHARDED = {
    "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG"]\n',
    "conf/scale.txt": "5\n",
    "pkg/__init__.py": "",
    "pkg/t.py": """
        import os

        HERE = os.path.dirname(os.path.abspath(__file__))


        def log(stage):
            with open(os.environ["CALL_LOG"], "a") as f:
                f.write(stage + "\\n")


        def feat(row, idx):
            log("feat")
            scale = 1
            if row["x"] == 0:  # only the first file's shard reads the file, at run time
                with open(os.path.join(HERE, "..", "conf", "scale.txt")) as f:
                    scale = int(f.read())
            return {"y": row["x"] * scale, "i": idx}


        def keep(row):
            log("keep")
            return row["y"] % 3 != 0
        """,
    "dodo.py": """
        from hfbuild import Pipeline
        from pkg import t

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        feat = pipe.map("feat", raw, t.feat, with_indices=True)
        kept = pipe.filter("kept", feat, t.keep)


        def task_preprocess():
            yield from pipe.tasks()
        """,
}


def _sharded_project(repo: Repo, parts: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo.write(SHARDED)
    (repo.path / "data").mkdir(exist_ok=True)
    for i in range(parts):
        xs = list(range(10 * i, 10 * i + 10 + i))  # shards of different lengths
        pq.write_table(pa.table({"x": xs}), repo.path / "data" / f"part-{i}.parquet")
    repo.commit("sharded project")


BY_UNITS = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
from hfbuild.builds import shardunits
from hfbuild.builds.local import LocalExecutor
from hfbuild.builds.units import Unit


class Counting(LocalExecutor):
    def build_all(self, place, units, label):
        print("UNITS", json.dumps([label, [u.shard.label for u in units]]))
        return super().build_all(place, units, label)


pipe = dodo.pipe
for name in ("raw", "feat", "kept"):
    ms = pipe.manifests()
    m, spec = ms[name], pipe[name].spec
    if not pipe.store.has(m.fingerprint):
        with pipe.store.lock(m.static_fingerprint):
            unit = Unit(spec, m, {i: ms[i] for i in spec.inputs})
            shardunits.build(pipe.place, Counting(), unit)
    pipe.record(name)
    pipe.rekey()  # as build._done: the next stage's key holds this one's result
"""

READ = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
print(json.dumps({n: dodo.pipe.result(n).to_dict() for n in ("feat", "kept")}))
"""


def _run(repo: Repo, code: str, log: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """`code` run in the project in a process of its own (forked: `read_python`): it builds
    by units or reads results; its keys are compared with those of `doit` runs, fresh."""
    return read_python(code, repo.path, env={"CALL_LOG": str(log)})  # fails on an error


def _units(out: subprocess.CompletedProcess[str]) -> list[tuple[str, list[str]]]:
    import json

    lines = [x.removeprefix("UNITS ") for x in out.stdout.splitlines() if x.startswith("UNITS ")]
    return [(str(a), list(b)) for a, b in map(json.loads, lines)]


def _locked(repo: Repo) -> dict[str, Any]:
    import json

    stages = json.loads((repo.path / "hfbuild.lock").read_text())["stages"]
    return {s: (e["fingerprint"], e["content_hash"]) for s, e in stages.items()}


def test_shard_units_equal_a_sharded_build(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A sharded stage split into one unit per shard (load -> map with_indices -> filter)
    gets the keys, content hashes and rows of a local sharded build; a shard that read a
    file at run time makes the others be built again under the key holding it; after a
    file is appended, only its shards are units."""
    _sharded_project(repo, 3)
    by_units = repo.clone(tmp_path / "units")
    local = repo.clone(tmp_path / "local")
    out = _run(by_units, BY_UNITS, tmp_path / "u.log")
    labels = [f"data/part-{i}.parquet" for i in range(3)]
    assert _units(out) == [
        ("raw", labels),
        ("feat", labels),
        ("feat", labels[1:]),  # part-0's read conf/scale.txt: the others' keys now hold it
        ("kept", labels),
    ]
    no_remote = {"HFBUILD_NO_REMOTE": "1"}
    doit(local, "run", "preprocess", log=pathlib.Path(os.devnull), env=no_remote)
    assert _locked(by_units) == _locked(local)
    assert (
        _run(by_units, READ, tmp_path / "r.log").stdout
        == _run(local, READ, tmp_path / "r.log").stdout
    )

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [100, 101]}), repo.path / "data" / "part-3.parquet")
    repo.commit("part 3")
    for clone in (by_units, local):
        clone.git("pull", "-q", "--ff-only")
    again = _run(by_units, BY_UNITS, tmp_path / "u2.log")
    new = ["data/part-3.parquet"]
    assert _units(again) == [("raw", new), ("feat", new), ("kept", new)]
    doit(local, "run", "preprocess", log=pathlib.Path(os.devnull), env=no_remote)
    assert _locked(by_units) == _locked(local)


PREPARE = """
import json, os, shutil, sys, warnings
warnings.simplefilter("ignore")
import dodo
from hfbuild.builds import packbuild, raytree as rx, shardunits
from hfbuild.builds.stage import build
from hfbuild.builds.units import Unit
from hfbuild.store.remote import Remote

pipe = dodo.pipe
build(pipe, "raw")
remote = Remote(sys.argv[1])
ms = pipe.manifests()
out = {}
for name in ("raw", "feat"):
    m, spec = ms[name], pipe[name].spec
    s = m.shard_list[1 if name == "raw" else 2]  # not feat's input: that one is pushed
    via = ms["raw"].fingerprint if name == "feat" else None  # the input's list
    if via is not None:  # its packed input shard written out, as shardunits does for Ray
        packbuild.unpack(pipe.place, via, [s.input])
    offset = shardunits.row_offsets(pipe.place, spec, m, via).get(s.key, 0)
    unit = Unit(spec, m, {d: ms[d] for d in spec.inputs}, s, offset)
    for key in unit.input_keys:
        remote.push(pipe.store, key, "input")
    job, spec_bytes = rx.task_args(pipe, remote, unit)
    with rx.tree(pipe, rx.shipped_files(m, s)) as d:
        for copy in ("good", "bad"):
            shutil.copytree(d, os.path.join(sys.argv[2], name, copy))
    with open(os.path.join(sys.argv[2], name, "job.json"), "w") as f:
        json.dump(job, f)
    with open(os.path.join(sys.argv[2], name, "spec"), "wb") as f:
        f.write(spec_bytes)
    with open(os.path.join(sys.argv[2], name, "data"), "wb") as f:
        f.write(rx.shard_data(pipe, unit) or b"")
    out[name] = s.key
print(json.dumps(out))
"""

WORKER = """
import json, sys
from hfbuild.builds.rayworker import run_unit

with open(sys.argv[1]) as f:
    job = json.load(f)
with open(sys.argv[2], "rb") as f:
    spec = f.read()
with open(sys.argv[3], "rb") as f:
    data = f.read() or None
print(json.dumps(run_unit(job, spec, data), default=len))  # a sent entry's bytes: their size
"""


def _prepare(root: pathlib.Path, script: str, url: str, jobs: pathlib.Path) -> Any:
    """Run a job-preparing `script` as the driver, in a process of its own in the project at
    `root`; what it printed last, as JSON (the keys it computed). Forked from the driver
    server (`fork_python`), whose hash seed is not the workers' (`_worker`): keys that hung
    on the seed would differ between the two, as between fresh processes."""
    env = {**os.environ, "PYTHONPATH": str(root), "CALL_LOG": os.devnull}
    prep = fork_python(script, root, env, [url, str(jobs)], server="driver")
    return json.loads(prep.stdout.strip().splitlines()[-1])


def test_a_shard_task_recomputes_its_key_from_its_tree(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A shard's task (run here, in a process of its own in its shipped tree, as a Ray worker
    runs it) gets the stage's code as its tree and, for a load shard, its own data file's
    bytes; it refuses to build when what it received is not what the key names (a data
    file's bytes, a transform's code), publishing nothing, and otherwise publishes the shard
    under the driver's key, a `with_indices` shard with the indices of the whole split."""
    import json

    _sharded_project(repo, 3)
    clone = repo.clone(tmp_path / "clone")
    url = f"file://{tmp_path / 'remote'}"
    jobs = tmp_path / "jobs"
    keys = _prepare(clone.path, PREPARE, url, jobs)
    assert not (jobs / "raw" / "good" / "data").exists()
    data = (jobs / "raw" / "data").read_bytes()
    assert data == (clone.path / "data" / "part-1.parquet").read_bytes()
    with open(jobs / "feat" / "bad" / "pkg" / "t.py", "a") as f:
        f.write("# another version\n")

    def worker(name: str, tree: str, data: str = "data") -> dict[str, Any]:
        args = [str(jobs / name / n) for n in ("job.json", "spec", data)]
        lines = _worker(WORKER, jobs / name / tree, tmp_path / "worker" / tree, *args)
        got: dict[str, Any] = json.loads(lines[-1])
        return got

    remote = Remote(url)
    for name, why in (("raw", "its data file data/part-1.parquet is "), ("feat", "pkg/t.py")):
        (jobs / name / "other").write_bytes(data[:-1] + b"!" if name == "raw" else b"")
        bad = worker(name, "bad", "other")
        assert "the Ray worker computed the key" in bad["error"] and why in bad["error"]
        assert f"on node {socket.gethostname()}" in bad["error"]  # which node refused
        assert "\n" not in bad["error"]
        assert "Nothing was published" in bad["error"]
        assert not remote.has(keys[name])
        good = worker(name, "good")
        assert "fingerprint" in good, good
        assert good["fingerprint"] == keys[name] and remote.has(keys[name])
    fresh = Store(tmp_path / "fresh")
    remote.pull(fresh, keys["feat"], "feat")
    assert fresh.load(keys["feat"])["i"] == list(range(21, 33))  # after 10 + 11 rows


PREPARE_TASK = """
import json, os, shutil, sys, warnings
warnings.simplefilter("ignore")
import dodo
from hfbuild.builds import ray_executor, raytree
from hfbuild.builds.units import Unit
from hfbuild.store.remote import Remote

pipe = dodo.pipe
m, spec = pipe.manifests()["raw"], pipe["raw"].spec
units = [Unit(spec, m, {}, s, 0) for s in m.shard_list]
common, spec_bytes, parts, datas = ray_executor.shards_args(
    pipe.place, Remote(sys.argv[1]), units
)
with raytree.tree(pipe.place, raytree.shipped_files(m, units[0].shard)) as d:
    shutil.copytree(d, os.path.join(sys.argv[2], "tree"))
with open(os.path.join(sys.argv[2], "task.json"), "w") as f:
    json.dump({"job": common, "parts": parts}, f)
with open(os.path.join(sys.argv[2], "spec"), "wb") as f:
    f.write(spec_bytes)
for i, data in enumerate(datas):
    with open(os.path.join(sys.argv[2], f"data-{i}"), "wb") as f:
        f.write(data or b"")
print(json.dumps([u.key for u in units]))
"""

SHARDS_WORKER = """
import json, os, sys
from hfbuild.builds.rayworker import run_shards

with open(os.path.join(sys.argv[1], "task.json")) as f:
    task = json.load(f)
with open(os.path.join(sys.argv[1], "spec"), "rb") as f:
    spec = f.read()
datas = []
for i in range(len(task["parts"])):
    name = sys.argv[2] if str(i) == sys.argv[3] else f"data-{i}"
    with open(os.path.join(sys.argv[1], name), "rb") as f:
        datas.append(f.read())
for res in run_shards(task["job"], spec, task["parts"], datas):
    print(json.dumps({k: res[k] for k in ("fingerprint", "error") if k in res}))
"""


def _load_task(repo: Repo, tmp_path: pathlib.Path) -> tuple[list[str], pathlib.Path]:
    """The job of a task of the project's load shards, prepared in a clone (`PREPARE_TASK`):
    the shards' keys and the jobs directory (its tree, data files, job and spec)."""
    clone = repo.clone(tmp_path / "clone")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    return _prepare(clone.path, PREPARE_TASK, f"file://{tmp_path / 'remote'}", jobs), jobs


def _run_load_task(
    jobs: pathlib.Path, store: pathlib.Path, other: str = "", tampered: int = -1
) -> list[dict[str, Any]]:
    """Run the prepared task (`SHARDS_WORKER`) with the node store `store` (shard
    `tampered` given the file `other`); its results, one a shard."""
    return _run_task(SHARDS_WORKER, jobs, store, other, str(tampered))


def _worker(
    script: str, tree: pathlib.Path, store: pathlib.Path, *args: str, log: str = os.devnull
) -> list[str]:
    """`script` (with `args`) run as a Ray worker runs a task: in a process of its own in
    its shipped `tree` (not on the import path otherwise), with the node store `store`; the
    lines it printed. The process is forked from a server that imported `datasets` and
    hfbuild once (`fork_python`): no claim here is about a worker's start, and the driver's
    keys it is compared with come from the driver server (`_prepare`), another hash seed."""
    env = {**os.environ, "HFBUILD_STORE": str(store), "CALL_LOG": log}
    env.pop("PYTHONPATH", None)
    return fork_python(script, tree, env, list(args)).stdout.strip().splitlines()


def _run_task(
    script: str, jobs: pathlib.Path, store: pathlib.Path, *args: str, log: str = os.devnull
) -> list[Any]:
    """A task prepared in `jobs`, run by `script` in a process of its own in its shipped
    tree with the node store `store`, as a Ray worker runs it (`_worker`; its functions'
    calls logged to `log`); its results, a JSON line each."""
    lines = _worker(script, jobs / "tree", store, str(jobs), *args, log=log)
    return [json.loads(line) for line in lines]


def test_a_shards_task_keys_each_load_shard_from_its_own_bytes(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A coalesced task of load shards (run here, in a process of its own in its shipped tree, as
    a Ray worker runs it) computes the stage's manifest once and each shard's key from its
    own data file's bytes: every shard is published under the driver's key, and a shard
    after the first whose bytes are not what its key names is refused, naming its file,
    after the shards before it are published."""

    _sharded_project(repo, 3)
    keys, jobs = _load_task(repo, tmp_path)
    third = (jobs / "data-2").read_bytes()
    (jobs / "other").write_bytes(third[:-1] + b"!")
    bad = _run_load_task(jobs, tmp_path / "bad", "other", 2)
    assert [r.get("fingerprint") for r in bad[:2]] == keys[:2], bad
    assert len(bad) == 3 and "its data file data/part-2.parquet is " in bad[2]["error"]
    assert _run_load_task(jobs, tmp_path / "good") == [{"fingerprint": k} for k in keys]


def test_a_shards_task_keeps_apart_load_shards_of_one_file_name(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """Load shards of one task whose data files share a name (data/a/part.parquet,
    data/b/part.parquet) are each written into the task's scratch under that name, apart
    (the scratch is flat but for such a name): each is published under the driver's key
    with its own file's rows, not another's."""

    import pyarrow as pa
    import pyarrow.parquet as pq

    _sharded_project(repo, 0)
    dodo = (repo.path / "dodo.py").read_text()
    (repo.path / "dodo.py").write_text(dodo.replace("data/*.parquet", "data/*/part.parquet"))
    rows = {d: list(range(100 * i, 100 * i + 5 + i)) for i, d in enumerate("abc")}
    for d, xs in rows.items():
        (repo.path / "data" / d).mkdir(parents=True)
        pq.write_table(pa.table({"x": xs}), repo.path / "data" / d / "part.parquet")
    repo.commit("three files of one name")
    keys, jobs = _load_task(repo, tmp_path)
    got = _run_load_task(jobs, tmp_path / "worker")
    assert got == [{"fingerprint": k} for k in keys], got
    from hfbuild.keys import packs

    worker, pack = Store(tmp_path / "worker"), packs.pack_key(keys)  # loaded together
    table = worker.load(pack)
    spans = {key: (start, end) for key, start, end, _, _ in worker.read_manifest(pack)["pack"]}
    for key, xs in zip(keys, rows.values(), strict=True):
        start, end = spans[key]
        assert table[start:end]["x"] == xs


def test_a_shards_task_loads_with_the_features_datasets_gives_the_whole_load(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A task's load shards are loaded with the features datasets gives the whole load: the
    first data file's, made by the worker of that file's Arrow schema as the driver read and
    sent it (the file itself does not travel), its datasets metadata too (a class label
    stays one, not its integers), as a local load of the files gives them."""
    import datasets

    from hfbuild.keys import packs

    _sharded_project(repo, 0)
    feats = datasets.Features(
        {"x": datasets.Value("int64"), "c": datasets.ClassLabel(names=["no", "yes"])}
    )
    for i in range(3):
        rows = {"x": list(range(10 * i, 10 * i + 4)), "c": [0, 1, 1, 0]}
        ds = datasets.Dataset.from_dict(rows, features=feats)
        ds.to_parquet(str(repo.path / "data" / f"part-{i}.parquet"))
    repo.commit("files with datasets' features")
    keys, jobs = _load_task(repo, tmp_path)
    got = _run_load_task(jobs, tmp_path / "worker")
    assert got == [{"fingerprint": k} for k in keys], got
    whole = datasets.load_dataset(
        "parquet",
        data_files=sorted(str(f) for f in (tmp_path / "clone" / "data").iterdir()),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert whole.features == feats
    assert Store(tmp_path / "worker").load(packs.pack_key(keys)).features == feats


CHUNKS_WORKER = """
import json, os, sys
from hfbuild.builds import raypacks
from hfbuild.builds.rayworker import run_shards

raypacks.PACK_SHARDS = 1  # each shard a chunk of its own, pushed on its own thread
with open(os.path.join(sys.argv[1], "task.json")) as f:
    task = json.load(f)
with open(os.path.join(sys.argv[1], "spec"), "rb") as f:
    spec = f.read()
datas = []
for i in range(len(task["parts"])):
    with open(os.path.join(sys.argv[1], f"data-{i}"), "rb") as f:
        datas.append(f.read())
for res in run_shards(task["job"], spec, task["parts"], datas):
    print(json.dumps({"fingerprint": res.get("fingerprint"), "pack": res["pack"]["key"]}))
"""


def test_a_load_pack_over_a_tasks_chunks_is_pushed_once(
    repo: Repo,
    tmp_path: pathlib.Path,
    s3: Any,  # noqa: F811
) -> None:
    """A task's load shards built together are one pack, and its results are pushed in
    chunks, each on a thread of its own at once (here a chunk a shard): the pack is put
    once, each of its files and its manifest one request, none deleted, not once a chunk
    with the losers' uploads deleted."""
    from tests.test_remote import s3_requests

    _sharded_project(repo, 3)
    clone = repo.clone(tmp_path / "clone")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    keys = _prepare(clone.path, PREPARE_TASK, os.environ["HFBUILD_REMOTE"], jobs)
    # A fresh process, not `_worker`'s fork: fsspec reads FSSPEC_S3_ENDPOINT_URL (the s3
    # fixture's) when imported, and the fork server imported it before this test set it.
    env = {**os.environ, "HFBUILD_STORE": str(tmp_path / "worker"), "CALL_LOG": os.devnull}
    env.pop("PYTHONPATH", None)
    with s3_requests() as lines:
        out = subprocess.run(
            [sys.executable, "-c", CHUNKS_WORKER, str(jobs)],
            cwd=jobs / "tree",
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [r["fingerprint"] for r in results] == keys
    (pack,) = {r["pack"] for r in results}
    mine = [x.split()[0] for x in lines if f"/{pack}/" in x]
    assert mine.count("PUT") == 4, lines  # its three data files and its manifest
    assert not [x for x in lines if x.startswith(("DELETE", "POST"))], lines


PREPARE_PACKED = """
import json, os, shutil, sys, warnings
warnings.simplefilter("ignore")
import dodo
from hfbuild.builds import raytree as rx, shardunits
from hfbuild.builds.stage import build
from hfbuild.builds.units import Unit
from hfbuild.store.remote import Remote

pipe = dodo.pipe
build(pipe, "raw")  # its files loaded together: one pack
remote = Remote(sys.argv[1])
ms = pipe.manifests()
m, spec, via = ms["feat"], pipe["feat"].spec, ms["raw"].fingerprint
s = m.shard_list[2]
offset = shardunits.row_offsets(pipe.place, spec, m, via).get(s.key, 0)
unit = Unit(spec, m, {"raw": ms["raw"]}, s, offset)
job, spec_bytes = rx.task_args(pipe, remote, unit)
assert "input_pack" in job and not pipe.store.has(s.input), job
remote.push(pipe.store, job["input_pack"]["key"], "raw (pack)")  # as rayshare does
with rx.tree(pipe, rx.shipped_files(m, s)) as d:
    shutil.copytree(d, os.path.join(sys.argv[2], "tree"))
with open(os.path.join(sys.argv[2], "job.json"), "w") as f:
    json.dump(job, f)
with open(os.path.join(sys.argv[2], "spec"), "wb") as f:
    f.write(spec_bytes)
open(os.path.join(sys.argv[2], "data"), "wb").close()
build(pipe, "feat")  # here, for the content hash a local build gives the shard
pipe.rekey()
listed = pipe.store.read_manifest(pipe.manifests()["feat"].fingerprint)["shards"]
(h,) = [r[4]["content_hash"] for r in listed if r[2] == s.label]
print(json.dumps({"key": s.key, "input": s.input, "hash": h}))
"""


def test_a_map_shard_task_reads_its_input_shard_in_its_pack(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A map shard's task whose input shard is a row range of a pack (run here, in a process
    of its own in its shipped tree, as a Ray worker runs it) pulls the pack and reads the
    shard's rows from it in place: it publishes the shard under the driver's key with the
    content a local build gives it, and writes no entry of the input shard's own. A range
    whose hash is not the one the committed lock pins is refused, nothing published."""
    import json

    _sharded_project(repo, 3)
    clone = repo.clone(tmp_path / "clone")
    url = f"file://{tmp_path / 'remote'}"
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    got = _prepare(clone.path, PREPARE_PACKED, url, jobs)
    job = json.loads((jobs / "job.json").read_text())
    remote = Remote(url)

    def worker(store: str) -> dict[str, Any]:
        args = [str(jobs / n) for n in ("job.json", "spec", "data")]
        res: dict[str, Any] = json.loads(
            _worker(WORKER, jobs / "tree", tmp_path / store, *args)[-1]
        )
        return res

    pinned = {**job["pins"], got["input"]: ["f" * 32, "raw", True]}  # another hash
    (jobs / "job.json").write_text(json.dumps({**job, "pins": pinned}))
    bad = worker("bad")
    assert "with content hash" in bad["refused"] and "f" * 32 in bad["refused"], bad
    assert not remote.has(got["key"])
    (jobs / "job.json").write_text(json.dumps(job))
    good = worker("good")
    assert good.get("fingerprint") == got["key"], good
    assert not Store(tmp_path / "good").has(got["input"])  # read in its pack, not written out
    fresh = Store(tmp_path / "fresh")
    remote.pull(fresh, got["key"], "feat")
    assert (fresh.read_manifest(got["key"]) or {})["content_hash"] == got["hash"]
    assert fresh.load(got["key"])["i"] == list(range(21, 33))  # after 10 + 11 rows


PREPARE_MAPS = """
import json, os, shutil, sys, warnings
warnings.simplefilter("ignore")
import dodo
from hfbuild.builds import ray_executor, raytree as rx, shardunits
from hfbuild.builds.stage import build
from hfbuild.builds.units import Unit
from hfbuild.store.remote import Remote

pipe = dodo.pipe
build(pipe, "raw")  # its files loaded together: one pack
remote = Remote(sys.argv[1])
ms = pipe.manifests()
m, spec, via = ms["feat"], pipe["feat"].spec, ms["raw"].fingerprint
offsets = shardunits.row_offsets(pipe.place, spec, m, via)
units = [Unit(spec, m, {"raw": ms["raw"]}, s, offsets.get(s.key, 0)) for s in m.shard_list]
common, spec_bytes, parts, datas = ray_executor.shards_args(pipe.place, remote, units)
remote.push(pipe.store, parts[0]["input_pack"]["key"], "raw (pack)")  # as rayshare does
with rx.tree(pipe.place, rx.shipped_files(m, units[0].shard)) as d:
    shutil.copytree(d, os.path.join(sys.argv[2], "tree"))
with open(os.path.join(sys.argv[2], "task.json"), "w") as f:
    json.dump({"job": common, "parts": parts}, f)
with open(os.path.join(sys.argv[2], "spec"), "wb") as f:
    f.write(spec_bytes)
driver = [u.key for u in units]
try:
    build(pipe, "feat")  # here, for the keys and content hashes a local build gives
except Exception:  # a failing transform: none
    print(json.dumps({"driver": driver, "local": []}))
    sys.exit(0)
pipe.rekey()
listed = pipe.store.read_manifest(pipe.manifests()["feat"].fingerprint)["shards"]
print(json.dumps({"driver": driver, "local": [[r[1], r[4]["content_hash"]] for r in listed]}))
"""

MAPS_WORKER = """
import json, os, sys
from hfbuild.builds.rayworker import run_shards

with open(os.path.join(sys.argv[1], "task.json")) as f:
    task = json.load(f)
with open(os.path.join(sys.argv[1], "spec"), "rb") as f:
    spec = f.read()
for res in run_shards(task["job"], spec, task["parts"], [None] * len(task["parts"])):
    pack = res.get("pack") or {}
    out = {k: res.get(k) for k in ("fingerprint", "observed", "error")}
    print(json.dumps({**out, "pack": pack.get("key")}))
"""


def _run_map_task(
    tmp_path: pathlib.Path, jobs: pathlib.Path, script: str = MAPS_WORKER, log: str = os.devnull
) -> list[dict[str, Any]]:
    """The task `PREPARE_MAPS` wrote to `jobs`, run with the node store `tmp_path /
    "worker"` (`_run_task`); its results."""
    return _run_task(script, jobs, tmp_path / "worker", log=log)


def test_a_tasks_map_shards_are_keyed_with_what_any_of_their_builds_read(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A task's map shards (run here, in a process of its own in its shipped tree, as a Ray
    worker runs it) are built together, and a later shard's build (the second's: its rows
    hold 20) reads a file the driver's keys lack (no build recorded it yet; the tree holds
    it here): every shard is published under the key with that file, the first too (its
    result written under it, not built again: it did not read the file), as a local
    sharded build publishes them, with the local build's content hashes, the three in one
    pack on the remote that names none of the keys they were built under."""

    from hfbuild.builds import packbuild

    later = SHARDED["pkg/t.py"].replace('row["x"] == 0', 'row["x"] == 20')  # files 1 and 2
    _sharded_project(repo, 3)
    repo.write({"pkg/t.py": later})
    repo.commit("the read in a later shard")
    clone = repo.clone(tmp_path / "clone")
    url = f"file://{tmp_path / 'remote'}"
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    got = _prepare(clone.path, PREPARE_MAPS, url, jobs)
    # The file is in the tree (a Ray tree holds what the keys name: here, as if it held
    # more), so the build reads it there.
    (jobs / "tree" / "conf").mkdir()
    (jobs / "tree" / "conf" / "scale.txt").write_text("5\n")
    local = [k for k, _ in got["local"]]
    assert not set(local) & set(got["driver"])  # the local build's keys hold the file read
    log = tmp_path / "calls.log"
    results = _run_map_task(tmp_path, jobs, log=str(log))
    assert [r["fingerprint"] for r in results] == local, results
    assert all("conf/scale.txt" in r["observed"] for r in results), results
    assert log.read_text().split() == ["feat"] * 33  # each row once: 10 + 11 + 12
    (pack,) = {r["pack"] for r in results}
    fresh = Store(tmp_path / "fresh")
    Remote(url).pull(fresh, pack, "feat (pack)")
    hashes = [(packbuild.packed(fresh, pack, k) or {}).get("content_hash") for k in local]
    assert hashes == [h for _, h in got["local"]]
    files = pathlib.Path(fresh.data_path(pack)).rglob("*")
    held = b"".join(p.read_bytes() for p in files if p.is_file())
    assert not [k for k in got["driver"] if k.encode() in held]


def test_a_tasks_map_shard_failing_is_named_by_its_file_after_those_before(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A task's map shards built together, the third one's function failing: the two
    before it are published (each then built by itself) and the third's error names its
    file, as a task building its shards one by one answers."""

    failing = (
        SHARDED["pkg/t.py"]
        .replace('row["x"] == 0', "False")  # no run-time read: the tree lacks conf/
        .replace('return {"y"', 'assert row["x"] != 25, "no 25"\n            return {"y"')
    )
    _sharded_project(repo, 3)
    repo.write({"pkg/t.py": failing})
    repo.commit("a failing shard")
    clone = repo.clone(tmp_path / "clone")
    url = f"file://{tmp_path / 'remote'}"
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    got = _prepare(clone.path, PREPARE_MAPS, url, jobs)
    assert got["local"] == []  # it fails locally too
    results = _run_map_task(tmp_path, jobs)
    assert len(results) == 3 and all(r["fingerprint"] for r in results[:2]), results
    error = results[2]["error"]
    assert "data/part-2.parquet" in error and "no 25" in error, error
    assert Remote(url).has(results[1]["fingerprint"]) or results[1]["pack"]


def test_a_retried_map_task_finds_the_pack_its_first_attempt_published(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A task's map shards built together are one pack in the node's store; the task run
    again on that node (Ray's retry after its worker died once the pack was published)
    finds the pack and answers the same results, under the keys a local build gives."""

    _sharded_project(repo, 3)
    repo.write({"pkg/t.py": SHARDED["pkg/t.py"].replace('row["x"] == 0', "False")})
    repo.commit("no run-time read")
    clone = repo.clone(tmp_path / "clone")
    url = f"file://{tmp_path / 'remote'}"
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    got = _prepare(clone.path, PREPARE_MAPS, url, jobs)

    def attempt() -> list[dict[str, Any]]:
        return _run_map_task(tmp_path, jobs)

    first = attempt()
    assert [r["fingerprint"] for r in first] == got["driver"] == [k for k, _ in got["local"]]
    assert len({r["pack"] for r in first}) == 1, first
    assert attempt() == first


def test_a_tasks_map_shards_listing_a_folder_the_tree_lacks_are_all_sent_again(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A task's map shards built together, a later one's build listing a project folder
    its tree does not hold with its names (a first build of code that lists it): nothing
    is published, and every shard of the task is answered "unlisted" with that folder, for
    the driver to send them again with it."""

    _sharded_project(repo, 3)
    indent = " " * 16
    listing = f'if row["x"] == 20:\n{indent}os.listdir(os.path.join(HERE, "..", "conf"))\n'
    lister = SHARDED["pkg/t.py"].replace('if row["x"] == 0:', listing + indent[4:] + "if False:")
    repo.write({"pkg/t.py": lister})
    repo.commit("a later shard lists conf/")
    clone = repo.clone(tmp_path / "clone")
    url = f"file://{tmp_path / 'remote'}"
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    got = _prepare(clone.path, PREPARE_MAPS, url, jobs)
    script = MAPS_WORKER.replace('"observed", "error"', '"unlisted", "error"')
    results = _run_map_task(tmp_path, jobs, script)
    assert len(results) == 3 and all(r["unlisted"] for r in results), results
    assert not any(r["fingerprint"] for r in results), results
    worker = Store(tmp_path / "worker")
    assert not any(worker.has(k) for k in got["driver"])  # nothing published


ENV_OF = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
from hfbuild.builds.raytree import task_env as _env

m = dodo.pipe.manifests()["feat"]
print(json.dumps({"key": [n for n, _ in m.doc["env"]], "shipped": _env(dodo.pipe, m)}))
"""


def test_secret_variables_never_travel_to_the_cluster(repo: Repo) -> None:
    """The variables a Ray task carries are those the stage's code reads, with the driver's
    values, except a secret-looking one: its (hashed) value is in the key, its clear value
    stays on the driver."""
    import json

    repo.write(
        {
            "pkg/__init__.py": "",
            "pkg/t.py": """
                import os

                def feat(batch):
                    scale = int(os.environ.get("SCALE", "1"))
                    assert os.environ.get("API_TOKEN") is not None
                    return {"y": [x * scale for x in batch["x"]]}
                """,
            "dodo.py": """
                from hfbuild import Pipeline
                from pkg import t

                pipe = Pipeline()
                raw = pipe.load("raw", "json", data_files="d.jsonl", split="train")
                feat = pipe.map("feat", raw, t.feat, batched=True)
                """,
            "d.jsonl": '{"x": 1}\n',
        }
    )
    repo.commit("env project")
    out = subprocess.run(
        [sys.executable, "-c", ENV_OF],
        cwd=repo.path,
        env={**os.environ, "PYTHONPATH": str(repo.path), "SCALE": "3", "API_TOKEN": "s3cr3t"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["key"] == ["API_TOKEN", "SCALE"]
    assert got["shipped"] == {"SCALE": "3"}
    assert "s3cr3t" not in out.stdout


def test_a_unit_is_sent_again_with_the_folders_its_worker_missed_once(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A unit whose Ray worker listed folders its tree lacked is sent again with those
    listings in its key, as a recorded listing is (the digest of the folder's names here:
    the root's too), a shard unit with its shard's key under them. A folder it was already
    sent with, missed again, is an error saying what to do: never another round."""
    from hfbuild import Pipeline
    from hfbuild.builds.raytree import with_listings
    from hfbuild.builds.units import Unit
    from hfbuild.core.errors import BuildError
    from hfbuild.core.spec import StageSpec
    from hfbuild.keys.fullkey import listing, listing_id
    from hfbuild.keys.manifest import Manifest, ShardIn

    repo.write({"shelf/one.csv": "x\n1\n", "shelf/two.csv": "x\n2\n", "top.txt": "t\n"})
    repo.commit("a shelf")
    place = Pipeline(tmp_path / "store", root=repo.path).place
    spec = StageSpec("shelved", "map", ("raw",))
    m = Manifest({"stage": "shelved"}, shards=(ShardIn("train", "in0", "a"),), shard_code="code")
    unit = Unit(spec, m, {}, m.shard_list[0])
    again = with_listings(place, unit, [".", "shelf/."], ["shelf/."])
    assert dict(again.manifest.observed) == {
        ".": listing_id(listing(str(repo.path))),
        "shelf/.": listing_id(["one.csv", "two.csv"]),
    }
    assert again.shard is not None and again.shard == again.manifest.shard_list[0]
    assert again.key != unit.key  # the shard's key holds the listings
    with pytest.raises(BuildError, match=r"found shelf missing .*--executor local"):
        with_listings(place, again, ["shelf/."], ["shelf/."])


def test_a_ray_tree_lists_the_root_and_a_listed_folder_as_the_key_holds_them(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """The tree a unit travels with, its key holding listings of the project's root and of
    shelf/: each lists there exactly the names the key stands for, the root's files with
    their bytes, its folders empty but for the files the key names. A listed folder holding
    a broken link, which cannot travel as it is, is refused with what to do. Packed, the
    tree is the same bytes each time (its digest names it on a node), a .rayignore in it
    dropping nothing."""
    from hfbuild import Pipeline
    from hfbuild.builds import raytree
    from hfbuild.keys.fullkey import identify, listing
    from hfbuild.source.gitstate import Snapshot

    repo.write(
        {"shelf/one.csv": "x\n1\n", "top.csv": "x\n7\n", "pkg/m.py": "X = 1\n", "pkg/n.py": ""}
    )
    repo.commit("a project")
    place = Pipeline(tmp_path / "store", root=repo.path).place

    def files(*paths: str) -> list[tuple[str, str]]:
        snap = Snapshot(place.root)
        return [*identify(paths, snap, place.stat_cache), ("pkg/m.py", snap.file_id("pkg/m.py").id)]

    with raytree.tree(place, files(".", "shelf/.")) as d:
        top = pathlib.Path(d)
        assert listing(d) == listing(str(repo.path)) == ["pkg", "shelf", "top.csv"]
        assert sorted(os.listdir(d)) == ["pkg", "shelf", "top.csv"]
        assert (top / "top.csv").read_text() == "x\n7\n"
        assert listing(str(top / "shelf")) == ["one.csv"]
        assert os.listdir(top / "pkg") == ["m.py"]  # named by the root, not listed itself
    (repo.path / "shelf" / "gone").symlink_to("nowhere")
    broken = pytest.raises(ConfigError, match=r"folder shelf .*\(gone: .*--executor local")
    with broken, raytree.tree(place, files("shelf/.")):
        pass
    (repo.path / "shelf" / "gone").unlink()
    (repo.path / "shelf" / ".rayignore").write_text("*.csv\n")
    name, packed = raytree.pack(place, files(".", "shelf/."))
    assert raytree.pack(place, files(".", "shelf/.")) == (name, packed)
    with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
        names = tar.getnames()
    assert {"shelf/one.csv", "shelf/.rayignore", "top.csv", "pkg/m.py"} <= set(names)


LISTING = {
    "pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["CALL_LOG"]\n',
    "pkg/__init__.py": "",
    "pkg/shelf.py": """
        import os
        import pathlib

        ROOT = pathlib.Path(__file__).resolve().parent.parent


        def names(batch):
            with open(os.environ["CALL_LOG"], "a") as f:
                f.write("shelved\\n")
            found = ",".join(sorted(os.listdir(ROOT / "shelf")))  # a listing at run time
            return {"names": [found] * len(batch["x"])}
        """,
    "shelf/one.csv": "x\n1\n",
    "dodo.py": """
        from hfbuild import Pipeline
        from pkg import shelf

        pipe = Pipeline()
        raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
        pipe.map("shelved", raw, shelf.names, batched=True)


        def task_preprocess():
            yield from pipe.tasks()
        """,
}

PREPARE_WHOLE = """
import json, os, shutil, sys, warnings
warnings.simplefilter("ignore")
import dodo
from hfbuild.builds import raytree as rx
from hfbuild.builds.units import Unit
from hfbuild.store.remote import Remote

pipe = dodo.pipe
remote = Remote(sys.argv[1])
ms = pipe.manifests()
m, spec = ms["shelved"], pipe["shelved"].spec
unit = Unit(spec, m, {d: ms[d] for d in spec.inputs})
for key in unit.input_keys:
    remote.push(pipe.store, key, "input")
job, spec_bytes = rx.task_args(pipe, remote, unit)
with rx.tree(pipe, rx.shipped_files(m)) as d:
    shutil.copytree(d, os.path.join(sys.argv[2], "tree"))
with open(os.path.join(sys.argv[2], "job.json"), "w") as f:
    json.dump(job, f)
with open(os.path.join(sys.argv[2], "spec"), "wb") as f:
    f.write(spec_bytes)
print(json.dumps({"key": m.fingerprint, "observed": [p for p, _ in m.observed]}))
"""


def test_a_whole_stage_task_builds_once_under_the_reads_the_drivers_key_assumes(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A whole (batched) stage whose builds list a folder, sent to a node whose store has no
    record of that (another node built it last time, or none did): the task builds it under
    the reads the driver's key assumes (identified in its own tree), so its function runs
    once and the entry is published under the driver's key; not built, found to list the
    folder, and built again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo.write(LISTING)
    (repo.path / "data").mkdir()
    for part in range(2):  # a sharded input: the stage is built from its batches' units
        xs = list(range(20 * part, 20 * part + 20))
        pq.write_table(pa.table({"x": xs}), repo.path / "data" / f"part-{part}.parquet")
    repo.commit("project")
    doit(repo, "run", "preprocess", log=tmp_path / "first.log")  # the driver's record
    repo.write({"shelf/two.csv": "x\n22\n"}, commit="a file added to the listed folder")
    url = f"file://{tmp_path / 'remote'}"
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    driver = _prepare(repo.path, PREPARE_WHOLE, url, jobs)
    assert driver["observed"] == ["shelf/."]  # the key assumes the listing
    log = tmp_path / "worker.log"
    args = [str(jobs / "job.json"), str(jobs / "spec"), os.devnull]
    lines = _worker(WORKER, jobs / "tree", tmp_path / "node-store", *args, log=str(log))
    got = json.loads(lines[-1])
    assert got.get("fingerprint") == driver["key"], got
    assert log.read_text().split() == ["shelved"]  # one batch, built once
    fresh = Store(tmp_path / "fresh")
    Remote(url).pull(fresh, driver["key"], "shelved")
    assert set(fresh.load(driver["key"])["names"]) == {"one.csv,two.csv"}


def test_a_shard_task_reading_a_file_its_key_lacks_writes_it_under_the_grown_key(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A map shard's task (run here, in a process of its own in its shipped tree, as a Ray
    worker runs it) whose build reads a file the driver's key lacks publishes the shard
    under the key with that file, its files holding that key where datasets writes it
    (its Arrow schema, `state.json`), the bytes the local build wrote under it, and not
    the driver's key it was built under (they held it)."""
    later = SHARDED["pkg/t.py"].replace('row["x"] == 0', 'row["x"] == 20')  # the third file
    _sharded_project(repo, 3)
    repo.write({"pkg/t.py": later})
    repo.commit("the read in the third file's shard")
    clone = repo.clone(tmp_path / "clone")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    got = _prepare(clone.path, PREPARE_PACKED, f"file://{tmp_path / 'remote'}", jobs)
    (jobs / "tree" / "conf").mkdir()  # the tree holds the file (as if it held more)
    (jobs / "tree" / "conf" / "scale.txt").write_text("5\n")
    args = [str(jobs / n) for n in ("job.json", "spec", "data")]
    key = json.loads(_worker(WORKER, jobs / "tree", tmp_path / "node", *args)[-1])["fingerprint"]
    assert key != got["key"]

    def files(store: Store) -> dict[str, bytes]:
        base = pathlib.Path(store.data_path(key))
        return {str(p.relative_to(base)): p.read_bytes() for p in base.rglob("*") if p.is_file()}

    node = files(Store(tmp_path / "node"))
    assert node == files(Store(clone.path / ".hfbuild")) and node
    assert not [n for n, b in node.items() if got["key"].encode() in b]
