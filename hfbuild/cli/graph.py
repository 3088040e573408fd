"""A picture of the pipeline: the stage DAG as Mermaid, DOT, JSON or one self-contained HTML
page, each stage labelled with its state as `hfbuild status` words it, its rows, size, shard
counts and where it came from.

Owns: `Node` (the few values a picture shows of one stage), `origin` (a stage's "where it came
from" line, from its options and manifest), and the text of each format, including the HTML
page's SVG, drawn here from a layered layout (no script, no external request: it reads offline).
Must never: take the `Pipeline`, read the store, git or the file system, print, or import
`datasets`. Every function is pure: the same nodes give the same text.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from hfbuild.core.spec import rows_text


class Node(NamedTuple):
    stage: str
    kind: str  # load | map | filter | apply
    inputs: tuple[str, ...]
    # As `report.StageState`: "up to date" | "dirty" | "stale" | "failed" | "blocked"
    state: str
    reason: str | None  # stale: the first reason; failed/blocked: why
    dirty_files: tuple[str, ...] = ()
    rows: Any = None  # as the store records them (an int, or split -> int); None: not built
    size: int | None = None  # bytes of its result that no stage before it counts (`du`)
    # A sharded stage: (shards of its key stored, shards in all); stored is None while its key
    # waits for an input's result (`pending`: which of its shards to build is not known yet).
    shards: tuple[int | None, int] | None = None
    origin: tuple[str, ...] = ()  # where it came from (`origin`)
    # A stale stage whose key waits for this input's result (early cutoff: it may turn out
    # up to date once the input is built). `status` words it as stale; the picture marks it.
    pending: str | None = None


def origin(
    kind: str,
    options: Mapping[str, Any],
    doc: Mapping[str, Any],
    ref: str | None = None,
    hub: Sequence[Mapping[str, str]] = (),
) -> tuple[str, ...]:
    """Where a stage came from, one line each: a load's builder, its data_files as given (when
    the pipeline at hand knows them) and how many files they matched (from the manifest
    `doc`); a transform's function as `module:qualname` (from `doc`, else the stage's `ref`
    when it has no manifest). A kind of source other than data files (a Hub dataset, say)
    adds its own branch here, reading its part of `doc`. A Hub load (`hub`: the manifest's
    pins, hub.py) adds a line per revision with the commit it resolved to."""
    data = doc.get("data")
    if kind == "load" and isinstance(data, Mapping):
        files = data.get("files")
        count = (
            sum(len(v) for v in files.values() if isinstance(v, list))
            if isinstance(files, Mapping)
            else len(files)
            if isinstance(files, list)
            else 0
        )
        given = options.get("data_files")
        patterns = _patterns(given) if given is not None else ""
        what = f"{data.get('builder')} {patterns}".rstrip()
        pins = tuple(
            f"{p['repo']}@{p['revision']}: commit {p['commit'][:12]}"
            if p["revision"] != p["commit"]
            else f"{p['repo']} commit {p['commit'][:12]}"
            for p in hub
        )
        return (f"{what} ({count:,} {'file' if count == 1 else 'files'})", *pins)
    code = doc.get("code")
    target = code.get("target") if isinstance(code, Mapping) else None
    if isinstance(target, Mapping) and target.get("module") and target.get("qualname"):
        return (f"{target['module']}:{target['qualname']}",)
    return (ref,) if ref else ()


def _patterns(given: Any) -> str:
    if isinstance(given, str):
        return given
    if isinstance(given, Mapping):
        return ", ".join(f"{k}={_patterns(v)}" for k, v in given.items())
    if isinstance(given, (list, tuple)):
        return ", ".join(_patterns(v) for v in given)
    return str(given)


def state_text(node: Node) -> str:
    """The state in `hfbuild status`'s words: "up to date", "stale: <first reason>",
    "failed: <why>", "blocked: <why>", with "(from uncommitted changes)" when its key holds
    uncommitted files."""
    dirty = " (from uncommitted changes)" if node.dirty_files else ""
    if node.state in ("failed", "blocked"):
        return f"{node.state}: {node.reason}"
    if node.state == "stale":
        return f"stale{dirty}: {node.reason}"
    return f"up to date{dirty}"


def size_text(n: int) -> str:
    """Bytes in SI units as `du -h --si` gives them: 950 B, 12.3 kB, 4.0 MB."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{n:,} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError(n)


