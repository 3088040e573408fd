"""Which files, packages and bound values define a callable.

Owns: turning a callable into (a) a `target` naming it, (b) the in-repo files of its *closure*
(the file defining it plus every in-repo module it imports, transitively, by static AST scan),
(c) the `name==version` of third-party distributions those files import, and (d) the values it
carries with it (closure cells, `functools.partial` arguments, the instance behind a bound method
or callable object), which count as arguments.

Must never: import a module to find it (that would run user code), follow files into
site-packages or a virtualenv, or identify anything by absolute path or object id. Scans are
memoized by blob id: a blob's imports never change.
"""

from __future__ import annotations

import ast
import functools
import importlib.machinery
import os
import re
import sys
import sysconfig
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from hfbuild import canonical, liveness
from hfbuild.errors import ClosureError, UnhashableArgumentError
from hfbuild.gitstate import FileId, Snapshot, hash_bytes

# Distributions whose version must not enter fingerprints by default: upgrading `datasets` must
# not orphan every cache, and hfbuild's own version is recorded in the manifest, not hashed.
UNTRACKED_DISTRIBUTIONS = frozenset({"datasets", "hfbuild"})


class ImportRef(NamedTuple):
    level: int  # 0 for absolute imports, n for n leading dots
    module: str  # "a.b" ("" for `from . import x`)
    names: tuple[str, ...]  # names of a `from` import; () for `import a.b`
    lineno: int


class Scan(NamedTuple):
    imports: tuple[ImportRef, ...]
    dynamic: tuple[int, ...]  # lines of import_module/__import__ calls with a non-literal name
    error: str | None  # why the file could not be parsed, if it could not


_scan_lock = threading.Lock()
_scans: dict[str, Scan] = {}  # blob id -> Scan


@dataclass
class Context:
    """Everything one fingerprint computation gathers while it walks callables and arguments."""

    snapshot: Snapshot
    files: dict[str, FileId] = field(default_factory=dict)
    external: dict[str, str] = field(default_factory=dict)  # module -> blob id, outside root
    packages: set[str] = field(default_factory=set)
    incomplete: list[str] = field(default_factory=list)  # "path:line: why"
    _seen_modules: set[str] = field(default_factory=set)
    # Module values that differ from their source (liveness.py, issue #9 item 5): qualified
    # name -> {"source": literal, "value": in memory}; and the code already followed for them.
    module_values: dict[str, Any] = field(default_factory=dict)
    values_seen: set[int] = field(default_factory=set)

    def encode(self, value: Any, path: str) -> canonical.Encoded:
        return canonical.encode(value, path, on_callable=self._on_callable, root=self.snapshot.root)

    def _on_callable(self, fn: Callable[..., Any], path: str) -> canonical.Encoded:
        return describe(fn, self, path)

    def add_file(self, rel: str) -> FileId:
        fid = self.files.get(rel)
        if fid is None:
            fid = self.files[rel] = self.snapshot.file_id(rel)
            if rel.endswith(".py"):
                self._follow_imports(rel, fid.id)
        return fid

    def project_rel(self, path: str) -> str | None:
        """`path` relative to the project root when it is project code: inside the root and
        not in an environment (a virtualenv) kept there; else None."""
        if path.startswith("<module>"):
            return None
        rel = self.snapshot.rel(path)
        if rel is None or _in_environment(os.path.abspath(path), self.snapshot.root):
            return None
        return rel

    # -- the import graph ------------------------------------------------------------------

    def _follow_imports(self, rel: str, blob: str) -> None:
        scan = _scan(blob, lambda: self.snapshot.read(rel))
        if scan.error:
            self.incomplete.append(f"{rel}: cannot be parsed ({scan.error})")
        for line in scan.dynamic:
            self.incomplete.append(
                f"{rel}:{line}: a dynamic import with a computed module name; edits to the "
                f"module it loads are not seen (import it statically, or list it in file_deps)"
            )
        here = os.path.dirname(self.snapshot.abspath(rel))
        for ref in scan.imports:
            for path in _resolve(ref, here, self.snapshot):
                self._add_module_file(path, ref)

    def follow_module(self, module: str, filename: str | None) -> None:
        """Add a module (by name and the file it was loaded from) to the closure."""
        if filename is None:
            self._add_package(module)
            return
        self._add_module_file(filename, ImportRef(0, module, (), 0))

    def _add_module_file(self, path: str, ref: ImportRef) -> None:
        rel = self.project_rel(path)
        if rel is not None:
            self.add_file(rel)
            return
        kind, name = _classify_outside(path, ref.module)
        if kind == "package":
            self._add_package(name)
        elif kind == "external" and name not in self.external:
            # A module outside the project that no distribution owns (a sys.path hack): it is
            # identified by its module name and content, never by where it lies.
            with open(path, "rb") as f:
                data = f.read()
            blob = hash_bytes(data)
            self.external[name] = blob
            scan = _scan(blob, lambda: data)
            for sub in scan.imports:
                for p in _resolve(sub, os.path.dirname(path), self.snapshot):
                    self._add_module_file(p, sub)

    def _add_package(self, module: str) -> None:
        top = module.split(".")[0]
        if not top or top in self._seen_modules:
            return
        self._seen_modules.add(top)
        if top in sys.stdlib_module_names or top in sys.builtin_module_names:
            return
        for dist, version in _distributions(top):
            if dist.lower() not in UNTRACKED_DISTRIBUTIONS:
                self.packages.add(f"{dist}=={version}")


