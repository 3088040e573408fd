"""Datasets from the Hugging Face Hub as inputs (issue #22 items 1-4), tested without a network:
a local Hub cache laid out as huggingface_hub lays it out (`refs/`, `snapshots/<commit>/`,
`blobs/<etag>`, checked by huggingface_hub's own `try_to_load_from_cache` and
`scan_cache_dir`), made in commits here, read with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import textwrap
from typing import Any

import pytest

from tests.helpers import Repo, run_hfbuild, run_python
from tests.pipeline_project import calls, doit
from tests.shard_project import FILES

REPO_ID = "org/name"


def _parquet(name: str, start: int, rows: int = 10) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    xs = list(range(start, start + rows))
    buf = io.BytesIO()
    pq.write_table(pa.table({"x": xs, "f": [name] * rows}), buf)
    return buf.getvalue()


class HubCache:
    """A dataset repository in the local Hub cache, as `hf_hub_download` leaves it: each file
    a relative link from `snapshots/<commit>/<path>` to `blobs/<etag>` (the LFS sha256 of a
    parquet file, the git blob id of a small one), `refs/main` the branch's commit."""

    def __init__(self, hub: pathlib.Path, repo_id: str = REPO_ID) -> None:
        self.root = hub / ("datasets--" + repo_id.replace("/", "--"))
        self.files: dict[str, bytes] = {}
        self.commits: list[str] = []

    @staticmethod
    def etag(name: str, data: bytes) -> str:
        if name.endswith(".parquet"):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def commit(self, changes: dict[str, bytes], ref: str = "main") -> str:
        """A new commit of the repository with `changes`, fully downloaded, `ref` moved."""
        self.files.update(changes)
        listing = json.dumps(
            [len(self.commits), sorted((n, self.etag(n, d)) for n, d in self.files.items())]
        )
        commit = hashlib.sha1(listing.encode()).hexdigest()
        for name, data in self.files.items():
            blob = self.root / "blobs" / self.etag(name, data)
            blob.parent.mkdir(parents=True, exist_ok=True)
            if not blob.exists():  # as huggingface_hub: a blob is downloaded once
                blob.write_bytes(data)
            link = self.root / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (self.root / "refs").mkdir(parents=True, exist_ok=True)
        (self.root / "refs" / ref).write_text(commit)
        self.commits.append(commit)
        return commit

    def snapshot(self, commit: str) -> pathlib.Path:
        return self.root / "snapshots" / commit


def _hub_dir() -> pathlib.Path:
    return pathlib.Path(os.environ["HF_HOME"]) / "hub"


DODO = """
    from hfbuild import Pipeline
    from pkg import t

    pipe = Pipeline()
    raw = pipe.load("raw", "org/name", revision="main", data_files="data/*.parquet", split="train")
    feat = pipe.map("feat", raw, t.feat)
    PINNED


    def task_preprocess():
        yield from pipe.tasks()
    """


def _project(repo: Repo, pinned: str = "") -> Repo:
    files = {k: v for k, v in FILES.items() if k != "dodo.py"}
    files["dodo.py"] = DODO.replace("PINNED", pinned)
    repo.write(files, commit="project")
    return repo


def _two_part_hub() -> HubCache:
    hub = HubCache(_hub_dir())
    hub.commit(
        {
            "README.md": b"# org/name\n\nTwo parts.\n",
            ".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n",
            "data/part-0.parquet": _parquet("part-0", 0),
            "data/part-1.parquet": _parquet("part-1", 100),
        }
    )
    return hub


READ = """
import json, sys, warnings
warnings.simplefilter("ignore")
import dodo
out = {}
for name in sys.argv[1:]:
    ds = dodo.pipe.result(name)
    out[name] = {"rows": ds.to_dict(), "features": ds.features.to_dict()}
print(json.dumps(out))
"""

PLAIN = """
import json, sys
import datasets
ds = datasets.load_dataset(sys.argv[1], data_files="data/*.parquet", split="train")
print(json.dumps({"rows": ds.to_dict(), "features": ds.features.to_dict()}))
"""


