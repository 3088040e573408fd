"""The committed lock is the root of trust for what is pulled (issue #25, items 2 and 5): a
remote entry whose data was changed and whose hashes were all recomputed to match is refused
when the lock at HEAD records another content hash for its key, on a file:// remote and on a
real S3 protocol server (moto, on loopback), for a plain stage and for a shard."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest

from hfbuild.store import listform
from hfbuild.store.paths import manifest_digest
from tests import pipeline_project as pp
from tests import shard_project as sp
from tests.helpers import Repo, run_hfbuild
from tests.pipeline_project import calls, doit
from tests.test_remote import s3, s3_server  # noqa: F401  (fixtures)


class RemoteFs(NamedTuple):
    url: str  # what HFBUILD_REMOTE says
    fs: Any  # an fsspec filesystem reaching it, as whoever can write there
    root: str  # the remote's root in `fs`

    def entry(self, fp: str) -> str:
        return f"{self.root}/objects/{fp[:2]}/{fp}"

    def manifest(self, fp: str) -> dict[str, Any]:
        """The entry's manifest, its list's rows expanded as hfbuild reads them."""
        doc: dict[str, Any] = json.loads(self.fs.cat_file(f"{self.entry(fp)}/manifest.json"))
        return listform.expand(doc)

    def write_manifest(self, fp: str, doc: dict[str, Any]) -> None:
        """`doc` written as hfbuild writes it (its rows compact); a checksum made for `doc`
        is made again for what is written, a wrong one is left wrong."""
        right = doc.get("manifest_digest") == manifest_digest(doc)
        doc = listform.compact(doc)
        if right:
            doc["manifest_digest"] = manifest_digest(doc)
        self.fs.pipe_file(f"{self.entry(fp)}/manifest.json", json.dumps(doc).encode())


@pytest.fixture(params=["file", "s3"])
def remote(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> RemoteFs:
    """An empty remote cache, named by HFBUILD_REMOTE: a directory, or a fresh S3 bucket."""
    if request.param == "file":
        import fsspec

        root = tmp_path / "remote"
        root.mkdir()
        monkeypatch.setenv("HFBUILD_REMOTE", f"file://{root}")
        return RemoteFs(f"file://{root}", fsspec.filesystem("file"), str(root))
    fs = request.getfixturevalue("s3")
    return RemoteFs(os.environ["HFBUILD_REMOTE"], fs, f"{fs.bucket}/cache")


def forge(r: RemoteFs, fp: str, work: pathlib.Path, change: Callable[[Any], Any]) -> dict[str, Any]:
    """What someone who can write to the remote can do: rewrite entry `fp`'s data with one
    value changed, then recompute its file sizes, content hash and manifest checksum, so that
    every check against the remote's own records passes. Returns the new manifest."""
    import datasets

    from hfbuild.store.content import dataset_hash
    from hfbuild.store.paths import manifest_digest

    doc = r.manifest(fp)
    data = f"{r.entry(fp)}/{doc['data_dir']}"
    src = work / f"{fp}-src"
    for rel in doc["files"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        r.fs.get_file(f"{data}/{rel}", str(src / rel))
    out = work / f"{fp}-forged"
    datasets.load_from_disk(str(src)).map(change, keep_in_memory=True).save_to_disk(str(out))
    doc["files"] = {
        p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()
    }
    for rel in doc["files"]:
        r.fs.put_file(str(out / rel), f"{data}/{rel}")
    doc["content_hash"] = dataset_hash(datasets.load_from_disk(str(out)))
    doc["manifest_digest"] = manifest_digest(doc)
    r.write_manifest(fp, doc)
    return doc


def forge_shard(
    r: RemoteFs, stage_fp: str, label: str, work: pathlib.Path, change: Callable[[Any], Any]
) -> str:
    """`forge` one shard of a sharded stage's remote entry, and its row in the stage's list,
    the list's combined content hash and checksum to match. Returns the shard's key."""
    from hfbuild.store.content import combined_hash
    from hfbuild.store.paths import manifest_digest

    doc = r.manifest(stage_fp)
    row = next(row for row in doc["shards"] if row[2] == label)
    shard = forge(r, row[1], work, change)
    row[3] = shard["files"]
    row[4]["content_hash"] = shard["content_hash"]
    doc["content_hash"] = combined_hash([(row[0], row[4]["content_hash"]) for row in doc["shards"]])
    doc["manifest_digest"] = manifest_digest(doc)
    r.write_manifest(stage_fp, doc)
    return str(row[1])


def locked(repo: Repo) -> dict[str, Any]:
    stages: dict[str, Any] = json.loads((repo.path / "hfbuild.lock").read_text())["stages"]
    return stages


def built_and_pushed(repo: Repo, tmp_path: pathlib.Path, *, commit_lock: bool = True) -> None:
    doit(repo, "run", "preprocess", log=tmp_path / "first.log")
    if commit_lock:
        repo.commit("lock")
    out = run_hfbuild(repo, "push")
    assert out.returncode == 0, out.stderr


def test_forged_stage_is_refused_and_built_here(
    repo: Repo, tmp_path: pathlib.Path, remote: RemoteFs
) -> None:
    """A plain stage's remote entry with changed data and recomputed hashes is refused
    (naming the remote and the entry) because the committed lock records another content
    hash; the stage is built here, the stages over it are pulled and serve the right rows,
    the lock is not rewritten, and `hfbuild pull` reports the refusal (exit 1)."""
    pp.make_project(repo)
    built_and_pushed(repo, tmp_path)
    fp = locked(repo)["feat"]["fingerprint"]
    forge(remote, fp, tmp_path, lambda ex: {"y": ex["y"] + 1000})

    clone = repo.clone(tmp_path / "second")
    log = tmp_path / "second.log"
    out = doit(clone, "run", "preprocess", log=log)
    assert f"the remote {remote.url} holds a forged or damaged entry {fp} (feat)" in out.stderr
    assert calls(log) == Counter({"feat": 1})
    got = pp.results(clone)
    assert got["feat"] == pp.expected()["feat"] and got["kept"] == pp.expected()["kept"]
    assert clone.git("status", "--porcelain", "hfbuild.lock") == ""  # the lock is the committed one
    assert run_hfbuild(clone, "verify", "--deep").returncode == 0

    third = repo.clone(tmp_path / "third")
    out = run_hfbuild(third, "pull", "feat")
    assert out.returncode == 1
    assert "pulled" not in out.stdout
    assert f"feat: refused: the remote {remote.url} holds a forged or damaged entry" in out.stderr
    assert not (third.path / ".hfbuild" / "objects" / fp[:2] / fp).exists()


def test_forged_shard_is_refused_and_only_it_is_built_here(
    repo: Repo, tmp_path: pathlib.Path, remote: RemoteFs
) -> None:
    """A shard of a sharded stage forged on the remote, with its list's row and combined
    content hash recomputed to match: the list is refused, the shards the committed lock
    vouches for are pulled, the forged one is built here (and only it), every result equals
    the original build's, and the lock is not rewritten."""
    sp.make_project(repo)
    built_and_pushed(repo, tmp_path)
    before = sp.state(repo)
    fp = locked(repo)["feat"]["fingerprint"]
    key = forge_shard(remote, fp, "data/part-1.parquet", tmp_path, lambda ex: {"y": ex["y"] + 1})

    clone = repo.clone(tmp_path / "second")
    log = tmp_path / "second.log"
    out = doit(clone, "run", "preprocess", log=log)
    assert f"the remote {remote.url} holds a forged or damaged entry {fp} (feat)" in out.stderr
    assert "differ from the lock: data/part-1.parquet;" in out.stderr
    assert set(calls(log)) == {"feat:part-1"}
    assert sp.state(clone) == before
    assert clone.git("status", "--porcelain", "hfbuild.lock") == ""
    shard = json.loads(
        (clone.path / ".hfbuild/objects" / key[:2] / key / "manifest.json").read_text()
    )
    assert "pulled_from" not in shard  # built here, under the forged shard's key


def test_forged_shard_alone_is_refused_against_the_lock(
    repo: Repo, tmp_path: pathlib.Path, remote: RemoteFs
) -> None:
    """A shard forged on the remote while its stage's list is left as it was: the shard is
    refused (its key is pinned by the committed lock), so the list is not used; the shard
    is built here and nothing forged is served."""
    sp.make_project(repo)
    built_and_pushed(repo, tmp_path)
    before = sp.state(repo)
    fp = locked(repo)["feat"]["fingerprint"]
    row = next(r for r in remote.manifest(fp)["shards"] if r[2] == "data/part-2.parquet")
    forge(remote, row[1], tmp_path, lambda ex: {"y": ex["y"] + 1})

    clone = repo.clone(tmp_path / "second")
    log = tmp_path / "second.log"
    out = doit(clone, "run", "preprocess", log=log)
    assert f"holds a forged or damaged entry {row[1]} (feat data/part-2.parquet)" in out.stderr
    assert set(calls(log)) == {"feat:part-2"}
    assert sp.state(clone) == before
    assert clone.git("status", "--porcelain", "hfbuild.lock") == ""


def test_rebuild_names_a_forged_pulled_shard_not_randomness(
    repo: Repo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no committed lock pins a key (here: no lock at HEAD), a consistently forged
    shard is taken on the remote's own hashes; `verify --rebuild` then says the pulled entry
    is forged or damaged, names the shard and the remote (not "seed any randomness"), moves
    it aside, and its fix gives the right rows."""
    import fsspec

    root = tmp_path / "remote"
    root.mkdir()
    monkeypatch.setenv("HFBUILD_REMOTE", f"file://{root}")
    r = RemoteFs(f"file://{root}", fsspec.filesystem("file"), str(root))
    sp.make_project(repo)
    built_and_pushed(repo, tmp_path, commit_lock=False)
    before = sp.state(repo)
    fp = locked(repo)["feat"]["fingerprint"]
    forge_shard(r, fp, "data/part-1.parquet", tmp_path, lambda ex: {"y": ex["y"] + 1})

    clone = repo.clone(tmp_path / "second")
    doit(clone, "run", "preprocess", log=tmp_path / "second.log")
    assert sp.state(clone)["feat"] != before["feat"]  # nothing pinned it
    out = run_hfbuild(clone, "verify", "--rebuild")
    assert out.returncode == 1
    assert "data/part-1.parquet" in out.stderr
    assert f"pulled from the remote {r.url}" in out.stderr
    assert "that remote holds a forged or damaged entry" in out.stderr
    assert "Seed any randomness" not in out.stderr

    log = tmp_path / "fix.log"
    doit(clone, "run", "preprocess", log=log, env={"HFBUILD_NO_REMOTE": "1"})
    # The forged shard, and what was built over it here (keys hold their inputs' results):
    # the shards of `idx` from part-1 on (offsets), `keep`'s part-1 and `total`.
    assert set(calls(log)) == {
        "feat:part-1",
        *(f"idx:part-{i}" for i in (1, 2, 3)),
        "keep:part-1",
        "total:all",
    }
    assert sp.state(clone) == before


def test_deep_names_a_pulled_entry_the_committed_lock_contradicts(
    repo: Repo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forged shard pulled while nothing pinned it, then a commit whose lock records the
    true hashes: `verify --deep` moves the shard (and its list) aside as contradicting the
    committed lock, naming the remote it came from; the `doit run` it advises refuses the
    remote's entry and builds that one shard, never listing the forged one again."""
    import fsspec

    root = tmp_path / "remote"
    root.mkdir()
    monkeypatch.setenv("HFBUILD_REMOTE", f"file://{root}")
    r = RemoteFs(f"file://{root}", fsspec.filesystem("file"), str(root))
    sp.make_project(repo)
    built_and_pushed(repo, tmp_path, commit_lock=False)
    before = sp.state(repo)
    fp = locked(repo)["feat"]["fingerprint"]
    key = forge_shard(r, fp, "data/part-1.parquet", tmp_path, lambda ex: {"y": ex["y"] + 1})
    clone = repo.clone(tmp_path / "second")
    doit(clone, "run", "preprocess", log=tmp_path / "second.log")
    # A commit whose lock records the true hashes (the original build's lock) arrives.
    shutil.copy(repo.path / "hfbuild.lock", clone.path / "hfbuild.lock")
    clone.git("add", "hfbuild.lock")
    clone.git("commit", "-q", "-m", "the lock of the original build")

    out = run_hfbuild(clone, "verify", "--deep")
    assert out.returncode == 1
    assert f"the stored result {key} is damaged (its content hash" in out.stderr
    assert f"pulled from the remote {r.url}, which holds a forged or damaged entry" in out.stderr
    log = tmp_path / "fix.log"
    out = doit(clone, "run", "preprocess", log=log)
    assert set(calls(log)) == {"feat:part-1"}
    assert sp.state(clone) == before
    assert clone.git("status", "--porcelain", "hfbuild.lock") == ""


def _file_remote(repo: Repo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> RemoteFs:
    import fsspec

    root = tmp_path / "remote"
    root.mkdir()
    monkeypatch.setenv("HFBUILD_REMOTE", f"file://{root}")
    pp.make_project(repo)
    built_and_pushed(repo, tmp_path)
    return RemoteFs(f"file://{root}", fsspec.filesystem("file"), str(root))


def test_remote_manifest_edited_without_its_digest_is_refused(
    repo: Repo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote manifest edited without recomputing its `manifest_digest` is refused on pull
    (the stage is built here instead), as the store refuses such a manifest."""
    r = _file_remote(repo, tmp_path, monkeypatch)
    fp = locked(repo)["lens"]["fingerprint"]
    doc = r.manifest(fp)
    doc["rows"] = 41
    r.write_manifest(fp, doc)

    clone = repo.clone(tmp_path / "second")
    log = tmp_path / "second.log"
    out = doit(clone, "run", "preprocess", log=log)
    assert f"remote entry {fp} on {r.url} has a manifest edited after it was written" in out.stderr
    assert calls(log) == Counter({"lens": 1})
    assert pp.results(clone)["lens"] == pp.expected()["lens"]


def test_pull_from_a_missing_file_remote_names_the_path(
    repo: Repo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file:// remote whose directory does not exist is an error naming the path and what
    to do (one line, exit 1), not "not on the remote"."""
    r = _file_remote(repo, tmp_path, monkeypatch)
    clone = repo.clone(tmp_path / "second")
    missing = tmp_path / "no-such-remote"
    out = run_hfbuild(clone, "pull", "--remote", f"file://{missing}")
    assert out.returncode == 1
    assert "not on the remote" not in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"the remote file://{missing} does not exist (no directory {missing})" in lines[0]
    assert run_hfbuild(clone, "pull", "--remote", r.url).returncode == 0


def test_remote_rm_removes_a_bad_entry_and_keeps_what_the_lock_records(
    repo: Repo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hfbuild remote rm STAGE` removes the remote's entry for the stage's key when the
    committed lock records other content for it (a forged or bad entry), saying what it
    removed; it refuses to remove one holding what the lock records unless --force. A clone
    then builds what was removed (no refusal), pushes it, and the next clone pulls all."""
    import fsspec

    root = tmp_path / "remote"
    root.mkdir()
    monkeypatch.setenv("HFBUILD_REMOTE", f"file://{root}")
    remote = RemoteFs(f"file://{root}", fsspec.filesystem("file"), str(root))
    pp.make_project(repo)
    built_and_pushed(repo, tmp_path)
    lock = locked(repo)
    feat, kept = lock["feat"]["fingerprint"], lock["kept"]["fingerprint"]
    forged = forge(remote, feat, tmp_path, lambda ex: {"y": ex["y"] + 1})["content_hash"]

    out = run_hfbuild(repo, "remote", "rm", "feat")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"stage 'feat': removed {remote.url}/objects/{feat[:2]}/{feat} (content hash "
        f"{forged}; the committed hfbuild.lock records {lock['feat']['content_hash']})."
    )
    assert not os.path.exists(remote.entry(feat))

    out = run_hfbuild(repo, "remote", "rm", "kept")
    assert out.returncode == 1
    assert "it is the good one, and stays. --force removes it anyway." in out.stderr
    assert os.path.exists(f"{remote.entry(kept)}/manifest.json")
    out = run_hfbuild(repo, "remote", "rm", "kept", "--force")
    assert out.returncode == 0 and "(--force)" in out.stdout
    assert not os.path.exists(remote.entry(kept))
    out = run_hfbuild(repo, "remote", "rm", "kept")
    assert out.returncode == 1 and "holds no entry" in out.stdout

    clone = repo.clone(tmp_path / "clone")
    built = doit(clone, "run", "preprocess", log=tmp_path / "clone.log")
    assert "forged" not in built.stderr
    assert calls(tmp_path / "clone.log") == {"feat": 1, "keep": 1}
    assert run_hfbuild(clone, "push").returncode == 0
    again = repo.clone(tmp_path / "again")
    doit(again, "run", "preprocess", log=tmp_path / "again.log")
    assert calls(tmp_path / "again.log") == {}
    assert locked(again) == locked(clone) == lock