def facts_text(node: Node) -> str:
    """`40 rows · 1.2 kB · 3 shards`; what is not known (a stage not built) is left out, but
    the shard count, which the key knows before a build (`3 shards, 1 to build`; which are to
    build is not known while the stage is pending)."""
    parts = []
    if node.rows is not None:
        parts.append(rows_text(node.rows))
    if node.size is not None:
        parts.append(size_text(node.size))
    if node.shards is not None:
        stored, total = node.shards
        text = f"{total:,} {'shard' if total == 1 else 'shards'}"
        done = stored is None or stored == total
        parts.append(text if done else f"{text}, {total - (stored or 0):,} to build")
    return " · ".join(parts)


def lines(node: Node) -> list[str]:
    """The label's lines: name, kind and origin, state, facts."""
    head = " ".join([node.kind, *node.origin])
    return [x for x in (node.stage, head, state_text(node), facts_text(node)) if x]


_CLASSES = {
    "up to date": "uptodate",
    "dirty": "dirty",
    "stale": "stale",
    "pending": "pending",
    "failed": "failed",
    "blocked": "blocked",
}
# (fill, stroke) of each state, in every format.
_COLOURS = {
    "uptodate": ("#e6f4ea", "#1e8e3e"),
    "dirty": ("#e8f0fe", "#1a73e8"),
    "stale": ("#fef7e0", "#e37400"),
    "pending": ("#fffdf5", "#e37400"),
    "failed": ("#fce8e6", "#d93025"),
    "blocked": ("#f1f3f4", "#d93025"),
}
# Mermaid words a node id must not be: the parser reads them as syntax.
_MERMAID_WORDS = frozenset(
    [
        "end",
        "graph",
        "subgraph",
        "flowchart",
        "style",
        "class",
        "classdef",
        "click",
        "linkstyle",
        "direction",
        "default",
        "call",
        "href",
        "interpolate",
    ]
)
_PLAIN_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _class(node: Node) -> str:
    if node.state == "stale" and node.pending is not None:
        return "pending"
    return _CLASSES.get(node.state, "stale")


def _mermaid_ids(nodes: Sequence[Node]) -> dict[str, str]:
    """A Mermaid id per stage: its name when that is a plain identifier and no Mermaid word,
    else `s<position>_<name with '-' as '_'>` (stage names are letters, digits, '_', '-')."""
    out = {}
    for i, n in enumerate(nodes):
        plain = _PLAIN_ID.match(n.stage) and n.stage.lower() not in _MERMAID_WORDS
        out[n.stage] = n.stage if plain else f"s{i}_{re.sub(r'[^A-Za-z0-9_]', '_', n.stage)}"
    return out


def _mermaid_text(text: str) -> str:
    """Text inside a quoted Mermaid label: the characters its parser or its HTML labels
    would read as syntax written as Mermaid entity codes (`#34;`)."""
    return re.sub(r'["#<>&`]', lambda m: f"#{ord(m.group())};", " ".join(text.split()))


def mermaid(nodes: Sequence[Node]) -> str:
    """A Mermaid flowchart (top to bottom): one node per stage labelled with `lines`, one edge
    per input, one class per state."""
    ids = _mermaid_ids(nodes)
    out = ["flowchart TD"]
    for n in nodes:
        label = "<br/>".join(_mermaid_text(x) for x in lines(n))
        out.append(f'  {ids[n.stage]}["{label}"]')
    for n in nodes:
        out.extend(f"  {ids[i]} --> {ids[n.stage]}" for i in n.inputs if i in ids)
    used = sorted({_class(n) for n in nodes})
    for c in used:
        fill, stroke = _COLOURS[c]
        dash = ",stroke-dasharray:5 3" if c == "pending" else ""
        out.append(f"  classDef {c} fill:{fill},stroke:{stroke},color:#202124{dash}")
    for c in used:
        members = ",".join(ids[n.stage] for n in nodes if _class(n) == c)
        out.append(f"  class {members} {c}")
    return "\n".join(out) + "\n"


def _dot_text(text: str) -> str:
    return " ".join(text.split()).replace("\\", "\\\\").replace('"', '\\"')