def _results(repo: Repo, *names: str) -> dict[str, Any]:
    out = run_python(READ, repo.path, args=list(names))
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _plain(snapshot: pathlib.Path, tmp: pathlib.Path) -> dict[str, Any]:
    """Plain datasets on the commit's files, in a fresh process with an empty datasets cache
    (the local loader of the snapshot directory: datasets' own pattern resolution, README
    card and parquet builder)."""
    env = {"HF_DATASETS_CACHE": str(tmp / "plain-cache")}
    out = run_python(PLAIN, tmp, env=env, args=[str(snapshot)])
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _built(repo: Repo, tmp_path: pathlib.Path) -> tuple[HubCache, pathlib.Path]:
    """The two-file Hub dataset, the project reading its main, built; the call log."""
    hub = _two_part_hub()
    _project(repo)
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    return hub, log


def _lock(repo: Repo) -> dict[str, Any]:
    stages: dict[str, Any] = json.loads((repo.path / "hfbuild.lock").read_text())["stages"]
    return stages


def test_the_cache_made_here_is_huggingface_hubs_layout(tmp_path: pathlib.Path) -> None:
    """The test cache is what huggingface_hub itself reads offline."""
    hub = _two_part_hub()
    out = run_python(
        """
        import json
        from huggingface_hub import hf_hub_download, scan_cache_dir, try_to_load_from_cache
        a = try_to_load_from_cache("org/name", "data/part-1.parquet", repo_type="dataset")
        b = hf_hub_download("org/name", "README.md", repo_type="dataset", local_files_only=True)
        info = scan_cache_dir()
        repos = [(r.repo_id, r.repo_type, [x.commit_hash for x in r.revisions]) for r in info.repos]
        print(json.dumps([a, b, repos, [str(w) for w in info.warnings]]))
        """,
        tmp_path,
    )
    a, b, repos, warns = json.loads(out.stdout.strip().splitlines()[-1])
    snap = hub.snapshot(hub.commits[0])
    assert a == str(snap / "data" / "part-1.parquet")
    assert b == str(snap / "README.md")
    assert repos == [["org/name", "dataset", [hub.commits[0]]]]
    assert warns == []


