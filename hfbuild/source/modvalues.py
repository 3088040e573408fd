"""Module values a transform reads that differ from their source (issue #9, item 5).

Owns: `follow_globals`, which compares the module-level names the closure's in-repo functions
read (their `co_names`, nested code included, and attributes of in-repo modules they read)
with what the module's source binds: a name bound there to a literal must still have that
value, a `def`/`class` must still be that function or class, and a name the source does not
bind at all was set from outside. Each difference enters the key as a module value
(`module.NAME`: the source's literal and the value in memory); a value equal to its literal is
kept for `argpaths.py` (`constants`). What a source binds at module level, memoized by blob id
(an AST walk); `same_literal`. Each function it follows is checked by
`liveness.check_function` first.

Must never: import, reload or execute a user module; keep anything of site-packages or the
standard library; put an object id or path into a manifest.
"""

from __future__ import annotations

import ast
import contextlib
import os
import sys
import threading
import types
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from hfbuild.source.codedigest import walk_code
from hfbuild.source.liveness import check_function

if TYPE_CHECKING:
    from hfbuild.core.canonical import Encoded
    from hfbuild.source.gitrepo import FileId
    from hfbuild.source.gitstate import Snapshot


class Walk(Protocol):
    """What `follow_globals` reads and adds to of a fingerprint's closure (`closure.Context`)."""

    snapshot: Snapshot
    files: dict[str, FileId]
    module_values: dict[str, Any]
    values_seen: set[int]
    constants: dict[str, Any]

    def add_file(self, rel: str) -> FileId: ...

    def project_rel(self, path: str) -> str | None: ...

    def encode(self, value: Any, path: str) -> Encoded: ...


_bindings: dict[str, _Bindings] = {}  # blob -> what the source binds at module level
_lock = threading.Lock()


class _Bindings(NamedTuple):
    literals: dict[str, Any]  # bound once, at module level, to a literal
    defs: frozenset[str]  # bound once, by `def` or `class`
    imports: dict[str, tuple[int, str, str | None]]  # bound once, by a module-level import
    other: frozenset[str]  # bound otherwise (calls, loops, several times, `global`)
    open_ended: bool  # `import *` or `globals()`: names the source binds cannot be listed


_UNSET = object()


def _source_bindings(blob: str, read: Any) -> _Bindings:
    hit = _bindings.get(blob)
    if hit is not None:
        return hit
    try:
        tree = ast.parse(read())
    except (SyntaxError, ValueError):
        result = _Bindings({}, frozenset(), {}, frozenset(), True)
    else:
        result = _scan_bindings(tree)
    with _lock:
        _bindings[blob] = result
    return result


def _scan_bindings(tree: ast.Module) -> _Bindings:
    count: dict[str, int] = {}
    literal: dict[str, Any] = {}
    defs: set[str] = set()
    imported: dict[str, tuple[int, str, str | None]] = {}
    top = {id(stmt) for stmt in tree.body}
    open_ended = False

    def bind(name: str) -> None:
        count[name] = count.get(name, 0) + 1

    def targets(node: ast.AST) -> Iterator[str]:
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                yield n.id

    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bind(stmt.name)
            defs.add(stmt.name)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            tgts = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for t in tgts:
                for name in targets(t):
                    bind(name)
            if len(tgts) == 1 and isinstance(tgts[0], ast.Name):
                with contextlib.suppress(ValueError, TypeError, SyntaxError, RecursionError):
                    literal[tgts[0].id] = ast.literal_eval(stmt.value)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                if a.name == "*":
                    open_ended = True
                    continue
                name = a.asname or a.name.split(".")[0]
                bind(name)
                if id(node) not in top:
                    continue
                if isinstance(node, ast.ImportFrom):
                    imported[name] = (node.level, node.module or "", a.name)
                else:  # `import a.b` binds a; `import a.b as c` binds a.b
                    imported[name] = (0, a.name if a.asname else name, None)
        elif isinstance(node, ast.Global):
            for name in node.names:
                bind(name)
                bind(name)  # assigned at run time: never "bound once"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            open_ended |= node.func.id in {"globals", "vars", "setattr", "exec"}
    # Names bound by anything else at module level (for, with, walrus, augmented assignment).
    for stmt in tree.body:
        if not isinstance(
            stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
        ):
            for name in _module_level_stores(stmt):
                bind(name)
                bind(name)
    once = {n for n, c in count.items() if c == 1}
    literal = {n: v for n, v in literal.items() if n in once}
    imported = {n: v for n, v in imported.items() if n in once}
    return _Bindings(
        literal,
        frozenset(defs & once),
        imported,
        frozenset(count.keys() - (literal.keys() | (defs & once) | imported.keys())),
        open_ended,
    )


def _module_level_stores(stmt: ast.stmt) -> Iterator[str]:
    """Names a module-level statement binds, not looking inside functions or classes."""
    stack: list[ast.AST] = [stmt]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            yield node.id
        stack.extend(ast.iter_child_nodes(node))