def dot(nodes: Sequence[Node], name: str = "pipeline") -> str:
    """A Graphviz digraph: one box per stage (its name the node id), one edge per input."""
    out = [
        f'digraph "{_dot_text(name)}" {{',
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11];',
    ]
    for n in nodes:
        fill, stroke = _COLOURS[_class(n)]
        label = "\\n".join(_dot_text(x) for x in lines(n))
        dashed = ', style="rounded,filled,dashed"' if _class(n) == "pending" else ""
        out.append(
            f'  "{n.stage}" [label="{label}", fillcolor="{fill}", color="{stroke}"{dashed}];'
        )
    names = {n.stage for n in nodes}
    for n in nodes:
        out.extend(f'  "{i}" -> "{n.stage}";' for i in n.inputs if i in names)
    out.append("}")
    return "\n".join(out) + "\n"


def as_json(nodes: Sequence[Node]) -> str:
    """The nodes (with their `state_text`) and the edges as JSON."""
    doc = {
        "stages": [n._asdict() | {"text": state_text(n)} for n in nodes],
        "edges": [[i, n.stage] for n in nodes for i in n.inputs],
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


# -- the HTML page --------------------------------------------------------------------------------

_BOX_W, _LINE_H, _PAD, _GAP_X, _GAP_Y, _MARGIN = 300, 17, 10, 40, 56, 20
_CHARS = 44  # characters of a 12px sans-serif line that fit a box; longer lines are cut


def layout(nodes: Sequence[Node]) -> dict[str, tuple[int, int]]:
    """(layer, position in the layer) of each stage: its layer is one more than its deepest
    input's; within a layer, stages are ordered by the mean position of their inputs, then by
    pipeline order."""
    layer: dict[str, int] = {}
    for n in nodes:  # a pipeline defines each stage after its inputs
        layer[n.stage] = 1 + max((layer[i] for i in n.inputs if i in layer), default=-1)
    pos: dict[str, tuple[int, int]] = {}
    for depth in range(max(layer.values(), default=-1) + 1):
        here = [(k, n) for k, n in enumerate(nodes) if layer[n.stage] == depth]

        def mean(item: tuple[int, Node]) -> tuple[float, int]:
            seen = [pos[i][1] for i in item[1].inputs if i in pos]
            return (sum(seen) / len(seen) if seen else -1.0, item[0])

        for j, (_, n) in enumerate(sorted(here, key=mean)):
            pos[n.stage] = (depth, j)
    return pos


def _cut(text: str) -> str:
    return text if len(text) <= _CHARS else text[: _CHARS - 1] + "…"


def svg(nodes: Sequence[Node]) -> str:
    """The picture as an inline SVG: boxes in layers, a curve from each input to its stage.
    A line longer than a box is cut; the box's tooltip (`<title>`) holds it whole."""
    pos = layout(nodes)
    if not nodes:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="0" height="0"></svg>'
    depth = 1 + max(d for d, _ in pos.values())
    heights = {n.stage: _PAD * 2 + _LINE_H * len(lines(n)) for n in nodes}
    row_h = [
        max((heights[n.stage] for n in nodes if pos[n.stage][0] == k), default=0)
        for k in range(depth)
    ]
    tops = [_MARGIN + sum(row_h[:k]) + k * _GAP_Y for k in range(depth)]
    # Each box as near the mean of its inputs' as the boxes left of it allow; each layer then
    # moved as a whole so that its mean is theirs (a chain stays straight, a fork centred).
    left: dict[str, float] = {}
    for k in range(depth):
        here = sorted((n for n in nodes if pos[n.stage][0] == k), key=lambda n: pos[n.stage][1])
        want: list[float] = []
        placed: list[float] = []
        for n in here:
            seen = [left[i] for i in n.inputs if i in left]
            after = placed[-1] + _BOX_W + _GAP_X if placed else None
            wish = sum(seen) / len(seen) if seen else (after if after is not None else 0.0)
            want.append(wish)
            placed.append(wish if after is None else max(wish, after))
        shift = (sum(want) - sum(placed)) / len(placed)
        left.update({n.stage: x + shift for n, x in zip(here, placed, strict=True)})
    low = min(left.values())
    box = {s: (round(x - low) + _MARGIN, tops[pos[s][0]]) for s, x in left.items()}
    width = max(x for x, _ in box.values()) + _BOX_W + _MARGIN
    height = tops[-1] + row_h[-1] + _MARGIN
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="stage graph">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" '
        'fill="#5f6368"/></marker></defs>',
    ]
    for n in nodes:
        x2, y2 = box[n.stage][0] + _BOX_W // 2, box[n.stage][1]
        for i in n.inputs:
            if i not in box:
                continue
            x1, y1 = box[i][0] + _BOX_W // 2, box[i][1] + heights[i]
            mid = (y1 + y2) // 2
            out.append(
                f'<path class="edge" data-from="{html.escape(i)}" data-to="{html.escape(n.stage)}"'
                f' d="M {x1} {y1} C {x1} {mid}, {x2} {mid}, {x2} {y2}" fill="none" '
                f'stroke="#5f6368" stroke-width="1.5" marker-end="url(#arrow)"/>'
            )
    for n in nodes:
        x, y = box[n.stage]
        fill, stroke = _COLOURS[_class(n)]
        text = lines(n)
        out.append(f'<g class="stage {_class(n)}" data-stage="{html.escape(n.stage)}">')
        out.append(f"<title>{html.escape(chr(10).join(text))}</title>")
        out.append(
            f'<rect x="{x}" y="{y}" width="{_BOX_W}" height="{heights[n.stage]}" rx="8" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"'
            + (' stroke-dasharray="5 3"/>' if _class(n) == "pending" else "/>")
        )
        for k, t in enumerate(text):
            weight = ' font-weight="bold"' if k == 0 else ""
            out.append(
                f'<text x="{x + _PAD}" y="{y + _PAD + _LINE_H * (k + 1) - 4}" '
                f'font-size="12"{weight}>{html.escape(_cut(t))}</text>'
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)


