"""What changed between two manifests of a stage, in words a person reads.

Owns: comparing an old and a new manifest part by part (callable, code files, module values,
arguments, the files arguments name, options, inputs, data files, environment variables,
packages and runtime versions) into `Change` values, and the files a build read or imported
(and the environment variables it read) at run time against their content now; rendering
canonical values back into Python-like text (`{'k': 3}`, `1.5`, `(1, 2)`). Used by `status`
(the first reason) and `explain` (all of them).
Must never: import datasets, print (the commands do that), or show a secret variable's value
or hash.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from hfbuild.source.envvars import observed_name, observed_value

# How an environment variable's value is shown: never a secret's value (nor its hash).
UNSET = "unset"
NOT_READ = "not read"
SECRET = "<secret>"


class Change(NamedTuple):
    # code | file | arg | path | option | input | data | env | package | value | kind | read
    # | import | env-read | revision
    part: str
    path: str  # what changed: a file path, an argument path, an input name, ...
    old: Any  # rendered old value or id (None: it was not there)
    new: Any  # rendered new value or id (None: it is gone)

    def describe(self) -> str:
        if self.part in _OBSERVED:
            return describe_observed(self)
        old, new = _short(self.old), _short(self.new)
        if self.part == "env":
            if SECRET in (old, new) and UNSET not in (old, new) and NOT_READ not in (old, new):
                return f"env var {self.path} changed (a secret: its value is not shown)"
            return f"env var {self.path} changed: {old} -> {new}"
        if self.part == "package" and self.path == "python" and old and new:
            return f"Python {old} -> {new}"
        if self.part == "revision":  # a Hub load's branch moved (report.revisions)
            return f"revision {self.path} now resolves to {new}: was {old}"
        if self.part == "value":
            return f"module value {self.path}: {old} -> {new}"
        if self.part == "path":  # `argument fn_kwargs['p'] names tok/t.json` (argpaths.py)
            if old is None:
                return f"{self.path} added ({new})"
            if new is None:
                return f"{self.path} removed (was {old})"
            return f"{self.path}: changed {old} -> {new}"
        what = {
            "file": "code file",
            "arg": "argument",
            "option": "option",
            "input": "input stage",
            "data": "data file",
            "env": "env var",
            "package": "package",
            "code": "callable",
            "kind": "kind",
        }[self.part]
        if old is None:
            return f"{what} {self.path} added ({new})"
        if new is None:
            return f"{what} {self.path} removed (was {old})"
        return f"{what} {self.path} changed: {old} -> {new}"


def _short(x: Any) -> Any:
    """Blob ids abbreviated as git abbreviates them (12 hex digits is unambiguous here)."""
    if isinstance(x, str) and len(x) == 40 and all(c in "0123456789abcdef" for c in x):
        return x[:12]
    return x


def render(tree: Any) -> str:
    """Python-like text for an encoded value (the inverse of the encoding, for reading)."""
    if tree is None or isinstance(tree, (bool, int)):
        return repr(tree)
    if isinstance(tree, str):
        return repr(tree)
    if isinstance(tree, list):
        return "[" + ", ".join(render(x) for x in tree) + "]"
    if isinstance(tree, dict) and len(tree) == 1:
        ((tag, v),) = tree.items()
        if tag == "float":
            return str(v)
        if tag == "tuple":
            inner = ", ".join(render(x) for x in v)
            return f"({inner},)" if len(v) == 1 else f"({inner})"
        if tag == "dict":
            return "{" + ", ".join(f"{render(k)}: {render(x)}" for k, x in v) + "}"
        if tag in ("set", "frozenset"):
            return f"{tag}({{{', '.join(render(x) for x in v)}}})"
        if tag == "enum":
            return f"{v[0]}.{v[1]}"
        if tag in ("dataclass", "namedtuple", "object"):
            fields = ", ".join(f"{k}={render(x)}" for k, x in v[1])
            return f"{v[0].split(':')[-1]}({fields})"
        if tag == "callable":
            t = v.get("target", {})
            return f"<function {t.get('module')}.{t.get('qualname')}>"
        if tag == "path":
            return f"Path({v[1]!r})"
        if tag == "str-in-root":
            return repr(f"<project>/{v}")
        if tag == "reduce":  # [type, reconstructor, args, state, items, dict items]
            parts = [render(x) for x in v[2]["tuple"]] if _is(v[2], "tuple") else []
            if v[3] is not None:
                parts.append(f"state={render(v[3])}")
            return f"{v[0].split(':')[-1]}({', '.join(parts)})"
        if tag in ("global", "type"):
            return str(v).replace(":", ".")
        if tag == "tokenizer":
            return f"<tokenizer {v[:12]}>"
        if tag == "bytes":
            return f"<bytes {v[:24]}>"
        if tag == "ndarray":
            return f"<ndarray {v[0]} {tuple(v[1])}>"
    return json.dumps(tree, sort_keys=True)


def _walk(path: str, old: Any, new: Any) -> Iterator[Change]:
    """Leaf-most differences between two encoded values."""
    if old == new:
        return
    if _is(old, "dict") and _is(new, "dict"):
        o = {json.dumps(k, sort_keys=True): (k, v) for k, v in old["dict"]}
        n = {json.dumps(k, sort_keys=True): (k, v) for k, v in new["dict"]}
        for key in sorted(o.keys() | n.keys()):
            k = (o.get(key) or n[key])[0]
            sub = f"{path}[{render(k)}]"
            if key not in o:
                yield Change("arg", sub, None, render(n[key][1]))
            elif key not in n:
                yield Change("arg", sub, render(o[key][1]), None)
            else:
                yield from _walk(sub, o[key][1], n[key][1])
        return
    if isinstance(old, dict) and isinstance(new, dict) and not _tagged(old) and not _tagged(new):
        for key in sorted(old.keys() | new.keys()):
            sub = f"{path}.{key}" if path else key
            if key not in old:
                yield Change("arg", sub, None, render(new[key]))
            elif key not in new:
                yield Change("arg", sub, render(old[key]), None)
            else:
                yield from _walk(sub, old[key], new[key])
        return
    if (_is(old, "dataclass") and _is(new, "dataclass")) or (
        _is(old, "object") and _is(new, "object")
    ):
        tag = next(iter(old))
        if old[tag][0] == new[tag][0]:
            o, n = dict(old[tag][1]), dict(new[tag][1])
            for key in sorted(o.keys() | n.keys()):
                yield from _walk(f"{path}.{key}", o.get(key), n.get(key))
            return
    if _is(old, "callable") and _is(new, "callable"):
        o, n = old["callable"], new["callable"]
        if isinstance(o, dict) and isinstance(n, dict) and o.get("target") == n.get("target"):
            # The same function carrying other values (a cell, a default, what it wraps).
            yield from _walk(path, o.get("args") or {}, n.get("args") or {})
            return
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            yield from _walk(f"{path}[{i}]", a, b)
        return
    yield Change("arg", path, render(old), render(new))


def _is(x: Any, tag: str) -> bool:
    return isinstance(x, dict) and len(x) == 1 and tag in x


def _tagged(x: Mapping[str, Any]) -> bool:
    return len(x) == 1 and next(iter(x)) in {
        "dict",
        "tuple",
        "set",
        "frozenset",
        "float",
        "enum",
        "dataclass",
        "namedtuple",
        "object",
        "callable",
        "path",
        "str-in-root",
        "bytes",
        "ndarray",
        "numpy",
        "custom",
        "registered",
        "subclass",
        "OrderedDict",
        "defaultdict",
        "tokenizer",
        "transformers-tokenizer",
        "Features",
        "reduce",
        "global",
        "type",
    }


def _pairs(doc: Mapping[str, Any], *keys: str) -> dict[str, str]:
    cur: Any = doc
    for k in keys:
        cur = cur.get(k, {}) if isinstance(cur, dict) else {}
    return {p: i for p, i in cur} if isinstance(cur, list) else {}


def _data_files(doc: Mapping[str, Any]) -> dict[str, str]:
    files = (doc.get("data") or {}).get("files")
    if isinstance(files, dict):
        return {f"{split}:{p}": i for split, fs in files.items() for p, i in fs}
    return {p: i for p, i in files} if isinstance(files, list) else {}


def _keyed(part: str, old: Mapping[str, str], new: Mapping[str, str]) -> Iterator[Change]:
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            yield Change(part, key, old.get(key), new.get(key))


def _env(doc: Mapping[str, Any]) -> dict[str, str]:
    """Each variable the stage reads, as shown: its value's repr, "unset", or "<secret>"."""
    out = {}
    for name, value in doc.get("env") or []:
        if value is None:
            out[name] = UNSET
        elif isinstance(value, dict):
            out[name] = SECRET
        else:
            out[name] = repr(value)
    return out


