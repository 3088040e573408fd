"""How a stage's list of shards and a pack's rows are written in a manifest, and read back.

Owns: the compact form of a manifest's `shards` (a stage's list: `[split, key, label, files,
facts]` rows), `pack` (a pack's `[key, from, to, content hash, label]` rows) and its key's
data files (`manifest.data.files`: a load's `[name, blob id]` pairs) in the file
(`compact`), the rows again from it (`expand`), and whether a manifest read back and
expanded still matches its checksum (`digest_holds`). In the compact form what many rows
share is written once: a list names each (split, files, facts other than the row's own) once
in `common` (a pack's files, stamp, form and key, once per pack), and each row by its
position there, its key, label, rows, span start, content hash and input, column by column:
a column of hex digests of one width as one base64 string of their bytes, a column of one
value once, labels front-coded (each the length of the prefix it shares with the one
before, then the rest). Everything else is as before. Every reader of a manifest is given
the rows (`entry.py`, `remotefiles.py` expand what they read), so none sees the form; a
manifest's checksum is of what the file holds. A list written by an older hfbuild (rows in
the file) is read as it is.

Must never: lose or change a row (`expand(compact(doc))` equals `doc`; a row it cannot
write compactly is kept as a list), accept a malformed compact form (ValueError), import
`datasets`.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

FORM = 2  # the compact form's version: written as `{"form": 2, ...}` in place of the rows

# A list row's facts that are the row's own, written as columns (the rest is `common`).
_OWN = ("content_hash", "input", "rows", "span", "before")
_HEX = frozenset("0123456789abcdef")
_NO_SPAN = object()  # a list row without a span


def compact(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` as its file holds it: its list of shards' and pack's rows compact (a copy;
    `doc` itself is left as it is). Rows not of the expected shape are kept as they are."""
    out = doc
    rows = doc.get("shards")
    if isinstance(rows, list) and rows and all(_list_row(r) for r in rows):
        out = {**out, "shards": _compact_list(rows)}
    rows = doc.get("pack")
    if isinstance(rows, list) and rows and all(_pack_row(r) for r in rows):
        out = {**out, "pack": _compact_pack(rows)}
    key = doc.get("manifest")
    data = key.get("data") if isinstance(key, dict) else None
    files: Any = data.get("files") if isinstance(data, dict) else None
    written: Any = files
    if _names(files):  # one list of [name, blob id]
        written = _compact_files(files)
    elif isinstance(files, dict) and not _is_files(files):  # split -> its list
        written = {s: _compact_files(f) if _names(f) else f for s, f in files.items()}
    if written != files:
        assert isinstance(key, dict) and isinstance(data, dict)
        out = {**out, "manifest": {**key, "data": {**data, "files": written}}}
    return out


