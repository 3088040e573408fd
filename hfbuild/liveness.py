"""Whether the code and module values a transform runs with are what its files say.

Owns three things, for the in-repo part of a fingerprint (issue #9, items 4 and 5):

1. *What this process loaded*: per Python source file executed as a module, the module's code
   object and the file's stat at that moment, recorded by an `exec` audit hook installed when
   hfbuild is imported (importlib runs every module body through `exec`, and so do
   `importlib.reload` and runpy). Modules already loaded when hfbuild is imported get the
   file's stat at that moment and no code object.
2. *Stale code*: `check_loaded` refuses (`StaleModuleError`) a fingerprint whose closure holds a
   module that this process loaded from a file that has changed since, unless the loaded code
   compiles to the same as the file now (a touch, a comment or blank-line edit);
   `check_function` refuses a function object kept from an earlier load of its module (a name
   imported before an `importlib.reload`); `check_built` asks again after a stage ran (a
   reload, or a lazy import, after the fingerprint was taken). The file now is what the
   fingerprint hashes (its blob id); committing an edit keeps the blob id, so only
   "loaded == file now" matters.
3. *Module values*: `follow_globals` compares the module-level names that the closure's in-repo
   functions read (their `co_names`, nested code included, and attributes of in-repo modules
   they read) with what the module's source binds: a name bound there to a literal must still
   have that value, a `def`/`class` must still be that function or class, and a name the
   source does not bind at all was set from outside. Each difference enters the key as a
   module value (`module.NAME`: the source's literal and the value in memory).

Cost: a stat per closure file per fingerprint; a compile once per blob id, only when a
file's stat moved since it was loaded (or it was loaded within 2 s of its last change); an AST
walk once per blob id of a module whose values the closure reads.
Must never: import, reload or execute a user module; keep anything of site-packages or the
standard library; put an object id or path into a manifest.
"""

from __future__ import annotations

import ast
import contextlib
import os
import sys
import sysconfig
import threading
import time
import types
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from hfbuild.errors import GitStateError, StaleModuleError

if TYPE_CHECKING:
    from hfbuild.closure import Context
    from hfbuild.gitstate import Snapshot

# A file modified this close to (or after) the moment it was loaded may have changed within
# one timestamp tick after it was read: its stat proves nothing (git's racy-file rule).
_RACY_NS = 2_000_000_000
_PYC_TAG = sys.implementation.cache_tag
_PYC_TICK_NS = 100_000_000  # timestamps of one write: coarse kernel clocks tick in ~10 ms

_INSTALLED = tuple(
    os.path.realpath(p) + os.sep
    for k in ("stdlib", "platstdlib", "purelib", "platlib")
    if (p := sysconfig.get_paths().get(k))
)


class _Stat(NamedTuple):
    mtime_ns: int
    size: int
    ino: int


class _Loaded:
    """One execution of a module's source file in this process."""

    __slots__ = ("code", "code_ids", "pyc_racy", "stat", "trusted")

    def __init__(self, code: types.CodeType | None, path: str, stat: _Stat, at_ns: int) -> None:
        self.code = code  # None: loaded before hfbuild was imported
        self.stat = stat
        # Whether "the file's stat has not moved" proves the loaded code is the file's: not
        # when the file changed within 2 s of the load, nor when its bytecode cache was
        # written before the file's last change or within one timestamp tick after it:
        # importlib validates a pyc by the source's size and mtime in whole seconds, so a
        # same-size rewrite within that second is served the old bytecode, in every process.
        self.pyc_racy = _racy_pyc(path, stat)
        self.trusted = stat.mtime_ns < at_ns - _RACY_NS and not self.pyc_racy
        self.code_ids: frozenset[int] | None = None

    def holds(self, code: types.CodeType) -> bool:
        """Whether `code` is part of this execution (the same object, not only equal)."""
        if self.code is None:
            return True  # nothing to compare against
        if self.code_ids is None:
            self.code_ids = frozenset(id(c) for c in _walk_code(self.code))
        return id(code) in self.code_ids


_records: dict[str, _Loaded] = {}  # file key (real directory + file name) -> last execution
_verdicts: dict[tuple[int, str], tuple[_Loaded, bool]] = {}  # (record, blob) -> same code?
_compiled: dict[str, tuple[str, dict[str, str]] | None] = {}  # blob -> (module, defs) digests
_bindings: dict[str, _Bindings] = {}  # blob -> what the source binds at module level
_keys: dict[str, str] = {}  # path -> file key
_checked: dict[tuple[str, str], _Loaded] = {}  # (file key, blob) -> load check_loaded vouched for
_lock = threading.Lock()


def _key(path: str) -> str:
    k = _keys.get(path)
    if k is None:
        p = os.path.abspath(path)
        k = _keys[path] = os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
    return k


def _stat(path: str) -> _Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Stat(st.st_mtime_ns, st.st_size, st.st_ino)