def _env_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> Iterator[Change]:
    o, n = dict(old.get("env") or []), dict(new.get("env") or [])
    shown_o, shown_n = _env(old), _env(new)
    for name in sorted(o.keys() | n.keys()):
        if name in o and name in n and o[name] == n[name]:
            continue
        yield Change("env", name, shown_o.get(name, NOT_READ), shown_n.get(name, NOT_READ))


def _packages(doc: Mapping[str, Any]) -> dict[str, str]:
    return dict(p.split("==", 1) for p in doc.get("packages", []) if "==" in p)


def module_values(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Module-level values that differ from their source (`transforms.MAX_LEN = 256` set
    elsewhere): a side without an entry had the value its source binds."""

    def entries(doc: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in (doc.get("code") or {}).get("module_values") or []}

    o, n = entries(old), entries(new)
    out = []
    for name in sorted(o.keys() | n.keys()):
        a, b = o.get(name), n.get(name)
        if a == b:
            continue
        before = render(a["value"]) if a else _as_source(b)
        after = render(b["value"]) if b else _as_source(a)
        out.append(Change("value", name, before, after))
    return out


def named_paths(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """The project files and directories that arguments and module values name whose
    content differs (a directory: each file added, removed or changed in it)."""

    def entries(doc: Mapping[str, Any]) -> dict[tuple[str, str], Any]:
        return {
            (str(e[0]), str(e[1])): e[2]
            for e in doc.get("paths") or []
            if isinstance(e, list) and len(e) == 3
        }

    o, n = entries(old), entries(new)
    out = []
    for where, rel in sorted(o.keys() | n.keys()):
        a, b = o.get((where, rel)), n.get((where, rel))
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            fa, fb = dict(a.get("dir") or []), dict(b.get("dir") or [])
            for f in sorted(fa.keys() | fb.keys()):
                if fa.get(f) != fb.get(f):
                    what = f"{where} names {rel}/: {rel}/{f}"
                    out.append(Change("path", what, fa.get(f), fb.get(f)))
            continue
        out.append(Change("path", f"{where} names {rel}", _named(a), _named(b)))
    return out


def _named(content: Any) -> Any:
    return "a directory" if isinstance(content, dict) else content


def _as_source(entry: Any) -> str:
    return render(entry["source"]) if "source" in entry else "as its source binds it"


def diff(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    old_inputs: Mapping[str, str] | None = None,
    new_inputs: Mapping[str, str] | None = None,
) -> list[Change]:
    """Every difference between two manifest documents, most telling first: callable, code
    files, arguments, options, inputs, data, environment variables, packages (datasets, pyarrow
    and Python among them). `*_inputs` name the input stages."""
    out: list[Change] = []
    if old.get("kind") != new.get("kind"):
        out.append(Change("kind", "kind", old.get("kind"), new.get("kind")))
    ot, nt = (old.get("code") or {}).get("target"), (new.get("code") or {}).get("target")
    if ot != nt:

        def name(t: Any) -> str | None:
            return None if not t else f"{t.get('module')}.{t.get('qualname')}"

        if name(ot) != name(nt):
            out.append(Change("code", "target", name(ot), name(nt)))
        else:
            out.append(Change("code", name(nt) or "target", "its definition", "another"))
    out.extend(_keyed("file", _pairs(old, "code", "files"), _pairs(new, "code", "files")))
    out.extend(_keyed("file", dict(old.get("file_deps") or []), dict(new.get("file_deps") or [])))
    out.extend(module_values(old, new))
    out.extend(_walk("", old.get("args", {}), new.get("args", {})))
    out.extend(named_paths(old, new))
    for c in _walk("", old.get("options", {}), new.get("options", {})):
        out.append(c._replace(part="option", path=f"options.{c.path}"))
    oi = dict(old_inputs or {}) or {str(i): f for i, f in enumerate(old.get("inputs") or [])}
    ni = dict(new_inputs or {}) or {str(i): f for i, f in enumerate(new.get("inputs") or [])}
    if list(old.get("inputs") or []) != list(new.get("inputs") or []):
        out.extend(_keyed("input", oi, ni))
    out.extend(_keyed("data", _data_files(old), _data_files(new)))
    od, nd = (old.get("data") or {}), (new.get("data") or {})
    if od.get("builder") != nd.get("builder"):
        out.append(Change("data", "builder", od.get("builder"), nd.get("builder")))
    out.extend(
        c._replace(part="data", path=f"load option {c.path}")
        for c in _walk("", od.get("options"), nd.get("options"))
    )
    out.extend(_env_changes(old, new))
    out.extend(_keyed("package", _packages(old), _packages(new)))
    if not out and old != new:
        out.append(Change("kind", "manifest", "an older hfbuild format", "the current one"))
    return out


# -- what a build read or imported at run time (observe.py, fullkey.py) -------------------------

_OBSERVED = {
    "read": "file",
    "import": "module",
    "listing": "listing",
    "unobserved": "",
    "env-read": "env var",
}


def describe_observed(c: Change) -> str:
    """`file conf/x.yaml read at run time changed: 3f2a... -> 9c1b...`, `listing of data/extra
    changed: +new.txt -old.txt`."""
    if c.part == "env-read":
        if SECRET in (c.old, c.new) and UNSET not in (c.old, c.new):
            return f"env var {c.path} (read at run time) changed (a secret: its value is not shown)"
        return f"env var {c.path} (read at run time) changed: {c.old} -> {c.new}"
    if c.part == "unobserved":
        return "the last build's reads were not all observed (inotify lost events): built again"
    if c.part == "listing":
        return f"listing of {c.path} changed: {c.new}"
    how = "read" if c.part == "read" else "imported"
    ids = f"{_short(c.old)} -> {_short(c.new)}"
    return f"{_OBSERVED[c.part]} {c.path} {how} at run time changed: {ids}"


def _listing_change(old: Sequence[str] | None, new: Sequence[str] | None) -> str:
    """`+a.txt -b.txt` (at most 5 names each way, then a count), or the directory's coming
    or going."""
    if old is None or new is None:
        return "created" if old is None else "removed"
    was, now = set(old), set(new)

    def some(sign: str, names: list[str]) -> list[str]:
        return [sign + n for n in names[:5]] + (
            [f"({len(names) - 5} more)"] if len(names) > 5 else []
        )

    return " ".join(some("+", sorted(now - was)) + some("-", sorted(was - now))) or "reordered"


def versions_only(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change] | None:
    """The differences between two manifest documents when each is a package's version
    (Python, datasets, pyarrow, a package the code imports), else None: the same stage on a
    machine with other versions, its inputs' results the same."""
    changes = diff(old, new)
    return changes if changes and all(c.part == "package" for c in changes) else None


def diff_observed(
    old: Iterable[Sequence[str]],
    now: Mapping[str, str],
    listed: Mapping[str, Sequence[str]] | None = None,
    listed_now: Mapping[str, Sequence[str] | None] | None = None,
) -> list[Change]:
    """The files a build read or imported at run time (`old`: [path, id] pairs as recorded)
    whose content is not what it was (`now`: path -> current id, "missing" when gone), and
    the directories it listed (paths `dir/.`) whose names differ: named with the names added
    and removed when `listed` (directory -> names then) and `listed_now` have them."""
    out = []
    for pair in old:
        path, was = str(pair[0]), str(pair[1])
        cur = now.get(path)
        if cur is None or cur == was:
            continue
        name = observed_name(path)
        if name is not None:
            out.append(Change("env-read", name, observed_value(was), observed_value(cur)))
        elif path.startswith("?"):  # fullkey.UNOBSERVED: no file ever has this name
            out.append(Change("unobserved", path, was, cur))
        elif path == "." or path.endswith("/."):
            d = path[:-2] if path.endswith("/.") else path
            if listed is not None and d in listed and listed_now is not None and d in listed_now:
                what = _listing_change(listed[d], listed_now[d])
            else:  # names unknown (a lock entry): the listings' digests
                what = " -> ".join(x.removeprefix("listing:")[:12] for x in (was, cur))
            out.append(Change("listing", d, was, what))
        else:
            out.append(Change("import" if path.endswith(".py") else "read", path, was, cur))
    return sorted(out, key=lambda c: c.path)