# -- scanning one file ------------------------------------------------------------------------


def _scan(blob: str, read: Callable[[], bytes]) -> Scan:
    hit = _scans.get(blob)
    if hit is not None:
        return hit
    try:
        tree = ast.parse(read())
    except (SyntaxError, ValueError) as e:
        result = Scan((), (), str(e))
    else:
        result = _scan_tree(tree)
    with _scan_lock:
        _scans[blob] = result
    return result


def _scan_tree(tree: ast.AST) -> Scan:
    imports: list[ImportRef] = []
    dynamic: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports.extend(ImportRef(0, a.name, (), node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names = tuple(a.name for a in node.names if a.name != "*")
            imports.append(ImportRef(node.level, node.module or "", names, node.lineno))
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                level = len(arg.value) - len(arg.value.lstrip("."))
                imports.append(ImportRef(level, arg.value[level:], (), node.lineno))
            else:
                dynamic.append(node.lineno)
    return Scan(tuple(imports), tuple(sorted(dynamic)), None)


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module" and (
            isinstance(func.value, ast.Name) and func.value.id == "importlib"
        )
    return isinstance(func, ast.Name) and func.id in {"import_module", "__import__"}


# -- resolving an import to files ------------------------------------------------------------

_SEPARATORS = re.compile(r"[-_.]+")
_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def _resolve(ref: ImportRef, here: str, snap: Snapshot) -> Iterator[str]:
    """Files an import statement loads: each package `__init__` on the way, the module, and
    for `from m import n` any `n` that is itself a submodule. An absolute name that is found
    nowhere yields a `<module>name` pseudo-path, so an installed package is still recorded."""
    parts = ref.module.split(".") if ref.module else []
    base = here
    locate: Callable[[list[str]], str | None]
    if ref.level:
        for _ in range(ref.level - 1):
            base = os.path.dirname(base)
        init = os.path.join(base, "__init__.py")
        if _exists(init, snap):
            yield init

        def locate(prefix: list[str]) -> str | None:
            return _find_in(base, prefix, snap)
    else:

        def locate(prefix: list[str]) -> str | None:
            return _find_module(".".join(prefix), here, snap)

    found: str | None = base
    for i in range(1, len(parts) + 1):
        found = locate(parts[:i])
        if found is None:
            if not ref.level:
                yield "<module>" + ".".join(parts[:i])
            return
        if not os.path.isdir(found):
            yield found
    if found is None or not ref.names:
        return
    if os.path.isdir(found):
        pkg = found
    elif os.path.basename(found).startswith("__init__."):
        pkg = os.path.dirname(found)
    else:
        return  # a plain module: the names are its attributes
    for n in ref.names:
        sub = _find_in(pkg, [n], snap)
        if sub is not None and not os.path.isdir(sub):
            yield sub


def _exists(path: str, snap: Snapshot) -> bool:
    if snap.mode == "index":
        rel = snap.rel(path)
        if rel is not None:
            return snap.exists(rel)
    return os.path.isfile(path)


def _find_in(base: str, parts: list[str], snap: Snapshot) -> str | None:
    """`base/a/b.py`, `base/a/b/__init__.py`, an extension module, or the directory of a
    namespace package; None when nothing there is that module."""
    stem = os.path.join(base, *parts)
    for cand in (stem + ".py", os.path.join(stem, "__init__.py")):
        if _exists(cand, snap):
            return cand
    for suffix in _SUFFIXES:
        if os.path.isfile(stem + suffix):
            return stem + suffix
    if os.path.isdir(stem):
        return stem
    return None


def _find_module(name: str, here: str, snap: Snapshot) -> str | None:
    mod = sys.modules.get(name)
    if mod is not None and snap.mode == "worktree":
        f = getattr(mod, "__file__", None)
        if f:
            return str(f)
        paths = getattr(mod, "__path__", None)
        if paths:  # a namespace package: a directory
            return str(next(iter(paths)))
        return None  # a builtin module
    parts = name.split(".")
    for d in _search_dirs(here, snap.root):
        found = _find_in(d, parts, snap)
        if found is not None:
            return found
    return None


def _search_dirs(here: str, root: str) -> list[str]:
    dirs = [os.path.realpath(p or os.getcwd()) for p in sys.path if isinstance(p, str)]
    # A script's own directory is sys.path[0] when it runs; the project root is where
    # `python -m` and doit put it. Both come after the real sys.path.
    return [*dirs, here, root]


_env_dirs: dict[str, bool] = {}
_STDLIB = {
    os.path.realpath(p) for k in ("stdlib", "platstdlib") if (p := sysconfig.get_paths().get(k))
}


def _in_site_packages(path: str) -> bool:
    parts = path.replace(os.sep, "/").split("/")
    return "site-packages" in parts or "dist-packages" in parts


def _in_environment(path: str, root: str) -> bool:
    """True for files of an installed environment: site-packages, or a virtualenv or conda
    environment kept inside the project."""
    if _in_site_packages(path):
        return True
    d = os.path.dirname(path)
    chain = []
    while (d == root or d.startswith(root + os.sep)) and d not in _env_dirs:
        chain.append(d)
        if d == root:
            break
        d = os.path.dirname(d)
    verdict = _env_dirs.get(d, False)
    for c in reversed(chain):
        verdict = (
            verdict
            or os.path.exists(os.path.join(c, "pyvenv.cfg"))
            or os.path.isdir(os.path.join(c, "conda-meta"))
        )
        _env_dirs[c] = verdict
    return verdict


def _classify_outside(path: str, module: str) -> tuple[str, str]:
    """("package", module) for files of installed distributions or unresolvable names,
    ("stdlib", module), or ("external", module) for a plain file no distribution owns."""
    if path.startswith("<module>"):
        return "package", path[len("<module>") :]
    real = os.path.realpath(path)
    if _in_site_packages(real):
        return "package", module
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or any(real.startswith(p + os.sep) for p in _STDLIB):
        return "stdlib", module
    if _distributions(top):
        return "package", module
    return "external", module


@functools.lru_cache(maxsize=1)
def _dist_info_dirs() -> dict[str, str]:
    """Canonical distribution name -> version, read from the `<name>-<version>.dist-info`
    directory names pip writes on sys.path: a directory listing, instead of importlib.metadata's
    50 ms import. The first entry on sys.path wins, as for imports."""
    found: dict[str, str] = {}
    for d in sys.path:
        try:
            names = os.listdir(d or os.curdir)
        except OSError:
            continue
        for n in names:
            if n.endswith(".dist-info"):
                name, _, version = n[: -len(".dist-info")].partition("-")
                found.setdefault(_canonical_dist(name), version)
    return found


@functools.cache
def _distributions(top: str) -> tuple[tuple[str, str], ...]:
    """The installed distributions providing top-level module `top`, with versions."""
    fast = _dist_info_dirs().get(_canonical_dist(top))
    if fast:  # the common case: the distribution is named like its module
        return ((_canonical_dist(top), fast),)
    import importlib.metadata
    import importlib.util

    # The full scan below reads every installed distribution (~0.2 s): only pay it for a
    # module that is installed at all (an optional `try: import x` usually is not).
    try:
        if importlib.util.find_spec(top) is None:
            return ()
    except (ImportError, ValueError):
        return ()

    out = []
    for n in sorted(set(_packages_distributions().get(top, []))):
        try:
            out.append((_canonical_dist(n), importlib.metadata.version(n)))
        except importlib.metadata.PackageNotFoundError:
            continue
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    import importlib.metadata

    return dict(importlib.metadata.packages_distributions())


def _canonical_dist(name: str) -> str:
    return _SEPARATORS.sub("-", name).lower()


# -- describing a callable --------------------------------------------------------------------


def describe(fn: Any, ctx: Context, path: str = "fn") -> dict[str, Any]:
    """The code identity of `fn`: {"target": ..., "args": ...}; its files and packages are
    added to `ctx`. `args` holds what the callable carries with it, canonically encoded."""
    args: dict[str, Any] = {}
    if isinstance(fn, functools.partial):
        inner = describe(fn.func, ctx, f"{path}.func")
        args["partial"] = {
            "args": ctx.encode(fn.args, f"{path}.args"),
            "keywords": ctx.encode(fn.keywords, f"{path}.keywords"),
        }
        if inner["args"]:
            args["func"] = inner["args"]
        return {"target": inner["target"], "args": args}
    if isinstance(fn, types.MethodType):
        inner = describe(fn.__func__, ctx, f"{path}.__func__")
        args["self"] = _state(fn.__self__, ctx, f"{path}.__self__")
        args.update(inner["args"])
        return {"target": inner["target"], "args": args}
    if isinstance(fn, types.FunctionType):
        return _function(fn, ctx, path)
    if isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        owner = getattr(fn, "__self__", None)
        if owner is not None and not isinstance(owner, types.ModuleType):
            args["self"] = _state(owner, ctx, f"{path}.__self__")
        return {"target": _named(fn, ctx, path), "args": args}
    if isinstance(fn, type):
        return {"target": _named(fn, ctx, path), "args": args}
    if callable(fn):
        if _lookup(getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)) is fn:
            # A named callable object from a module (a numpy ufunc, say): by reference.
            return {"target": _named(fn, ctx, path), "args": args}
        call = type(fn).__call__
        if isinstance(call, types.FunctionType):
            inner = _function(call, ctx, f"{path}.__call__")
            args["self"] = _state(fn, ctx, path)
            args.update(inner["args"])
            return {"target": inner["target"], "args": args}
        return {"target": _named(type(fn), ctx, path), "args": {"self": _state(fn, ctx, path)}}
    raise ClosureError(f"{path}: {fn!r} is not callable")


