"""A stage's list of shards and a pack's rows in their compact form (issue #24: the store's
bytes): read back exactly as written, a malformed or edited one refused, a list an older
hfbuild wrote (rows in the file) read as it is, and the compact form pushed and pulled."""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import pytest

from hfbuild.store import listform
from hfbuild.store.paths import manifest_digest
from tests.helpers import Repo, run_hfbuild, run_python
from tests.pipeline_project import calls, doit
from tests.shard_project import make_project, state


def _hex(i: int, width: int = 32) -> str:
    return f"{i:0{width}x}"


def _load_list(n: int, packs: int) -> list[list[Any]]:
    """A load's list as a build writes it: `packs` packs of `n` shards each."""
    rows = []
    for p in range(packs):
        files = {"data-00000-of-00001.arrow": 4000 + p, "dataset_info.json": 342}
        for i in range(n):
            facts = {
                "before": "",
                "content_hash": _hex(7 * i + p),
                "form": _hex(99),
                "input": _hex(i + 1000 * p, 40),
                "pack": _hex(500 + p),
                "rows": 10,
                "span": [10 * i, 10 * i + 10],
                "stamp": [1796468465225206388 + p, 678610],
            }
            rows.append(
                ["train", _hex(i + 1000 * p), f"data/part-{p}-{i:05d}.parquet", files, facts]
            )
    return rows


def _odd_list() -> list[list[Any]]:
    """Rows no build writes often: keys not all hex of one width, labels with ':' and a line
    break, a fact one row lacks, spans that do not follow from rows, an indices shard's
    base, several splits."""
    rows = _load_list(3, 1)
    rows[0][1] = "ABCDEF" + rows[0][1][6:]  # upper-case hex: not lower-case bytes again
    rows[1][2] = "a:b\nc"
    del rows[2][4]["input"]
    rows[1][4]["span"] = [5, 99]
    rows[2][0] = "test"
    rows.append(
        [
            "test",
            "k" * 32,
            "",
            {"indices.arrow": 8},
            {"base": _hex(3), "base_files": {"x.arrow": 1}, "rows": 0, "content_hash": None},
        ]
    )
    return rows


def _upper_list() -> list[list[Any]]:
    """A key in upper-case hex among lower-case ones: kept as it is, not as bytes."""
    rows = _load_list(3, 1)
    rows[1][1] = _hex(0xABCDEF).upper()
    return rows


def _appended_list(n: int) -> list[list[Any]]:
    """A load's list after an append: one pack of `n` shards, then a shard stored by itself
    (no pack, no span, a stamp of its own)."""
    rows = _load_list(n, 1)
    files = {"data-00000-of-00001.arrow": 812, "dataset_info.json": 342}
    facts = {
        "before": "",
        "content_hash": _hex(12345),
        "form": _hex(99),
        "input": _hex(54321, 40),
        "rows": 10,
        "stamp": [1796468465225206999, 1210],
    }
    return [*rows, ["train", _hex(77777), f"data/part-9-{n:05d}.parquet", files, facts]]


def _shared_list() -> list[list[Any]]:
    """A list as a build holds it after reading one back: a pack's rows share their facts'
    objects (`compact` encodes them once per object). Among them, facts equal in Python but
    not in JSON (1, True, 1.0), and one object under another fact's name."""
    rows = _load_list(8, 1)
    shared = {k: rows[0][4][k] for k in ("form", "pack", "stamp")}
    stamp, one_f = shared["stamp"], 1.0
    for r in rows:
        r[4].update(shared, flag=1)
    rows[2][4]["flag"] = True
    rows[3][4]["flag"] = rows[4][4]["flag"] = one_f
    rows[5][4]["flag"] = 0
    rows[6][4]["other"] = rows[6][4].pop("flag")  # the same object, under another name
    rows[7][4]["flag"] = [stamp]
    return rows


def _pack(n: int) -> list[list[Any]]:
    return [
        [_hex(i), 10 * i, 10 * i + 10, _hex(3 * i), f"data/part-{i:05d}.parquet"] for i in range(n)
    ]