def _racy_pyc(path: str, stat: _Stat) -> bool:
    if _PYC_TAG is None:
        return False
    head, tail = os.path.split(path)
    pyc = os.path.join(head, "__pycache__", f"{tail[:-3]}.{_PYC_TAG}.pyc")
    try:
        written = os.stat(pyc).st_mtime_ns
    except OSError:
        return False  # no cache (or an -O one, checked the same way by whoever wrote it)
    return written < stat.mtime_ns + _PYC_TICK_NS


def _ours(path: str) -> bool:
    """A source file that could be project code: not the standard library or site-packages."""
    return path.endswith(".py") and not path.startswith(_INSTALLED) and "-packages" not in path


def _on_audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "exec" or not args:
        return
    code = args[0]
    if type(code) is not types.CodeType or code.co_name != "<module>":
        return
    path = code.co_filename
    if not _ours(path):
        return
    st = _stat(path)
    if st is not None:
        _records[_key(path)] = _Loaded(code, path, st, time.time_ns())


def _install() -> None:
    now = time.time_ns()
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__file__", None)
        if isinstance(path, str) and _ours(path):
            st = _stat(path)
            if st is not None:
                _records.setdefault(_key(path), _Loaded(None, path, st, now))
    sys.addaudithook(_on_audit)


# -- item 4: the code that runs is the code that was hashed ---------------------------------


def check_loaded(ctx: Context) -> None:
    """Refuse when a module of the closure runs code its file no longer holds."""
    if ctx.snapshot.mode != "worktree":
        return  # the staged code is not what runs; nothing is built from this fingerprint
    # Files already vouched for under this snapshot (stages share most of their closures):
    # the same load against the same blob id passes again, as the snapshot's ids are as old.
    snap = ctx.snapshot
    done = snap.memo.setdefault("liveness", {})
    keys = snap.memo.setdefault("liveness-keys", {})  # rel -> (absolute path, file key)
    assert isinstance(done, dict) and isinstance(keys, dict)
    for rel, fid in ctx.files.items():
        if not rel.endswith(".py"):
            continue
        known = keys.get(rel)
        if known is None:
            path = snap.abspath(rel)
            known = keys[rel] = (path, _key(path))
        path, key = known
        rec = _records.get(key)
        if rec is None:
            continue  # not loaded in this process: importing it later reads the file now
        seen = done.get(rel)
        if seen is not None and seen[0] is rec and seen[1] == fid.id:
            continue
        if not rec.trusted or rec.stat != _now(snap, rel, path):
            hit = _verdicts.get((id(rec), fid.id))
            if hit is None or hit[0] is not rec:
                # Against the content the closure's blob id names (the file may have been
                # edited since the snapshot identified it), not whatever the file holds now.
                try:
                    ok = _same_as_file(
                        rec, path, fid.id, lambda rel=rel, blob=fid.id: snap.content(rel, blob)
                    )
                except GitStateError:  # neither git nor the work tree holds that content
                    ok = False
                hit = _verdicts[(id(rec), fid.id)] = (rec, ok)
            if not hit[1]:
                raise StaleModuleError(rel, _module_of(path), stale_pyc=rec.pyc_racy)
        _checked[(key, fid.id)] = rec  # this load was the code of this blob
        done[rel] = (rec, fid.id)


def _now(snap: Snapshot, rel: str, path: str) -> _Stat | None:
    """The file's stat data as the snapshot took it when identifying the file (the blob id
    the closure holds is of that state), else as it is now."""
    st = snap.stat_of(rel)
    if st is None:
        return _stat(path)
    return _Stat(st.st_mtime_ns, st.st_size, st.st_ino)


def check_built(root: str, doc: Mapping[str, Any]) -> None:
    """After a stage ran, before its result is stored under `doc`'s fingerprint: every module
    of its code files that ran is the load `check_loaded` vouched for, or a later load (a lazy
    import during the build, an `importlib.reload` after the fingerprint was taken) of the
    same content. Otherwise the result must not be stored (`StaleModuleError`)."""
    from hfbuild.gitstate import Snapshot

    snap: Snapshot | None = None
    for rel, blob in (doc.get("code") or {}).get("files") or []:
        if not rel.endswith(".py"):
            continue
        path = os.path.join(root, *rel.split("/"))
        rec = _records.get(_key(path))
        if rec is None or _checked.get((_key(path), blob)) is rec:
            continue  # never loaded (so never ran), or the load that was checked
        snap = snap or Snapshot(root)
        current = snap
        if (
            current.file_id(rel).id != blob
            or rec.code is None
            or not _same_as_file(rec, path, blob, lambda r=rel, c=current: c.read(r))
        ):
            raise StaleModuleError(rel, _module_of(path), after_fingerprint=True)