def _function(fn: types.FunctionType, ctx: Context, path: str) -> dict[str, Any]:
    code = fn.__code__
    module = fn.__module__ or "__main__"
    target: dict[str, Any] = {"module": module, "qualname": fn.__qualname__}
    args: dict[str, Any] = {}
    if "<lambda>" in fn.__qualname__ or "<locals>" in fn.__qualname__:
        # Two lambdas in one file share a qualname; their line and bytecode tell them apart.
        target["line"] = code.co_firstlineno
        target["code"] = _code_digest(code)
    if fn.__closure__:
        cells = {}
        for name, cell in zip(code.co_freevars, fn.__closure__, strict=True):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later)
                cells[name] = {"empty-cell": None}
                continue
            cells[name] = ctx.encode(value, f"{path}.<closure {name}>")
        args["closure"] = cells

    files = {f for f in (code.co_filename, fn.__globals__.get("__file__")) if f}
    in_root = sorted(
        rel for f in files if os.path.isfile(f) and (rel := ctx.project_rel(f)) is not None
    )
    if in_root:
        for rel in in_root:
            ctx.add_file(rel)
        # A function made by exec() has no file of its own; its module's file identifies it.
        if os.path.isfile(code.co_filename):
            target["file"] = ctx.snapshot.rel(code.co_filename)
        # The code in memory is the code in the files, and the module values it reads.
        liveness.follow_globals(fn, ctx)
        return {"target": target, "args": args}
    if module != "__main__" and _lookup(module, fn.__qualname__) is fn:
        # Defined in an installed package or the standard library: by name and version.
        mod = sys.modules.get(module)
        ctx.follow_module(module, getattr(mod, "__file__", None))
        return {"target": target, "args": args}
    # No file in the project: a notebook cell, `python -c`, an exec'd string, or a script
    # outside any repository. Its source text (or, without source, its bytecode) identifies
    # it, and the globals it reads are followed like arguments.
    import inspect

    try:
        source = inspect.getsource(fn)
        target["source"] = canonical.digest(source.encode())
    except (OSError, TypeError):
        target["code"] = _code_digest(code)
    if fn.__defaults__:
        args["defaults"] = ctx.encode(fn.__defaults__, f"{path}.__defaults__")
    if fn.__kwdefaults__:
        args["kwdefaults"] = ctx.encode(fn.__kwdefaults__, f"{path}.__kwdefaults__")
    used = _global_names(code)
    glb = {}
    for name in sorted(used):
        if name not in fn.__globals__:
            continue
        value = fn.__globals__[name]
        if isinstance(value, types.ModuleType):
            ctx.follow_module(value.__name__, getattr(value, "__file__", None))
            glb[name] = {"module": value.__name__}
        else:
            glb[name] = ctx.encode(value, f"{path}.__globals__[{name!r}]")
    if glb:
        args["globals"] = glb
    return {"target": target, "args": args}