@pytest.mark.parametrize(
    "doc",
    [
        {"shards": _load_list(1000, 2), "rows": 20000},
        {"shards": _appended_list(1000)},
        {"shards": _appended_list(1000)[::-1]},
        {"shards": _shared_list()},
        {"shards": _odd_list()},
        {"shards": _upper_list()},
        {"shards": _load_list(1, 1)},
        {"pack": _pack(1000)},
        {"pack": [*_pack(3), [_hex(9), 0, 4, None, "x\ny"]]},  # rows that do not follow
        {"shards": [["train", "k", "l", {}, {"rows": 1}], "not a row"]},  # kept as rows
        {"shards": []},
        {"manifest": {"kind": "load", "data": {"files": [["data/a.parquet", _hex(1, 40)]]}}},
        {"manifest": {"data": {"files": [[f"d/p-{i}", _hex(i, 40)] for i in range(1000)]}}},
        {"manifest": {"data": {"files": [["a", "b"], ["a", ["not", "a", "name"]]]}}},
        {"manifest": {"data": {"files": {"train": [["t", _hex(1, 40)]], "test": []}}}},
        {"manifest": {"data": {"files": {"form": [["f", "x"]], "n": [], "name": [], "id": []}}}},
    ],
)
def test_rows_written_compactly_are_read_back_exactly(doc: dict[str, Any]) -> None:
    """What a file holds (`compact`, through JSON) expands to the same rows, in the same
    key order a file read gives; a large load's list takes a third of the bytes or less,
    also with a shard stored by itself among packed ones (an append: no span of its own),
    a pack's rows under three fifths."""
    original = json.dumps(doc)
    written = json.dumps(listform.compact(doc), sort_keys=True)
    assert json.dumps(doc) == original  # nothing of `doc` changed: a key's manifest is shared
    back = listform.expand(json.loads(written))
    assert back == doc
    assert listform.expand(listform.compact(doc)) == doc and json.dumps(doc) == original
    assert json.dumps(back) == json.dumps(json.loads(json.dumps(doc, sort_keys=True)))
    if len(doc.get("shards") or []) >= 1000:
        assert len(written) * 3 < len(json.dumps(doc))
    if len(doc.get("pack") or []) >= 1000 or ("manifest" in doc and len(written) > 10_000):
        assert len(written) * 5 < len(json.dumps(doc)) * 3


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c.update(n=c["n"] + 1),
        lambda c: c["key"].update(b64=c["key"]["b64"][:-4]),
        lambda c: c["key"].update(b64="!" + c["key"]["b64"][1:]),
        lambda c: c.update(form=3),
        lambda c: c["at"].update({"all": 5}),
        lambda c: c.update(label={"front": "9:x\n0:y"}),
        lambda c: c["facts"].update(span={"list": ["a", "b"]}),
        lambda c: c["facts"].update(span={"list": [None, None]}),
        lambda c: c["facts"].update(span={"list": [0, 1.5]}),
        lambda c: c.update(common=[["train", [], {}]]),
    ],
)
def test_a_malformed_compact_list_is_refused(edit: Any) -> None:
    doc = listform.compact({"shards": _load_list(2, 1)})
    edit(doc["shards"])
    with pytest.raises(ValueError):
        listform.expand(json.loads(json.dumps(doc)))


CHECK = """
import json, sys, warnings
warnings.simplefilter("ignore")
import dodo
s = dodo.pipe.store
print(json.dumps([s.check(fp) for fp in sys.argv[1:]]))
"""


def _list_path(repo: Repo, stage: str) -> pathlib.Path:
    lock = json.loads((repo.path / "hfbuild.lock").read_text())
    fp = lock["stages"][stage]["fingerprint"]
    return repo.path / ".hfbuild" / "objects" / fp[:2] / fp / "manifest.json"


def _whys(repo: Repo, *paths: pathlib.Path) -> list[Any]:
    """Why each entry (by its manifest's path) is not served: None when it is."""
    out = run_python(CHECK, repo.path, args=[p.parent.name for p in paths])
    got: list[Any] = json.loads(out.stdout.splitlines()[-1])
    return got


def _why(repo: Repo, path: pathlib.Path) -> Any:
    return _whys(repo, path)[0]


def test_a_tampered_list_row_is_refused_and_the_list_built_again(tmp_path: pathlib.Path) -> None:
    """A compact list whose key column was edited is refused as edited; one whose column
    was cut short with its checksum made again is refused as unreadable, never misread; the
    next build lists the stage again (its shards are still there: none is rebuilt) and the
    results are the ones before."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    doit(repo, "run", "preprocess", log=tmp_path / "a.log")
    before = state(repo)
    path = _list_path(repo, "raw")
    good = path.read_text()
    doc = json.loads(good)
    assert doc["shards"]["form"] == listform.FORM
    assert _why(repo, path) is None

    b64 = doc["shards"]["key"]["b64"]
    doc["shards"]["key"]["b64"] = ("B" if b64[0] == "A" else "A") + b64[1:]
    path.write_text(json.dumps(doc, sort_keys=True))
    assert "edited after it was written" in _why(repo, path)

    doc["shards"]["key"]["b64"] = b64[:-4]
    doc.pop("ids", None)
    doc["manifest_digest"] = manifest_digest(doc)
    path.write_text(json.dumps(doc, sort_keys=True))
    assert "its list of shards cannot be read" in _why(repo, path)

    log = tmp_path / "b.log"
    doit(repo, "run", "preprocess", log=log)
    assert calls(log) == {}
    assert state(repo) == before
    assert _why(repo, _list_path(repo, "raw")) is None


def test_a_list_row_without_its_files_is_checked_by_itself(tmp_path: pathlib.Path) -> None:
    """A row listing no files (not a dict) is checked as an entry of its own, whichever row
    it is: a packed shard's row without its pack's files is then missing, and the list is
    refused and built again, never served."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    doit(repo, "run", "preprocess", log=tmp_path / "a.log")
    before = state(repo)
    path = _list_path(repo, "raw")
    for at in (0, -1):
        doc = json.loads(path.read_text())
        doc.pop("ids", None)
        listform.expand(doc)
        was = doc["shards"][at][3]
        doc["shards"][at][3] = None
        doc["manifest_digest"] = manifest_digest(doc)  # its rows as rows: a form kept
        path.write_text(json.dumps(doc, sort_keys=True))
        assert f"its shard {doc['shards'][at][1]} is missing" == _why(repo, path)
        doc["shards"][at][3] = was
        doc["manifest_digest"] = manifest_digest(listform.compact(doc))
        path.write_text(json.dumps(listform.compact(doc), sort_keys=True))
        assert _why(repo, path) is None
    path.write_text(json.dumps({**json.loads(path.read_text()), "manifest_digest": "0"}))
    log = tmp_path / "b.log"
    doit(repo, "run", "preprocess", log=log)
    assert calls(log) == {}
    assert state(repo) == before