def expand(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` (as its file holds it) with its list's and pack's rows as rows again, in
    place; ValueError when a compact form is malformed."""
    rows = doc.get("shards")
    if isinstance(rows, dict):
        doc["shards"] = _expand_list(rows)
    rows = doc.get("pack")
    if isinstance(rows, dict):
        doc["pack"] = _expand_pack(rows)
    key = doc.get("manifest")
    data = key.get("data") if isinstance(key, dict) else None
    files: Any = data.get("files") if isinstance(data, dict) else None
    read: Any = files
    if _is_files(files):
        read = _expand_files(files)
    elif isinstance(files, dict):  # split -> its list
        read = {s: _expand_files(f) if _is_files(f) else f for s, f in files.items()}
    if read != files:  # a copy: the key's manifest may be shared with its stage
        assert isinstance(key, dict) and isinstance(data, dict)
        doc["manifest"] = {**key, "data": {**data, "files": read}}
    return doc


def digest_holds(doc: dict[str, Any]) -> bool:
    """Whether `doc`, a manifest read and expanded, matches its checksum: as it is (rows in
    the file: an older hfbuild's list, or no list), or in its compact form."""
    from hfbuild.store.paths import manifest_digest

    want = doc.get("manifest_digest")
    return want == manifest_digest(doc) or want == manifest_digest(compact(doc))


# -- the shapes ---------------------------------------------------------------------------------


def _list_row(r: Any) -> bool:
    return (
        isinstance(r, list)
        and len(r) == 5
        and isinstance(r[0], str)
        and isinstance(r[1], str)
        and isinstance(r[2], str)
        and isinstance(r[3], dict)
        and isinstance(r[4], dict)
    )


def _pack_row(r: Any) -> bool:
    return (
        isinstance(r, list)
        and len(r) == 5
        and isinstance(r[0], str)
        and type(r[1]) is int
        and type(r[2]) is int
        and isinstance(r[4], str)
    )


# -- columns ------------------------------------------------------------------------------------


def _column(values: list[Any]) -> dict[str, Any]:
    """A column: one value for all, hex digests of one width as base64 of their bytes, or
    the values."""
    first = values[0]
    if all(v == first and type(v) is type(first) for v in values):
        return {"all": first}
    if isinstance(first, str) and first and len(first) % 2 == 0:
        width = len(first)
        if all(type(v) is str and len(v) == width for v in values) and _HEX.issuperset(
            whole := "".join(values)  # one pass over every digit, in C
        ):
            raw = bytes.fromhex(whole)
            return {"hex": width, "b64": base64.b64encode(raw).decode("ascii")}
    return {"list": values}


def _values(col: Any, n: int) -> list[Any]:
    """A column's `n` values (ValueError when it is not a column of `n`)."""
    if not isinstance(col, dict) or len(col) not in (1, 2):
        raise ValueError("not a column")
    if "all" in col:
        return [col["all"]] * n
    if "list" in col:
        values = col["list"]
        if not isinstance(values, list) or len(values) != n:
            raise ValueError("a column of another length")
        return values
    width, text = col.get("hex"), col.get("b64")
    if type(width) is not int or width <= 0 or width % 2 or not isinstance(text, str):
        raise ValueError("a malformed hex column")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("a malformed hex column") from e
    size = width // 2
    if len(raw) != size * n:
        raise ValueError("a hex column of another length")
    whole = raw.hex()
    return [whole[i : i + width] for i in range(0, n * width, width)]


def _front(labels: list[str]) -> dict[str, Any]:
    """Labels front-coded, when none holds a line break: `<shared>:<rest>` lines."""
    if any("\n" in s for s in labels):
        return {"list": labels}
    lines, last, shared = [], "", 0
    for s in labels:
        shared = _shared(last, s, shared)
        lines.append(f"{shared}:{s[shared:]}")
        last = s
    return {"front": "\n".join(lines)}


def _shared(a: str, b: str, guess: int = 0) -> int:
    """The length of the prefix `a` and `b` share: `guess` when it is (sorted names: most
    often the last pair's), else by halving, each step one comparison of slices (in C), not
    one per character."""
    hi = min(len(a), len(b))
    if 0 < guess <= hi and a[:guess] == b[:guess] and (guess == hi or a[guess] != b[guess]):
        return guess
    lo = 0  # a[:lo] == b[:lo]; the answer is <= hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _labels(col: Any, n: int) -> list[str]:
    if isinstance(col, dict) and set(col) == {"front"} and isinstance(col["front"], str):
        out: list[str] = []
        last = ""
        for line in col["front"].split("\n") if n else []:
            shared, sep, rest = line.partition(":")
            k = int(shared) if sep and shared.isdigit() else -1
            if not 0 <= k <= len(last):
                raise ValueError("a malformed label column")
            last = last[:k] + rest
            out.append(last)
        if len(out) != n:
            raise ValueError("a label column of another length")
        return out
    values = _values(col, n)
    if not all(isinstance(v, str) for v in values):
        raise ValueError("a label that is not a string")
    return values


# -- a stage's list -----------------------------------------------------------------------------


def _compact_list(rows: list[list[Any]]) -> dict[str, Any]:
    import json

    n = len(rows)
    own = [f for f in _OWN if all(f in r[4] for r in rows)]
    starts: list[Any] | None = None
    if "rows" in own and any("span" in r[4] for r in rows):
        # A span follows from the row's start and rows; a row without one (a shard stored
        # by itself among packed ones: a rebuild after an append) has no start (null).
        spans = [(r[4].get("span", _NO_SPAN), r[4]["rows"]) for r in rows]
        if all(
            s is _NO_SPAN
            or (
                isinstance(s, list)
                and len(s) == 2
                and type(s[0]) is int
                and type(k) is int
                and s[1] == s[0] + k
            )
            for s, k in spans
        ):
            starts = [None if s is _NO_SPAN else s[0] for s, _ in spans]
            own = [*own, "span"] if "span" not in own else own
    common: list[list[Any]] = []
    picks: list[int] = []
    skip = set(own) - ({"span"} if starts is None else set())
    # What rows share, by its JSON: the split, the files (a pack's rows hold one files
    # dict: encoded once per object, which `rows` keeps alive) and the other facts (a
    # pack's rows, as read, hold the same objects: encoded once per the objects' ids).
    files_text: dict[int, str] = {}
    facts_text: dict[tuple[Any, ...], str] = {}
    where: dict[tuple[str, str, str], int] = {}
    for r in rows:
        rest = {k: v for k, v in r[4].items() if k not in skip}
        files = files_text.get(id(r[3]))
        if files is None:
            files = files_text[id(r[3])] = json.dumps(r[3], sort_keys=True)
        ids = (*rest, *map(id, rest.values()))
        facts = facts_text.get(ids)
        if facts is None:
            facts = facts_text[ids] = json.dumps(rest, sort_keys=True)
        text = (r[0], files, facts)
        i = where.get(text)
        if i is None:
            i = where[text] = len(common)
            common.append([r[0], r[3], rest])
        picks.append(i)
    out: dict[str, Any] = {
        "form": FORM,
        "n": n,
        "common": common,
        "at": _column(picks),
        "key": _column([r[1] for r in rows]),
        "label": _front([r[2] for r in rows]),
    }
    cols = {f: _column([r[4][f] for r in rows]) for f in own if f != "span"}
    if starts is not None:
        cols["span"] = _column(starts)
    out["facts"] = cols
    return out


def _expand_list(doc: dict[str, Any]) -> list[list[Any]]:
    if doc.get("form") != FORM:
        raise ValueError(f"a list of shards in an unknown form ({doc.get('form')!r})")
    n, common, facts = doc.get("n"), doc.get("common"), doc.get("facts")
    if type(n) is not int or n < 0 or not isinstance(common, list):
        raise ValueError("a malformed list of shards")
    if not isinstance(facts, dict) or not set(facts) <= set(_OWN):
        raise ValueError("a malformed list of shards")
    for c in common:
        if not (
            isinstance(c, list)
            and len(c) == 3
            and isinstance(c[0], str)
            and isinstance(c[1], dict)
            and isinstance(c[2], dict)
        ):
            raise ValueError("a malformed list of shards")
    picks = _values(doc.get("at"), n)
    keys = _values(doc.get("key"), n)
    labels = _labels(doc.get("label"), n)
    cols = {f: _values(col, n) for f, col in facts.items()}
    spans = cols.pop("span", None)
    if spans is not None:
        counts = cols.get("rows")
        if (
            counts is None
            or not all(type(v) is int for v in counts)
            or not all(v is None or type(v) is int for v in spans)
            or all(v is None for v in spans)
        ):
            raise ValueError("a malformed span column")
    names = sorted(cols)
    columns = [(f, cols[f]) for f in names]
    # Per common entry, its facts with the row's own in sorted order (as a file read
    # gives them), copied per row and filled in.
    templates = []
    for split, files, rest in common:
        base = {**rest, **dict.fromkeys(names)}
        if spans is not None:
            base["span"] = None
        templates.append((split, files, dict(sorted(base.items()))))
    out: list[list[Any]] = []
    size = len(common)
    for i in range(n):
        at = picks[i]
        if type(at) is not int or not 0 <= at < size or not isinstance(keys[i], str):
            raise ValueError("a malformed list of shards")
        split, files, base = templates[at]
        row = base.copy()
        for f, c in columns:
            row[f] = c[i]
        if spans is None:
            pass
        elif (start := spans[i]) is None:
            del row["span"]  # a row without a span (the others' keys stay in order)
        else:
            row["span"] = [start, start + row["rows"]]
        out.append([split, keys[i], labels[i], files, row])
    return out


# -- a pack's rows ------------------------------------------------------------------------------


def _compact_pack(rows: list[list[Any]]) -> dict[str, Any]:
    starts = [r[1] for r in rows]
    counts = [r[2] - r[1] for r in rows]
    following = all(starts[i] == starts[i - 1] + counts[i - 1] for i in range(1, len(rows)))
    return {
        "form": FORM,
        "n": len(rows),
        "key": _column([r[0] for r in rows]),
        "from": {"follow": starts[0]} if following else _column(starts),
        "rows": _column(counts),
        "content_hash": _column([r[3] for r in rows]),
        "label": _front([r[4] for r in rows]),
    }


def _expand_pack(doc: dict[str, Any]) -> list[list[Any]]:
    n = doc.get("n")
    if doc.get("form") != FORM or type(n) is not int or n < 0:
        raise ValueError("a malformed pack")
    counts = _values(doc.get("rows"), n)
    if not all(type(v) is int for v in counts):
        raise ValueError("a malformed pack")
    first = doc.get("from")
    if isinstance(first, dict) and set(first) == {"follow"} and type(first["follow"]) is int:
        starts, at = [], first["follow"]
        for k in counts:
            starts.append(at)
            at += k
    else:
        starts = _values(first, n)
        if not all(type(v) is int for v in starts):
            raise ValueError("a malformed pack")
    keys = _values(doc.get("key"), n)
    hashes = _values(doc.get("content_hash"), n)
    labels = _labels(doc.get("label"), n)
    return [[keys[i], starts[i], starts[i] + counts[i], hashes[i], labels[i]] for i in range(n)]


# -- a load's data files in its key's manifest --------------------------------------------------


def _names(files: Any) -> bool:
    """Whether `files` is a non-empty list of [name, blob id] pairs."""
    return (
        isinstance(files, list)
        and bool(files)
        and all(
            isinstance(f, list) and len(f) == 2 and isinstance(f[0], str) and isinstance(f[1], str)
            for f in files
        )
    )


def _is_files(files: Any) -> bool:
    """Whether `files` is data files written compactly (a split's list is never a dict
    with these four keys and an int `form`)."""
    return (
        isinstance(files, dict)
        and set(files) == {"form", "n", "name", "id"}
        and type(files["form"]) is int
    )


def _compact_files(files: list[list[str]]) -> dict[str, Any]:
    return {
        "form": FORM,
        "n": len(files),
        "name": _front([f[0] for f in files]),
        "id": _column([f[1] for f in files]),
    }


def _expand_files(doc: dict[str, Any]) -> list[list[str]]:
    n = doc.get("n")
    if doc.get("form") != FORM or type(n) is not int or n < 0:
        raise ValueError("a malformed list of data files")
    names = _labels(doc.get("name"), n)
    ids = _values(doc.get("id"), n)
    if not all(isinstance(v, str) for v in ids):
        raise ValueError("a malformed list of data files")
    return [[name, i] for name, i in zip(names, ids, strict=True)]