def _shards_cell(shards: tuple[int | None, int] | None) -> str:
    if shards is None:
        return ""
    stored, total = shards
    if stored is None:
        return f"{total:,} (which to build: once its input is)"
    return f"{stored:,} of {total:,} stored"


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 2em; color: #202124; }
svg text { font-family: inherit; fill: #202124; }
table { border-collapse: collapse; margin-top: 1.5em; }
th, td { border: 1px solid #dadce0; padding: 4px 8px; text-align: left; vertical-align: top;
         font-size: 13px; }
th { background: #f1f3f4; }
td.num { text-align: right; white-space: nowrap; }
pre { background: #f8f9fa; padding: 1em; overflow-x: auto; }
""" + "".join(
    f"tr.{c} td.state {{ background: {fill}; border-left: 4px solid {stroke}; }}\n"
    for c, (fill, stroke) in _COLOURS.items()
)


def page(nodes: Sequence[Node], title: str) -> str:
    """One HTML page holding everything it shows: the SVG picture, a table of the stages and
    the Mermaid and DOT text. No script, no stylesheet or image from elsewhere."""
    rows = []
    for n in nodes:
        cells = [
            html.escape(n.stage),
            html.escape(n.kind),
            html.escape(", ".join(n.inputs)),
            html.escape(state_text(n))
            + (
                "<br>uncommitted: " + html.escape(", ".join(n.dirty_files)) if n.dirty_files else ""
            ),
            html.escape(rows_text(n.rows) if n.rows is not None else ""),
            html.escape(size_text(n.size) if n.size is not None else ""),
            html.escape(_shards_cell(n.shards)),
            html.escape("; ".join(n.origin)),
        ]
        klass = ("", "", "", ' class="state"', ' class="num"', ' class="num"', ' class="num"', "")
        tds = "".join(f"<td{k}>{c}</td>" for k, c in zip(klass, cells, strict=True))
        rows.append(f'<tr class="{_class(n)}">{tds}</tr>')
    head = "".join(
        f"<th>{h}</th>"
        for h in ("stage", "kind", "inputs", "state", "rows", "size", "shards", "from")
    )
    t = html.escape(title)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{t}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{t}</h1>\n{svg(nodes)}\n"
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n"
        "</table>\n"
        "<details><summary>Mermaid</summary>\n"
        f"<pre>{html.escape(mermaid(nodes))}</pre></details>\n"
        "<details><summary>DOT</summary>\n"
        f"<pre>{html.escape(dot(nodes, title))}</pre></details>\n"
        "</body>\n</html>\n"
    )
