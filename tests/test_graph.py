"""`hfbuild graph` (issue #22 item 5): the stage DAG as Mermaid, DOT and one HTML page, each
stage labelled with the state `hfbuild status` gives it. The outputs are parsed back here, so a
picture that drops a stage, an edge or a state, or breaks its own syntax, fails."""

from __future__ import annotations

import html.parser
import json
import pathlib
import re
import shutil
import subprocess
from typing import Any

import pytest

from hfbuild.cli import graph
from tests import shard_project
from tests.helpers import HFBUILD, Repo, run_hfbuild
from tests.pipeline_project import doit, make_project

ROOT = pathlib.Path(__file__).parent.parent
DEMO_EDGES = {
    ("raw", "paragraphs"),
    ("paragraphs", "tokens"),
    ("tokens", "kept"),
    ("kept", "split"),
}


@pytest.fixture
def demo(repo: Repo, tmp_path: pathlib.Path) -> Repo:
    """The repository's own demo pipeline (dodo.py, demo/, data/), built and committed."""
    shutil.copy(ROOT / "dodo.py", repo.path / "dodo.py")
    shutil.copytree(ROOT / "demo", repo.path / "demo", ignore=shutil.ignore_patterns("__py*"))
    shutil.copytree(ROOT / "data", repo.path / "data")
    repo.write({".gitignore": ".doit.db*\n__pycache__/\n"}, commit="demo")
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    repo.commit("built")
    return repo


def parse_mermaid(text: str) -> tuple[dict[str, list[str]], set[tuple[str, str]], dict[str, str]]:
    """(stage -> label lines, edges, stage -> class) of a `flowchart` as `graph.mermaid`
    writes it; any other line is an error."""
    lines = text.splitlines()
    assert lines[0] == "flowchart TD"
    names: dict[str, str] = {}  # Mermaid id -> stage
    labels: dict[str, list[str]] = {}
    edges, classes = set(), {}
    for ln in lines[1:]:
        if m := re.fullmatch(r'  (\w+)\["([^"]*)"\]', ln):
            parts = [re.sub(r"#(\d+);", lambda e: chr(int(e[1])), p) for p in m[2].split("<br/>")]
            names[m[1]] = parts[0]
            labels[parts[0]] = parts
        elif m := re.fullmatch(r"  (\w+) --> (\w+)", ln):
            edges.add((names[m[1]], names[m[2]]))
        elif m := re.fullmatch(r"  class ([\w,]+) (\w+)", ln):
            classes.update({names[i]: m[2] for i in m[1].split(",")})
        else:
            dash = r"(,stroke-dasharray:5 3)?"
            assert re.fullmatch(rf"  classDef \w+ fill:#\w+,stroke:#\w+,color:#\w+{dash}", ln), ln
    return labels, edges, classes


def parse_dot(text: str) -> tuple[dict[str, list[str]], set[tuple[str, str]], dict[str, str]]:
    """(stage -> label lines, edges, stage -> fill colour) of `graph.dot`'s digraph."""
    lines = text.splitlines()
    assert re.fullmatch(r'digraph "[\w-]+" \{', lines[0]) and lines[-1] == "}"
    q = r'"((?:[^"\\]|\\.)*)"'
    labels: dict[str, list[str]] = {}
    edges, fills = set(), {}
    for ln in lines[1:-1]:
        dashed = r'(, style="rounded,filled,dashed")?'
        if m := re.fullmatch(rf"  {q} \[label={q}, fillcolor={q}, color={q}{dashed}\];", ln):
            parts = re.split(r"(?<!\\)\\n", m[2])
            labels[m[1]] = [re.sub(r"\\(.)", r"\1", p) for p in parts]
            fills[m[1]] = m[3]
        elif m := re.fullmatch(rf"  {q} -> {q};", ln):
            edges.add((m[1], m[2]))
        else:
            assert ln in ("  rankdir=TB;", "") or ln.startswith("  node ["), ln
    return labels, edges, fills