def check_function(fn: types.FunctionType, ctx: Context) -> None:
    """Refuse a function kept from an earlier load of its (since reloaded, changed) module."""
    code = fn.__code__
    path = code.co_filename
    rec = _records.get(_key(path))
    if rec is None or ctx.snapshot.mode != "worktree" or rec.holds(code):
        return
    rel = ctx.snapshot.rel(path)
    fid = ctx.files.get(rel) if rel else None
    if rel is None or fid is None:
        return
    compiled = _compile(fid.id, path, lambda: ctx.snapshot.read(rel))
    if compiled is None or compiled[1].get(_qualname(fn)) != _digest(code):
        raise StaleModuleError(rel, fn.__module__, function=fn.__qualname__)


def _same_as_file(rec: _Loaded, path: str, blob: str, read: Any) -> bool:
    compiled = _compile(blob, path, read)
    if compiled is None:
        return False
    if rec.code is not None:
        return _digest(rec.code) == compiled[0]
    # Loaded before hfbuild was imported: only its functions and classes can be compared.
    mod = _loaded_module(path)
    if mod is None:
        return True  # no longer in sys.modules: nothing of it can run
    defs = compiled[1]
    for name, code in _module_code(mod, path):
        if defs.get(name) != _digest(code):
            return False  # changed, or no longer defined by the file
    # A def the file has now and the loaded module lacks (a decorated one that hides its code
    # is present under its name, which is all that can be asked of it).
    names = vars(mod)
    return all(q in names for q in defs if "." not in q and not q.startswith("<"))


def _module_code(mod: types.ModuleType, path: str) -> Iterator[tuple[str, types.CodeType]]:
    """(qualname, code) of the functions and methods a module defines, as loaded."""
    key = _key(path)

    def own(obj: Any) -> Iterator[tuple[str, types.CodeType]]:
        for _ in range(20):  # unwrap decorators that keep __wrapped__
            code = getattr(obj, "__code__", None)
            if isinstance(code, types.CodeType) and _key(code.co_filename) == key:
                yield str(getattr(obj, "__qualname__", code.co_name)), code
                return
            obj = getattr(obj, "__wrapped__", None)
            if obj is None:
                return

    for value in list(vars(mod).values()):
        if isinstance(value, type) and value.__module__ == mod.__name__:
            for attr in list(vars(value).values()):
                if isinstance(attr, (staticmethod, classmethod)):
                    attr = attr.__func__
                if isinstance(attr, property):
                    for f in (attr.fget, attr.fset, attr.fdel):
                        yield from own(f)
                else:
                    yield from own(attr)
        else:
            yield from own(value)


def _loaded_module(path: str) -> types.ModuleType | None:
    key = _key(path)
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if isinstance(f, str) and _key(f) == key:
            return mod
    return None


def _module_of(path: str) -> str:
    mod = _loaded_module(path)
    return mod.__name__ if mod is not None else os.path.splitext(os.path.basename(path))[0]


def _compile(blob: str, path: str, read: Any) -> tuple[str, dict[str, str]] | None:
    """(module digest, {qualname: digest} of every def) of a source, memoized by blob id."""
    if blob in _compiled:
        return _compiled[blob]
    try:
        code = compile(read(), path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        result = None
    else:
        defs = {q: _digest(c) for q, c in _named_code(code, "")}
        result = (_digest(code), defs)
    with _lock:
        _compiled[blob] = result
    return result


def _walk_code(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _walk_code(c)


def _named_code(code: types.CodeType, prefix: str) -> Iterator[tuple[str, types.CodeType]]:
    """(qualname, code) of every code object under `code`, as functions made from them name
    themselves (`co_qualname` from Python 3.11; built the same way before it)."""
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            name = str(getattr(c, "co_qualname", prefix + c.co_name))
            yield name, c
            is_function = c.co_flags & 0x2  # CO_NEWLOCALS: a function's body, not a class's
            yield from _named_code(c, name + (".<locals>." if is_function else "."))


def _qualname(fn: types.FunctionType) -> str:
    return str(getattr(fn.__code__, "co_qualname", fn.__qualname__))


def _digest(code: types.CodeType) -> str:
    from hfbuild.closure import _code_digest

    return _code_digest(code)


# -- item 5: module-level values changed at run time --------------------------------------


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


def follow_globals(fn: types.FunctionType, ctx: Context) -> None:
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
    f: types.FunctionType, glb: dict[str, Any], names: frozenset[str], ctx: Context
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
    names = frozenset(n for c in _walk_code(code) for n in c.co_names)
    _names_memo[id(code)] = (code, names)
    return names


_rels: dict[tuple[str, str], str | None] = {}


def _project_rel(ctx: Context, path: str) -> str | None:
    """`ctx.project_rel` of a file that exists, memoized: it resolves directories (syscalls)."""
    key = (ctx.snapshot.root, path)
    if key not in _rels:
        _rels[key] = ctx.project_rel(path) if os.path.isfile(path) else None
    return _rels[key]


def _compare(module: str, name: str, value: Any, src: _Bindings, ctx: Context) -> None:
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


_install()