def test_a_list_an_older_hfbuild_wrote_is_read_as_it_is(tmp_path: pathlib.Path) -> None:
    """Lists and a pack whose rows are in the file (as hfbuild wrote them before the
    compact form, their checksums of that) are served as they are: nothing is built, the
    results are the same, `verify --deep` passes."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    doit(repo, "run", "preprocess", log=tmp_path / "a.log")
    before = state(repo)
    older: dict[pathlib.Path, str] = {}
    for path in (repo.path / ".hfbuild" / "objects").glob("*/*/manifest.json"):
        doc = json.loads(path.read_text())
        if not any(isinstance(doc.get(k), dict) for k in ("shards", "pack")):
            continue
        ids = doc.pop("ids", None)
        doc = listform.expand(doc)
        doc["manifest_digest"] = manifest_digest(doc)
        path.write_text(json.dumps({**doc, "ids": ids}, sort_keys=True))
        older[path] = path.read_text()
    assert len(older) >= 5  # four stages' lists and the load's pack
    assert _whys(repo, *older) == [None] * len(older)
    log = tmp_path / "b.log"
    doit(repo, "run", "preprocess", log=log)
    assert calls(log) == {}
    assert state(repo) == before
    assert {p: p.read_text() for p in older} == older  # served, not written again
    out = run_hfbuild(repo, "verify", "--deep")
    assert out.returncode == 0, out.stdout + out.stderr


def test_compact_lists_are_pushed_and_pulled_to_a_fresh_clone(tmp_path: pathlib.Path) -> None:
    """The remote holds lists and the pack in the compact form; a clone with an empty store
    pulls them and builds nothing, its results and lock the same."""
    repo = make_project(Repo.init(tmp_path / "repo"))
    remote = tmp_path / "remote"
    env = {"HFBUILD_REMOTE": f"file://{remote}", "HFBUILD_PUSH": "1"}
    doit(repo, "run", "preprocess", log=tmp_path / "a.log", env=env)
    before = state(repo)
    forms = [
        json.loads(p.read_text()).get(k)
        for p in remote.rglob("manifest.json")
        for k in ("shards", "pack")
    ]
    assert sum(isinstance(f, dict) and f["form"] == listform.FORM for f in forms) >= 5
    assert not any(isinstance(f, list) and f for f in forms)
    clone = repo.clone(tmp_path / "clone")
    for p in (repo.path / "data").glob("*.parquet"):
        shutil.copy(p, clone.path / "data" / p.name)
    log = tmp_path / "b.log"
    doit(clone, "run", "preprocess", log=log, env={"HFBUILD_REMOTE": f"file://{remote}"})
    assert calls(log) == {}
    assert state(clone) == before
    assert (clone.path / "hfbuild.lock").read_bytes() == (repo.path / "hfbuild.lock").read_bytes()
    assert isinstance(json.loads(_list_path(clone, "raw").read_text())["shards"], dict)
    out = run_hfbuild(clone, "verify", "--deep")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    "labels",
    [
        [f"data/part-{i:05d}.parquet" for i in range(120)],
        [f"data/part-{i:05d}.parquet" for i in range(120)][::-1],
        ["a", "ab", "abc", "abd", "b", "", "b", "bcd", "bc", "x/y/z"],
        ["é😀a", "é😀b", "é", "é😀", ""],
    ],
)
def test_labels_are_front_coded_by_their_longest_shared_prefix(labels: list[str]) -> None:
    """Each label after the first is written as the length of the longest prefix it shares
    with the one before, then the rest: the same bytes whatever shortcut finds it."""
    lines, last = [], ""
    for s in labels:
        shared = next(
            (i for i, (x, y) in enumerate(zip(last, s, strict=False)) if x != y),
            min(len(last), len(s)),
        )
        lines.append(f"{shared}:{s[shared:]}")
        last = s
    assert listform._front(labels) == {"front": "\n".join(lines)}
    assert listform._labels(listform._front(labels), len(labels)) == labels