def follow_globals(fn: types.FunctionType, ctx: Walk) -> None:
    """Check `fn` and the in-repo functions it reaches through module globals (item 4), and
    add to `ctx.module_values` each module value they read that differs from its source."""
    stack = [fn]
    while stack:
        f = stack.pop()
        if id(f.__code__) in ctx.values_seen:
            continue
        ctx.values_seen.add(id(f.__code__))
        check_function(f, ctx)
        names = _names(f.__code__)
        glb = f.__globals__
        for mod_globals, file in _namespaces(f, glb, names, ctx):
            rel = _project_rel(ctx, file)
            if rel is None:
                continue
            fid = ctx.add_file(rel)
            src: _Bindings | None = None  # parsed when a name it reads is a module value
            module = str(mod_globals.get("__name__", "__main__"))
            for name in sorted(names):
                value = mod_globals.get(name, _UNSET)
                if value is _UNSET or name.startswith("__"):
                    continue
                if isinstance(value, types.FunctionType) and _project_rel(
                    ctx, value.__code__.co_filename
                ):
                    stack.append(value)
                if src is None:  # the source the blob id names, not the file as it is now
                    src = _source_bindings(
                        fid.id, lambda rel=rel, blob=fid.id: ctx.snapshot.content(rel, blob)
                    )
                _compare(module, name, value, src, ctx)


def _namespaces(
    f: types.FunctionType, glb: dict[str, Any], names: frozenset[str], ctx: Walk
) -> Iterator[tuple[dict[str, Any], str]]:
    """The function's own module globals, then those of in-repo modules it reads attributes of
    (`config.MAX_LEN`: the names it reads are looked up there too)."""
    yield glb, str(glb.get("__file__") or f.__code__.co_filename)
    for name in sorted(names):
        value = glb.get(name)
        if isinstance(value, types.ModuleType):
            file = getattr(value, "__file__", None)
            if isinstance(file, str) and _project_rel(ctx, file) is not None:
                yield vars(value), file


_names_memo: dict[int, tuple[types.CodeType, frozenset[str]]] = {}


def _names(code: types.CodeType) -> frozenset[str]:
    hit = _names_memo.get(id(code))
    if hit is not None and hit[0] is code:
        return hit[1]
    names = frozenset(n for c in walk_code(code) for n in c.co_names)
    _names_memo[id(code)] = (code, names)
    return names


_rels: dict[tuple[str, str], str | None] = {}


def _project_rel(ctx: Walk, path: str) -> str | None:
    """`ctx.project_rel` of a file that exists, memoized: it resolves directories (syscalls)."""
    key = (ctx.snapshot.root, path)
    if key not in _rels:
        _rels[key] = ctx.project_rel(path) if os.path.isfile(path) else None
    return _rels[key]


def _compare(module: str, name: str, value: Any, src: _Bindings, ctx: Walk) -> None:
    qual = f"{module}.{name}"
    literal = src.literals.get(name, _UNSET)
    if literal is not _UNSET:
        if same_literal(value, literal):
            if isinstance(value, (str, list, tuple, dict, set, frozenset)):
                # Keyed by its source, but a string in it may name a file whose content
                # must be keyed too (argpaths.py).
                ctx.constants[f"module value {qual}"] = value
            return
        ctx.module_values[qual] = {
            "source": ctx.encode(literal, f"module value {qual}"),
            "value": ctx.encode(value, f"module value {qual}"),
        }
        return
    if name in src.defs:
        if getattr(value, "__module__", None) == module and (
            getattr(value, "__qualname__", None) == name
        ):
            return
        ctx.module_values[qual] = {"value": ctx.encode(value, f"module value {qual}")}
        return
    spec = src.imports.get(name)
    if spec is not None:
        source, expected = _imported(spec, module)
        if expected is _UNSET or expected is value or _defined_as(value, source, spec[2]):
            return  # as the import binds it (or its module is gone: nothing to compare)
        ctx.module_values[qual] = {"value": ctx.encode(value, f"module value {qual}")}
        return
    if name in src.other or src.open_ended or isinstance(value, types.ModuleType):
        return  # bound by code hfbuild does not run: not seen (README, limits)
    # Bound from outside the module (`transforms.EXTRA = ...` elsewhere).
    ctx.module_values[qual] = {"value": ctx.encode(value, f"module value {qual}")}


def _defined_as(value: Any, module: str, name: str | None) -> bool:
    """Whether `value` is the function or class that `module`'s source defines as `name`
    (what the import gives a fresh process, even if the name was rebound there since)."""
    return (
        name is not None
        and isinstance(value, (types.FunctionType, type))
        and value.__module__ == module
        and value.__qualname__ == name
    )


def _imported(spec: tuple[int, str, str | None], module: str) -> tuple[str, Any]:
    """(module name, what an import statement of `module` binds as the modules hold it now)."""
    level, name, attr = spec
    if level:
        pkg = sys.modules.get(module)
        base = getattr(pkg, "__package__", None) or ""
        parts = base.split(".") if base else []
        if level - 1 > len(parts):
            return name, _UNSET
        base = ".".join(parts[: len(parts) - (level - 1)])
        name = f"{base}.{name}" if name and base else (name or base)
    mod = sys.modules.get(name)
    if mod is None:
        return name, _UNSET
    if attr is None:
        return name, mod
    found = getattr(mod, attr, _UNSET)
    if found is _UNSET:
        found = sys.modules.get(f"{name}.{attr}", _UNSET)
    return name, found


def same_literal(a: Any, b: Any) -> bool:
    """Type-exact equality of a value with a literal: 1, 1.0 and True differ, as do 0.0 and
    -0.0, so a value the key would encode differently is never taken for the source's."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and (a != 0.0 or str(a) == str(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_literal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return (
            len(a) == len(b)
            and a.keys() == b.keys()
            and all(same_literal(v, b[k]) for k, v in a.items())
        )
    if isinstance(a, (set, frozenset)):
        return a == b and {type(x) for x in a} == {type(x) for x in b}
    return bool(a == b)