def test_hub_stage_builds_offline_and_equals_plain_load_dataset(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    hub = _two_part_hub()
    first = hub.commits[0]
    pinned = f'pipe.load("pinned", "parquet", data_files="hf://datasets/org/name@{first}/data/*",'
    pinned += ' split="train")'
    _project(repo, pinned)
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    got = _results(repo, "raw", "pinned")
    plain = _plain(hub.snapshot(first), tmp_path)
    assert got["raw"] == plain
    assert got["pinned"] == plain  # the hf:// form, pinned to a commit, reads the same
    lock = _lock(repo)
    assert lock["raw"]["hub"] == [{"repo": REPO_ID, "revision": "main", "commit": first}]
    assert lock["pinned"]["hub"] == [{"repo": REPO_ID, "revision": first, "commit": first}]
    # Keyed by the Hub's content ids, named without any revision; two shards (one per file).
    files = lock["raw"]["manifest"]["data"]["files"]
    assert files == [
        [f"hf://datasets/org/name/data/part-{i}.parquet", hub.etag("x.parquet", d)]
        for i, d in enumerate([hub.files["data/part-0.parquet"], hub.files["data/part-1.parquet"]])
    ]
    # `hfbuild graph` says where each load came from, with the commit it resolved to.
    graph = json.loads(run_hfbuild(repo, "graph", "--format", "json").stdout)
    origins = {n["stage"]: n["origin"] for n in graph["stages"]}
    assert origins["raw"] == [
        "parquet hf://datasets/org/name@main/data/*.parquet (2 files)",
        f"org/name@main: commit {first[:12]}",
    ]
    assert origins["pinned"][-1] == f"org/name commit {first[:12]}"
    assert "main" not in json.dumps(lock["raw"]["manifest"])
    assert first not in json.dumps(lock["raw"]["manifest"])
    assert len(lock["raw"]["shard_hashes"]) == 2
    assert sorted(calls(log)) == ["feat:part-0", "feat:part-1"]


def test_moved_main_with_one_added_file_rebuilds_one_shard(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    hub, log = _built(repo, tmp_path)
    old = hub.commits[0]
    new = hub.commit({"data/part-2.parquet": _parquet("part-2", 200)})
    status = run_hfbuild(repo, "status")
    assert f"revision main of org/name now resolves to {new[:12]}: was {old[:12]}" in status.stdout
    explain = run_hfbuild(repo, "explain", "raw")
    assert "now resolves to" in explain.stdout
    assert "data/part-2.parquet" in explain.stdout, explain.stdout
    log.unlink(missing_ok=True)
    out = doit(repo, "run", "preprocess", log=log)
    assert sorted(calls(log)) == ["feat:part-2"], out.stdout + out.stderr
    assert "built 1 of 3 shards" in out.stdout + out.stderr
    assert _results(repo, "feat")["feat"]["rows"]["f"].count("part-2") == 10
    assert _results(repo, "raw")["raw"] == _plain(hub.snapshot(new), tmp_path)
    assert _lock(repo)["raw"]["hub"][0]["commit"] == new


def test_readme_only_commit_rebuilds_nothing_and_moves_the_locked_commit(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    hub, log = _built(repo, tmp_path)
    before = _lock(repo)
    new = hub.commit({"README.md": b"# org/name\n\nTwo parts, better described.\n"})
    assert run_hfbuild(repo, "status").stdout.count("up to date") == 2
    log.unlink(missing_ok=True)
    doit(repo, "run", "preprocess", log=log)
    assert calls(log) == {}
    after = _lock(repo)
    assert after["raw"]["hub"] == [{"repo": REPO_ID, "revision": "main", "commit": new}]
    for stage in ("raw", "feat"):
        assert after[stage]["fingerprint"] == before[stage]["fingerprint"]


def test_a_commit_the_cache_lacks_is_a_clear_error(repo: Repo, tmp_path: pathlib.Path) -> None:
    hub = _two_part_hub()
    _project(repo)
    gone = "ab" * 20
    (hub.root / "refs" / "main").write_text(gone)  # main moved, its files never fetched
    out = run_hfbuild(repo, "status")
    assert out.returncode == 1
    text = out.stdout + out.stderr
    assert f"commit {gone} of the Hub dataset org/name (revision 'main')" in text, text
    assert f"huggingface-cli download org/name --repo-type dataset --revision {gone}" in text
    assert "Traceback" not in text
    # A revision the cache never saw: the same advice, for that revision.
    (hub.root / "refs" / "main").unlink()
    text = run_hfbuild(repo, "status").stdout + run_hfbuild(repo, "status").stderr
    assert "revision 'main' of the Hub dataset org/name is not in the local Hub cache" in text
    assert "--revision main" in text


def test_verify_without_the_data_passes_from_metadata(repo: Repo, tmp_path: pathlib.Path) -> None:
    """`hfbuild verify` in a clone without the store or the Hub files' content: the keys come
    from the cache's metadata (the snapshot's links), never from reading the files."""
    hub = _two_part_hub()
    _project(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    repo.commit("lock")
    for name, data in hub.files.items():  # the data is gone; the links and the card remain
        if name.endswith(".parquet"):
            (hub.root / "blobs" / hub.etag(name, data)).unlink()
    clone = repo.clone(tmp_path / "clone")
    out = run_hfbuild(clone, "verify")
    assert out.returncode == 0, out.stdout + out.stderr
    # and a lock that disagrees is caught by the same metadata (a file of main changed)
    hub.files.pop("data/part-1.parquet")
    hub.commit({"data/part-1.parquet": _parquet("part-1", 999)})
    out = run_hfbuild(clone, "verify")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "hf://datasets/org/name/data/part-1.parquet" in out.stdout + out.stderr


@pytest.mark.parametrize("form", ["repo", "url"])
def test_the_token_never_appears(
    repo: Repo, tmp_path: pathlib.Path, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "hf_secretTOKENdoNotLeak1234567890"
    monkeypatch.setenv("HF_TOKEN", token)
    hub = _two_part_hub()
    pinned = (
        'pipe.load("pinned", "parquet", data_files="hf://datasets/org/name/data/*.parquet")'
        if form == "url"
        else ""
    )
    _project(repo, pinned)
    out = doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    texts = [out.stdout, out.stderr]
    hub.commit({"data/part-2.parquet": _parquet("part-2", 200)})  # main moved: a stale stage
    for args in (["status"], ["explain", "raw"]):
        got = run_hfbuild(repo, *args)
        texts += [got.stdout, got.stderr]
    out = doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    texts += [out.stdout, out.stderr]
    for args in (["verify"], ["lock"], ["status"]):
        got = run_hfbuild(repo, *args)
        texts += [got.stdout, got.stderr]
    lock = (repo.path / "hfbuild.lock").read_text()
    assert hub.commits[-1] in lock
    texts.append(lock)
    for p in (repo.path / ".hfbuild").rglob("*"):
        if p.is_file():
            texts.append(p.read_bytes().decode("utf-8", "replace"))
    assert any("org/name" in t for t in texts)
    assert not [t for t in texts if token in t]


def test_a_local_pattern_among_hub_ones_is_refused(repo: Repo, tmp_path: pathlib.Path) -> None:
    _two_part_hub()
    _project(
        repo,
        'pipe.load("mixed", "parquet", data_files=["hf://datasets/org/name/data/*", "x/*"])',
    )
    got = run_hfbuild(repo, "status")
    text = got.stdout + got.stderr
    assert "'x/*' is a local path among Hub paths" in text, text


def test_split_dict_of_hub_patterns_equals_plain(repo: Repo, tmp_path: pathlib.Path) -> None:
    """Hub patterns per split, with `?` and `[...]`, in a non-sorted split order: the same
    DatasetDict as plain datasets gives for the same patterns over the commit's files."""
    hub = _two_part_hub()
    hub.commit({"data/part-2.parquet": _parquet("part-2", 200)})
    files = '{"train": ["data/part-[02].parquet"], "test": "data/part-?.parquet"}'
    stage = f'pipe.load("splits", "org/name", data_files={files})'
    _project(repo, stage)
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    got = run_python(
        """
        import json, warnings
        warnings.simplefilter("ignore")
        import dodo
        d = dodo.pipe.result("splits")
        print(json.dumps({s: d[s].to_dict() for s in d}))
        """,
        repo.path,
    )
    plain = run_python(
        f"""
        import json, sys
        import datasets
        d = datasets.load_dataset(sys.argv[1], data_files={files})
        print(json.dumps({{s: d[s].to_dict() for s in d}}))
        """,
        tmp_path,
        env={"HF_DATASETS_CACHE": str(tmp_path / "plain-cache")},
        args=[str(hub.snapshot(hub.commits[-1]))],
    )
    ours = got.stdout.strip().splitlines()[-1]
    assert ours == plain.stdout.strip().splitlines()[-1]
    assert list(json.loads(ours)) == ["train", "test"]
    assert json.loads(ours)["train"]["f"] == ["part-0"] * 10 + ["part-2"] * 10


def test_a_build_whose_hub_blob_is_gone_says_what_to_do(repo: Repo, tmp_path: pathlib.Path) -> None:
    """The key needs only the cache's metadata, a build the files: offline, a file the
    snapshot names but whose blob is gone is an error naming the command that fetches it."""
    hub = _two_part_hub()
    _project(repo)
    (hub.root / "blobs" / hub.etag("x.parquet", hub.files["data/part-1.parquet"])).unlink()
    out = doit(repo, "run", "preprocess", log=tmp_path / "calls.log", check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "hf://datasets/org/name/data/part-1.parquet at commit" in text, text
    assert f"--revision {hub.commits[0]}" in text
    assert "Traceback" not in text


def test_patterns_that_match_nothing_or_are_malformed_and_a_cache_without_links(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    hub = _two_part_hub()
    stages = """
    deep = pipe.load("deep", "org/name", data_files="**/*.parquet")
    none = pipe.load("none", "parquet", data_files="hf://datasets/org/name@main/x/*.parquet")
    bad = pipe.load("bad", "parquet", data_files="hf://datasets/org-only/a.parquet")
    """
    _project(repo, textwrap.dedent(stages).replace("\n", "\n    "))
    got = run_hfbuild(repo, "status")
    lines = {ln.split()[0]: ln for ln in got.stdout.splitlines() if ln.strip()}
    assert lines["deep"].endswith(
        "never built; 2 of 2 shards new: hf://datasets/org/name/data/part-0.parquet, "
        "hf://datasets/org/name/data/part-1.parquet"
    ), got.stdout
    assert (
        f"'hf://datasets/org/name@main/x/*.parquet' matches no file of org/name at commit "
        f"{hub.commits[0]} (offline: the files the local Hub cache holds)" in lines["none"]
    )
    assert "'hf://datasets/org-only/a.parquet' is not a Hub dataset path" in lines["bad"]
    built = doit(repo, "run", "preprocess:none", log=tmp_path / "calls.log", check=False)
    text = built.stdout + built.stderr
    assert built.returncode != 0
    assert "'hf://datasets/org/name@main/x/*.parquet' matches no file of org/name" in text
    assert "Plain datasets" not in text and "Traceback" not in text, text
    # A cache made without symlinks (a copy in the snapshot) has no content id to read.
    link = hub.snapshot(hub.commits[0]) / "data" / "part-0.parquet"
    data = link.read_bytes()
    link.unlink()
    link.write_bytes(data)
    got = run_hfbuild(repo, "status")
    assert f"{link} is a copy, not huggingface_hub's link to a blob" in got.stdout, got.stdout


def test_a_moved_branch_is_seen_after_no_op_checks(repo: Repo, tmp_path: pathlib.Path) -> None:
    """The no-import record (record.py) cannot see a branch move in the Hub cache or on the
    Hub: a pipeline with a Hub load is never answered from it."""
    hub = _two_part_hub()
    _project(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    repo.commit("lock")
    for _ in range(3):  # a record would be written and confirmed by now
        assert run_hfbuild(repo, "status").returncode == 0
    new = hub.commit({"data/part-2.parquet": _parquet("part-2", 200)})
    got = run_hfbuild(repo, "status")
    assert got.returncode == 1, got.stdout
    assert f"now resolves to {new[:12]}" in got.stdout


# -- configurations of the dataset card (`name=`) ---------------------------------------------

CARD = """---
configs:
- config_name: small
  data_files: data/part-0.parquet
- config_name: both
  default: true
  data_files:
  - split: train
    path: data/part-*.parquet
  - split: test
    path: data/part-1.parquet
dataset_info:
  config_name: both
  features:
  - name: x
    dtype: int32
  - name: f
    dtype: string
---
# org/name

PROSE
"""

TABLES_CARD = """---
configs:
- config_name: semi
  data_files:
  - split: train
    path: tables/*.csv
  sep: ";"
  features:
  - name: a
    dtype: float32
  - name: b
    dtype: string
---
# org/tables
"""

CONFIG_DODO = """
    from hfbuild import Pipeline
    from pkg import t

    pipe = Pipeline()
    small = pipe.load("small", "org/name", name="small", revision="main", split="train")
    dflt = pipe.load("dflt", "org/name")
    semi = pipe.load("semi", "org/tables", name="semi", split="train")
    feat = pipe.map("feat", small, t.feat)
    EXTRA


    def task_preprocess():
        yield from pipe.tasks()
    """

PLAIN_CONFIG = """
import json, sys
import datasets
d = datasets.load_dataset(sys.argv[1], name=sys.argv[2], **json.loads(sys.argv[3]))
def one(ds):
    return {"rows": ds.to_dict(), "features": ds.features.to_dict()}
print(json.dumps(one(d) if isinstance(d, datasets.Dataset) else {s: one(d[s]) for s in d}))
"""

READ_CONFIG = """
import json, sys, warnings
warnings.simplefilter("ignore")
import datasets
import dodo
def one(ds):
    return {"rows": ds.to_dict(), "features": ds.features.to_dict()}
out = {}
for name in sys.argv[1:]:
    d = dodo.pipe.result(name)
    out[name] = one(d) if isinstance(d, datasets.Dataset) else {s: one(d[s]) for s in d}
print(json.dumps(out))
"""


def _card_hubs(prose: str = "Two parts.") -> tuple[HubCache, HubCache]:
    hub = HubCache(_hub_dir())
    hub.commit(
        {
            "README.md": CARD.replace("PROSE", prose).encode(),
            "data/part-0.parquet": _parquet("part-0", 0),
            "data/part-1.parquet": _parquet("part-1", 100),
        }
    )
    tables = HubCache(_hub_dir(), "org/tables")
    tables.commit(
        {
            "README.md": TABLES_CARD.encode(),
            "tables/t0.csv": b"a;b\n1.5;x\n2.5;y\n",
            "tables/t1.csv": b"a;b\n3;z\n",
        }
    )
    return hub, tables


def _config_project(repo: Repo, extra: str = "") -> Repo:
    files = {k: v for k, v in FILES.items() if k != "dodo.py"}
    files["dodo.py"] = CONFIG_DODO.replace("EXTRA", extra)
    repo.write(files, commit="project")
    return repo


def _plain_config(snapshot: pathlib.Path, name: str, tmp: pathlib.Path, **kw: Any) -> Any:
    """Plain datasets on the commit's files by its own card (the local loader of the
    snapshot directory: datasets' `MetadataConfigs`, `DatasetInfosDict` and builders), in a
    fresh process with an empty datasets cache."""
    env = {"HF_DATASETS_CACHE": str(tmp / "plain-cache")}
    out = run_python(PLAIN_CONFIG, tmp, env=env, args=[str(snapshot), name, json.dumps(kw)])
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_card_config_equals_plain_load_dataset_with_that_name(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """`name=` (and no name: the card's default config) loads what plain datasets loads for
    that configuration: its data files, per split in the card's order, its builder keyword
    arguments (`sep`), its features (from `dataset_info`, or the config's own)."""
    hub, tables = _card_hubs()
    _config_project(repo)
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    out = run_python(READ_CONFIG, repo.path, args=["small", "dflt", "semi"])
    got = json.loads(out.stdout.strip().splitlines()[-1])
    snap, tsnap = hub.snapshot(hub.commits[0]), tables.snapshot(tables.commits[0])
    assert got["small"] == _plain_config(snap, "small", tmp_path, split="train")
    assert got["dflt"] == _plain_config(snap, "both", tmp_path)
    assert got["semi"] == _plain_config(tsnap, "semi", tmp_path, split="train")
    assert list(got["dflt"]) == ["train", "test"]
    assert got["dflt"]["train"]["features"]["x"] == {"dtype": "int32", "_type": "Value"}
    assert got["semi"]["rows"] == {"a": [1.5, 2.5, 3.0], "b": ["x", "y", "z"]}
    lock = _lock(repo)
    assert lock["small"]["hub"] == [{"repo": REPO_ID, "revision": "main", "commit": hub.commits[0]}]
    assert hub.commits[0] not in json.dumps(lock["small"]["manifest"])


def test_a_prose_edit_of_the_card_rebuilds_nothing_and_a_config_edit_rebuilds(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    hub, _ = _card_hubs()
    _config_project(repo)
    log = tmp_path / "calls.log"
    doit(repo, "run", "preprocess", log=log)
    before = {k: v["fingerprint"] for k, v in _lock(repo).items()}
    new = hub.commit({"README.md": CARD.replace("PROSE", "Better prose.").encode()})
    assert run_hfbuild(repo, "status").stdout.count("up to date") == 4
    log.unlink(missing_ok=True)
    doit(repo, "run", "preprocess", log=log)
    assert calls(log) == {}
    lock = _lock(repo)
    assert {k: v["fingerprint"] for k, v in lock.items()} == before
    assert lock["small"]["hub"][0]["commit"] == new
    # The config `small` now reads the other file; `both`'s features change: those rebuild.
    card = CARD.replace("data_files: data/part-0.parquet", "data_files: data/part-1.parquet")
    hub.commit({"README.md": card.replace("dtype: int32", "dtype: int64").encode()})
    status = run_hfbuild(repo, "status").stdout
    assert "semi" in status and status.count("up to date") == 1, status
    log.unlink(missing_ok=True)
    doit(repo, "run", "preprocess", log=log)
    assert sorted(calls(log)) == ["feat:part-1"]
    after = {k: v["fingerprint"] for k, v in _lock(repo).items()}
    assert sorted(k for k in after if after[k] != before[k]) == ["dflt", "feat", "small"]
    got = json.loads(run_python(READ_CONFIG, repo.path, args=["dflt"]).stdout.splitlines()[-1])
    assert got["dflt"]["train"]["features"]["x"]["dtype"] == "int64"


def test_an_unknown_config_name_lists_the_configs(repo: Repo, tmp_path: pathlib.Path) -> None:
    _card_hubs()
    _config_project(repo, 'pipe.load("nope", "org/name", name="nope")')
    got = run_hfbuild(repo, "status")
    text = got.stdout + got.stderr
    assert got.returncode != 0
    assert "BuilderConfig 'nope' not found. Available: ['small', 'both']" in text, text
    assert "Traceback" not in text
    assert len([ln for ln in text.splitlines() if "not found" in ln]) == 1


PINNED_DODO = """
    import os

    with open(os.environ["IMPORT_LOG"], "a") as f:  # the import, counted
        f.write("dodo\\n")

    from hfbuild import Pipeline

    pipe = Pipeline()
    raw = pipe.load("raw", "org/name", revision="COMMIT", data_files="data/*.parquet")
    feat = pipe.map("feat", raw, "pkg.t:feat")


    def task_preprocess():
        yield from pipe.tasks()
    """


def test_a_load_pinned_to_a_commit_answers_from_the_record(
    repo: Repo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revision that is a commit id never moves: `status` answers from the no-import
    record (dodo.py not imported), as the full path does, also after main moved."""
    hub = _two_part_hub()
    first = hub.commits[0]
    log = tmp_path / "imports.log"
    log.write_text("")
    monkeypatch.setenv("IMPORT_LOG", str(log))
    files = {k: v for k, v in FILES.items() if k != "dodo.py"}
    files["pyproject.toml"] = '[tool.hfbuild]\nuntracked-env = ["CALL_LOG", "IMPORT_LOG"]\n'
    files["dodo.py"] = PINNED_DODO.replace("COMMIT", first)
    repo.write(files, commit="project")
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    repo.commit("lock")

    def status(**env: str) -> tuple[Any, bool]:
        before = len(log.read_text().splitlines())
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            out = run_hfbuild(repo, "status", "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        got = [(s["stage"], s["fingerprint"], s["state"]) for s in json.loads(out.stdout)]
        return got, len(log.read_text().splitlines()) > before

    answers = [status() for _ in range(4)]
    assert not answers[-1][1], answers  # answered from the record: dodo.py not imported
    full, imported = status(HFBUILD_RECORD="0")
    assert imported and full == answers[-1][0]
    assert [s[2] for s in full] == ["up to date", "up to date"]
    hub.commit({"data/part-2.parquet": _parquet("part-2", 200)})  # main moves: not this load
    got, imported = status()
    assert not imported and got == full
    assert _lock(repo)["raw"]["hub"] == [{"repo": REPO_ID, "revision": first, "commit": first}]


def test_a_hub_load_built_whole_is_refused_by_the_ray_executor(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """The Ray executor sends a Hub file only with a load shard's task: a Hub load built
    whole (here one file) is refused with what to do, before any task (no cluster needed);
    its shards' trees (two files) ship no Hub file."""
    _two_part_hub()
    _project(repo, 'one = pipe.load("one", "org/name", data_files="data/part-0.parquet")')
    out = run_python(
        """
        import json
        from hfbuild import HfbuildError
        from hfbuild.builds.raytree import shipped_files
        import dodo
        ms = dodo.pipe.manifests()
        raw = ms.ok["raw"]
        print(json.dumps([shipped_files(raw, s) for s in raw.shard_list]))
        try:
            shipped_files(ms.ok["one"])
        except HfbuildError as e:
            print(type(e).__name__, e)
        """,
        repo.path,
    )
    lines = out.stdout.strip().splitlines()
    assert not [p for tree in json.loads(lines[-2]) for p, _ in tree if p.startswith("hf://")]
    assert lines[-1].startswith(
        "ConfigError this load of Hub files (hf://datasets/org/name/data/part-0.parquet) is "
        "built whole"
    ), out.stdout
    assert "`--executor local`" in lines[-1]


CARDS: dict[str, tuple[str, dict[str, str], str]] = {
    # repo: (README.md, extra files, the call's keyword arguments as Python source)
    "yaml": ("# no YAML\n", {".huggingface.yaml": CARD.split("---")[1]}, 'name="both"'),
    "dir": (
        "---\nconfigs:\n- config_name: a\n  data_dir: data\n  data_files: ['part-1.parquet']\n"
        "---\n",
        {},
        "",
    ),
    "nolist": ("---\nconfigs: {a: 1}\n---\n", {}, ""),
    "noname": ("---\nconfigs:\n- data_files: x.parquet\n---\n", {}, ""),
    "twodefaults": (
        "---\nconfigs:\n- config_name: a\n  default: true\n  data_files: x.parquet\n"
        "- config_name: default\n  data_files: y.parquet\n---\n",
        {},
        "",
    ),
    "nodefault": (
        "---\nconfigs:\n- config_name: a\n  data_files: x.parquet\n- config_name: b\n"
        "  data_files: y.parquet\n---\n",
        {},
        "",
    ),
    "nofiles": ("---\nconfigs:\n- config_name: a\n  data_dir: data\n---\n", {}, ""),
    "badfiles": ("---\nconfigs:\n- config_name: a\n  data_files: [{split: x}]\n---\n", {}, ""),
    "badyaml": ("---\nconfigs: [a: b: c\n---\n", {}, ""),
}


def test_dataset_cards_read_as_datasets_reads_them(tmp_path: pathlib.Path) -> None:
    """Each card rule at definition time: `.huggingface.yaml` updates the README's YAML,
    `data_dir` prefixes a config's patterns; a card datasets refuses is refused with its
    reason; a README the cache lacks is a clear error, unless huggingface_hub recorded that
    the repository has none (`.no_exist`)."""
    data = {"data/part-0.parquet": _parquet("part-0", 0), "data/part-1.parquet": _parquet("p", 9)}
    for repo, (readme, extra, _) in CARDS.items():
        HubCache(_hub_dir(), f"org/{repo}").commit(
            {"README.md": readme.encode(), **{k: v.encode() for k, v in extra.items()}, **data}
        )
    for repo, marked in (("gone", False), ("none", True)):
        hub = HubCache(_hub_dir(), f"org/{repo}")
        commit = hub.commit(data)
        if marked:
            (hub.root / ".no_exist" / commit).mkdir(parents=True)
            (hub.root / ".no_exist" / commit / "README.md").write_text("")
    calls_ = {**{r: kw for r, (_, _, kw) in CARDS.items()}, "gone": "", "none": ""}
    script = "from hfbuild import Pipeline, HfbuildError\npipe = Pipeline()\n"
    for repo, kw in calls_.items():
        script += (
            f"try:\n    s = pipe.load({repo!r}, 'org/{repo}', {kw})\n"
            f"    o = s.spec.options\n"
            f"    print({repo!r}, 'OK', o['data_files'], o.get('features') is not None)\n"
            f"except HfbuildError as e:\n    print({repo!r}, type(e).__name__, e)\n"
        )
    out = run_python(script, tmp_path)
    got = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in out.stdout.splitlines()}
    assert got["yaml"] == (
        "OK {'train': ['hf://datasets/org/yaml@main/data/part-*.parquet'], "
        "'test': ['hf://datasets/org/yaml@main/data/part-1.parquet']} True"
    ), got
    assert got["dir"] == "OK {'train': ['hf://datasets/org/dir@main/data/part-1.parquet']} False"
    assert "expected configs to be a list" in got["nolist"]
    assert "each config must include a `config_name` field" in got["noname"]
    assert "has several default configs: 'a' and 'default'" in got["twodefaults"]
    assert got["nodefault"].endswith(
        "Config name is missing: please pick one among the available configs of "
        "org/nodefault: ['a', 'b'] (name=...)."
    )
    assert "the config 'a' of org/nofiles's card names no data_files" in got["nofiles"]
    assert "expected a string, a list of strings, or a list of dicts" in got["badfiles"]
    assert got["badyaml"].startswith("HubError load stage 'badyaml': the dataset card")
    assert "HubError load stage 'gone': the dataset card (README.md) of org/gone" in got["gone"]
    assert "is not in the local Hub cache" in got["gone"] and "--revision" in got["gone"]
    assert (
        "data_files= is required for a Hub dataset whose card declares no configs" in (got["none"])
    )
    assert "Traceback" not in out.stdout + out.stderr