def _named(obj: Any, ctx: Context, path: str) -> dict[str, Any]:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not module or not qualname or _lookup(module, qualname) is not obj:
        raise ClosureError(
            f"{path}: cannot identify {obj!r}: it is not reachable as {module}.{qualname}. "
            f"Use a module-level function instead."
        )
    ctx.follow_module(module, getattr(sys.modules.get(module), "__file__", None))
    return {"module": module, "qualname": qualname}


def _lookup(module: str | None, qualname: str | None) -> Any:
    if not module or not qualname or "<" in qualname:
        return None
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _state(obj: Any, ctx: Context, path: str) -> canonical.Encoded:
    """The state of an instance a callable is bound to: its canonical encoding when it has
    one, else its class and attributes."""
    try:
        return ctx.encode(obj, path)
    except UnhashableArgumentError as e:
        if e.path != path:
            raise
    tp = type(obj)
    _named(tp, ctx, f"{path}.__class__")
    attrs: dict[str, Any] = {}
    if hasattr(obj, "__dict__"):
        attrs.update(vars(obj))
    for cls in tp.__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                attrs[slot] = getattr(obj, slot)
    fields = [[k, ctx.encode(v, f"{path}.{k}")] for k, v in sorted(attrs.items())]
    return {"object": [f"{tp.__module__}:{tp.__qualname__}", fields]}


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _code_digest(code: types.CodeType) -> str:
    """Bytecode, constants and names, recursively, without line tables or file names."""
    parts: list[bytes] = [code.co_code]
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            parts.append(_code_digest(c).encode())
        else:
            parts.append(_const_repr(c).encode())
    parts.append("\0".join(code.co_names + code.co_varnames + code.co_freevars).encode())
    return canonical.digest(b"\1".join(parts))


def _const_repr(c: object) -> str:
    # frozenset constants (`x in {"a", "b"}`) iterate in hash order: sort them.
    if isinstance(c, frozenset):
        return "frozenset:" + ",".join(sorted(_const_repr(e) for e in c))
    if isinstance(c, tuple):
        return "tuple:(" + ",".join(_const_repr(e) for e in c) + ")"
    return f"{type(c).__name__}:{c!r}"