def test_mermaid_and_dot_show_every_stage_edge_and_state_after_an_edit(demo: Repo) -> None:
    """The demo's five stages and four edges, each label holding the stage's kind, where it
    came from, its state in `status`'s words and its rows; after an edit of the transforms'
    module, the stages from `paragraphs` on are stale with `status`'s first reason (the
    edit for `paragraphs`; for those after it, that their input is rebuilt first: pending,
    drawn apart), `raw` still up to date; DOT says the same."""
    out = run_hfbuild(demo, "graph")
    assert out.returncode == 0, out.stderr
    labels, edges, classes = parse_mermaid(out.stdout)
    assert list(labels) == ["raw", "paragraphs", "tokens", "kept", "split"]
    assert edges == DEMO_EDGES
    assert set(classes.values()) == {"uptodate"}
    assert labels["raw"][1] == "load parquet data/pydoc_topics.parquet (1 file)"
    assert labels["tokens"][1] == "map demo.transforms:tokenize"
    assert all(lbl[2] == "up to date" for lbl in labels.values())
    lock = json.loads((demo.path / "hfbuild.lock").read_text())["stages"]
    assert labels["kept"][3].startswith(f"{lock['kept']['rows']:,} rows · ")
    assert labels["split"][3].startswith(
        f"train {lock['split']['rows']['train']:,}, test {lock['split']['rows']['test']:,} rows"
    )

    module = demo.path / "demo" / "transforms.py"
    module.write_text(module.read_text() + "\n# edited\n")
    status = {s["stage"]: s for s in json.loads(run_hfbuild(demo, "status", "--json").stdout)}
    for fmt in ("mermaid", "dot"):
        out = run_hfbuild(demo, "graph", "--format", fmt)
        assert out.returncode == 0, out.stderr
        labels, edges, colours = (parse_mermaid if fmt == "mermaid" else parse_dot)(out.stdout)
        assert list(labels) == ["raw", "paragraphs", "tokens", "kept", "split"], fmt
        assert edges == DEMO_EDGES, fmt
        assert labels["raw"][2] == "up to date", fmt
        assert status["paragraphs"]["reason"].startswith("code file demo/transforms.py changed")
        for stage in ("paragraphs", "tokens", "kept", "split"):
            s = status[stage]
            assert s["state"] == "stale"
            want = f"stale (from uncommitted changes): {s['reason']}"
            assert labels[stage][2] == want, (fmt, labels[stage])
            assert len(labels[stage]) == 3, "a stale stage has no rows or size to show"
        for stage, before in (("tokens", "paragraphs"), ("kept", "tokens"), ("split", "kept")):
            # each stage's own code is in the edited module too: named first (#24 item 5)
            code, waits = status[stage]["reason"].split("; ")
            assert code.startswith("code file demo/transforms.py changed"), status[stage]
            assert waits == f"input {before!r} is being rebuilt (may be cut off)"
        stale = {k for k, v in colours.items() if v != colours["raw"]}
        assert stale == {"paragraphs", "tokens", "kept", "split"}, fmt
        pending = {
            k for k, v in colours.items() if v not in (colours["raw"], colours["paragraphs"])
        }
        assert pending == {"tokens", "kept", "split"}, fmt


def test_a_failed_stage_shows_failed_and_what_is_built_from_it_blocked(
    demo: Repo, tmp_path: pathlib.Path
) -> None:
    """A stage whose build raised is "failed" with the error's first line, the stage after it
    "blocked", in the picture as in `status`."""
    module = demo.path / "demo" / "transforms.py"
    text = module.read_text().replace(
        "    return [n >= min_tokens",
        '    raise ValueError("no tokens today")\n    return [n >= min_tokens',
    )
    module.write_text(text)
    out = doit(demo, "run", "preprocess", log=tmp_path / "calls.log", check=False)
    assert out.returncode != 0
    labels, edges, classes = parse_mermaid(run_hfbuild(demo, "graph").stdout)
    assert edges == DEMO_EDGES
    assert classes["kept"] == "failed" and classes["split"] == "blocked"
    assert labels["kept"][2].startswith("failed: its last build failed: ")
    assert "no tokens today" in labels["kept"][2]
    assert labels["split"][2] == "blocked: input 'kept' failed"
    assert classes["tokens"] == "dirty"  # rebuilt from the edited module, not committed
    assert labels["tokens"][2] == "up to date (from uncommitted changes)"
    dot_labels, _, fills = parse_dot(run_hfbuild(demo, "graph", "--format", "dot").stdout)
    assert dot_labels["kept"][2] == labels["kept"][2] and fills["kept"] != fills["tokens"]


class PageParser(html.parser.HTMLParser):
    """Every start tag with its attributes; the text of the table's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        if tag == "td":
            self._cell = []
        if tag not in ("meta", "br"):  # the void elements the page has
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None
        assert self.stack and self.stack[-1] == tag, (self.stack, tag)
        self.stack.pop()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_html_page_is_self_contained_and_shows_every_stage(repo: Repo) -> None:
    """`--html FILE` (relative to where hfbuild runs) writes a page that parses with every
    tag closed, requests nothing (no script at all, no http(s) src/href, no @import or url()
    in its style), and holds one box per stage, one curve per edge (a fork: raw feeds feat
    and lens) and a table row per stage with its state. A page it cannot write is a user
    error saying so (exit 1), not a traceback."""
    make_project(repo)
    repo.write({".gitignore": ".doit.db*\n"}, commit="ignore")
    doit(repo, "run", "preprocess", log=repo.path / ".." / "calls.log")
    (repo.path / "pkg" / "text.py").write_text(
        (repo.path / "pkg" / "text.py").read_text().replace("scale", "factor")
    )
    (repo.path / "sub").mkdir()
    out = subprocess.run(
        [HFBUILD, "graph", "--dodo", "../dodo.py", "--html", "p.html"],
        cwd=repo.path / "sub",
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    page = (repo.path / "sub" / "p.html").read_text()
    assert out.stdout == f"wrote {repo.path / 'sub' / 'p.html'} (5 stages)\n"
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], "every element closed"
    tags = parser.tags
    assert not [t for t, _ in tags if t in ("script", "link", "img", "iframe", "object")]
    for tag, attrs in tags:
        for k, v in attrs.items():
            if k in ("src", "href") or k.endswith(":href"):
                assert not re.match(r"\s*(https?:)?//", v or ""), (tag, k, v)
    style = page[page.index("<style>") : page.index("</style>")]
    assert "@import" not in style and "url(" not in style
    boxes = [a["data-stage"] for t, a in tags if t == "g" and a.get("data-stage")]
    assert boxes == ["raw", "feat", "kept", "split", "lens"]
    curves = {(a["data-from"], a["data-to"]) for t, a in tags if t == "path" and "data-from" in a}
    assert curves == {("raw", "feat"), ("feat", "kept"), ("kept", "split"), ("raw", "lens")}
    rects = [(float(a["x"] or 0), float(a["y"] or 0)) for t, a in tags if t == "rect"]
    assert len(set(rects)) == 5, "no two boxes at one place"
    table = {r[0]: r for r in parser.rows if r}
    assert list(table) == ["raw", "feat", "kept", "split", "lens"]
    assert table["lens"][3].startswith("stale (from uncommitted changes): code file pkg/text.py")
    assert table["feat"][3] == "up to date" and table["feat"][4] == "40 rows"
    assert table["raw"][7] == "parquet data/*.parquet (1 file)"
    bad = run_hfbuild(repo, "graph", "--html", "no/such/dir/p.html")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("hfbuild: error: cannot write the graph page to ")


def test_labels_with_syntax_characters_round_trip() -> None:
    """A reason holding quotes, `#`, `<`, `&`, a backslash and a newline reads back from the
    Mermaid and DOT text as it was (whitespace runs as one space)."""
    reason = "argument \"q\" changed: 'a#1;' -> <b & c>\\n \\ end\nnext"
    node = graph.Node("end", "map", ("my-raw",), "stale", reason, origin=("pkg.m:f",))
    raw = graph.Node("my-raw", "load", (), "up to date", None, rows=3, size=1234)
    labels, edges, _ = parse_mermaid(graph.mermaid([raw, node]))
    want = "stale: " + " ".join(reason.split())
    assert labels["end"] == ["end", "map pkg.m:f", want] and edges == {("my-raw", "end")}
    assert labels["my-raw"] == ["my-raw", "load", "up to date", "3 rows · 1.2 kB"]
    labels, edges, _ = parse_dot(graph.dot([raw, node]))
    assert labels["end"] == ["end", "map pkg.m:f", want] and edges == {("my-raw", "end")}


def test_origin_counts_files_of_every_split() -> None:
    """A load's origin names its data_files as given and the files they matched in all
    splits; without the pattern (a record written before it was kept), the count alone."""
    doc: dict[str, Any] = {
        "data": {
            "builder": "json",
            "files": {"test": [["t", "1"]], "train": [["a", "2"], ["b", "3"]]},
        }
    }
    given = {"train": ["a", "b*"], "test": "t"}
    assert graph.origin("load", {"data_files": given}, doc) == (
        "json train=a, b*, test=t (3 files)",
    )
    assert graph.origin("load", {}, doc) == ("json (3 files)",)


def test_the_record_keeps_data_files_as_json_reads_them(repo: Repo) -> None:
    """The pipeline's shape, which the no-import record stores and compares with, holds a
    load's data_files as JSON gives them back (a tuple a list, a path a string): otherwise a
    record is never confirmed (or never written) and `graph` always imports dodo.py."""
    from hfbuild import Pipeline

    pipe = Pipeline(str(repo.path / ".store"), root=str(repo.path))
    pipe.load("a", "json", data_files=(pathlib.Path("data/a.jsonl"), "data/b-*.jsonl"))
    pipe.load("b", "csv", data_files={"train": ("x.csv",), "test": "y.csv"})
    shape = pipe.shape()
    assert json.loads(json.dumps(shape)) == shape
    assert [s["data_files"] for s in shape["stages"]] == [
        ["data/a.jsonl", "data/b-*.jsonl"],
        {"train": ["x.csv"], "test": "y.csv"},
    ]


def test_shard_counts_before_and_after_a_file_is_added(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A sharded stage shows its shards; once a data file is added, the shards its new key
    has and how many of them the store lacks (`--format json` gives the same numbers)."""
    shard_project.make_project(repo, parts=3)
    repo.write({".gitignore": ".doit.db*\n"}, commit="ignore")
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    labels, _, _ = parse_mermaid(run_hfbuild(repo, "graph").stdout)
    assert labels["raw"][1] == "load parquet data/*.parquet (3 files)"
    assert labels["raw"][3].startswith("30 rows · ") and labels["raw"][3].endswith(" · 3 shards")
    assert labels["feat"][3].endswith(" · 3 shards")
    shard_project.write_part(repo, "part-3", 300)
    labels, _, _ = parse_mermaid(run_hfbuild(repo, "graph").stdout)
    assert labels["raw"][1] == "load parquet data/*.parquet (4 files)"
    assert labels["raw"][2].startswith("stale (from uncommitted changes): ")
    assert labels["raw"][3] == "4 shards, 1 to build"
    assert labels["feat"][3] == "4 shards"  # pending: its shards' keys wait for raw's result
    assert labels["feat"][2].endswith("input 'raw' is being rebuilt (may be cut off)")
    doc = json.loads(run_hfbuild(repo, "graph", "--format", "json").stdout)
    shards = {s["stage"]: s["shards"] for s in doc["stages"]}
    assert shards["raw"] == [3, 4] and shards["feat"] == [None, 4]
    assert ["raw", "feat"] in doc["edges"]
