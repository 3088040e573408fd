"""The import graph of project code: what each Python file's imports reach.

Owns: scanning a file for its imports (a static AST walk, memoized by blob id in this process
and in the store's code cache), resolving each import as Python would, and the per-snapshot
memo of every file's resolved edges, so that all stages of a pipeline walk one shared graph.

Resolution is Python's path-based import: `sys.modules` first (in work-tree mode: what is
loaded is what runs), then `importlib.machinery.FileFinder`s over `sys.path`, followed by the
importing file's own directory and the project root (where a script and `python -m`/doit put
them), with `PathFinder`'s precedence: the first regular package or module wins, namespace
portions are gathered only when none is found. So a directory named like an installed
package (a `wandb/` of run logs, a `tokenizers/` data folder) does not shadow it. For
`verify --staged` (index mode) a directory inside the project is listed from the git index,
under the same rules, since the files on disk may differ from what is staged.

Must never: import a module to find it (that would run user code), follow files into
site-packages or a virtualenv, or trust a cached scan that is not a well-formed scan.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import json
import os
import stat
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from hfbuild.caches import RACY_NS, CodeCache
from hfbuild.gitrepo import hash_bytes
from hfbuild.gitstate import Snapshot


class ImportRef(NamedTuple):
    level: int  # 0 for absolute imports, n for n leading dots
    module: str  # "a.b" ("" for `from . import x`)
    names: tuple[str, ...]  # names of a `from` import; () for `import a.b`
    lineno: int


class Scan(NamedTuple):
    imports: tuple[ImportRef, ...]
    dynamic: tuple[int, ...]  # lines of import_module/__import__ calls with a non-literal name
    error: str | None  # why the file could not be parsed, if it could not
    env: tuple[str, ...] = ()  # environment variables it reads by literal name, sorted


class Edges(NamedTuple):
    """What one file's imports reach, resolved."""

    files: tuple[str, ...]  # project files (repo-relative)
    packages: tuple[str, ...]  # module names outside the project (installed, stdlib, missing)
    external: tuple[tuple[str, str], ...]  # (module, absolute path): files no distribution owns
    incomplete: tuple[str, ...]  # "path:line: why"
    env: tuple[str, ...] = ()  # environment variables the files read by literal name


# -- scanning one file ------------------------------------------------------------------------

_scan_lock = threading.Lock()
_scans: dict[str, Scan] = {}  # blob id -> Scan


def scan(blob: str, read: Callable[[], bytes], cache: CodeCache | None = None) -> Scan:
    """The imports of the file with blob id `blob` (`read` gives its bytes if needed)."""
    hit = _scans.get(blob)
    if hit is not None:
        return hit
    stored = cache.scan(blob) if cache is not None else None
    result = _decode(stored) if stored is not None else None
    if result is None:
        try:
            tree = ast.parse(read())
        except (SyntaxError, ValueError) as e:
            result = Scan((), (), str(e))
        else:
            result = _scan_tree(tree)
        if cache is not None:
            cache.put_scan(blob, _encode(result))
    with _scan_lock:
        _scans[blob] = result
    return result


def _encode(s: Scan) -> list[Any]:
    refs = [[r.level, r.module, list(r.names), r.lineno] for r in s.imports]
    return [refs, list(s.dynamic), s.error, list(s.env)]


def _decode(v: Any) -> Scan | None:
    """A cached scan, or None when the value is not exactly the shape `_encode` writes."""
    try:
        refs, dynamic, error, env = v
        imports = []
        for level, module, names, lineno in refs:
            if not (
                type(level) is int
                and isinstance(module, str)
                and all(isinstance(n, str) for n in names)
                and type(lineno) is int
            ):
                return None
            imports.append(ImportRef(level, module, tuple(names), lineno))
        if not all(type(n) is int for n in dynamic):
            return None
        if not (error is None or isinstance(error, str)):
            return None
        if not all(isinstance(n, str) for n in env):
            return None
        return Scan(tuple(imports), tuple(dynamic), error, tuple(env))
    except (TypeError, ValueError):
        return None


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
    # Only a file that imports os can read the environment by name: the others (most of a
    # closure) skip the second walk.
    reads_env = any(r.module.split(".")[0] == "os" for r in imports if not r.level)
    return Scan(tuple(imports), tuple(sorted(dynamic)), None, _env_reads(tree) if reads_env else ())


def _env_reads(tree: ast.AST) -> tuple[str, ...]:
    """Names of the environment variables a file reads by a literal name, anywhere in it
    (module level included): `os.environ["X"]`, `os.environ.get("X")`,
    `os.environ.setdefault("X", ...)`, `"X" in os.environ`, `os.getenv("X")`, also through
    `import os as o` and `from os import environ, getenv` under any alias. Aliases are taken
    file-wide, ignoring scopes: a name too many only adds a variable to the key."""
    mods: set[str] = set()  # names bound to the os module
    environs: set[str] = set()  # names bound to os.environ
    getenvs: set[str] = set()  # names bound to os.getenv
    # (name read, the expression that must be os.environ or os.getenv, whether it is a call)
    reads: list[tuple[str, ast.expr, bool]] = []
    for node in ast.walk(tree):
        # Exact types, most frequent first: this visits every node of the file.
        if type(node) is ast.Call:
            if node.args and (name := _literal(node.args[0])) is not None:
                f = node.func
                if type(f) is ast.Attribute and f.attr in ("get", "setdefault"):
                    reads.append((name, f.value, False))
                else:
                    reads.append((name, f, True))
        elif type(node) is ast.Subscript:
            if type(node.ctx) is ast.Load and (name := _literal(node.slice)) is not None:
                reads.append((name, node.value, False))
        elif type(node) is ast.Compare:
            if (
                len(node.ops) == 1
                and type(node.ops[0]) in (ast.In, ast.NotIn)
                and (name := _literal(node.left)) is not None
            ):
                reads.append((name, node.comparators[0], False))
        elif type(node) is ast.Import:
            for a in node.names:  # `import os.path` binds os; `import os.path as p` does not
                if a.name == "os" or (a.name.startswith("os.") and not a.asname):
                    mods.add(a.asname or "os")
        elif type(node) is ast.ImportFrom and node.module == "os" and not node.level:
            for a in node.names:
                if a.name == "environ":
                    environs.add(a.asname or a.name)
                elif a.name == "getenv":
                    getenvs.add(a.asname or a.name)
    if not (mods or environs or getenvs):
        return ()

    def is_os(e: ast.expr, attr: str, aliases: set[str]) -> bool:
        if isinstance(e, ast.Name):
            return e.id in aliases
        return (
            isinstance(e, ast.Attribute)
            and e.attr == attr
            and isinstance(e.value, ast.Name)
            and e.value.id in mods
        )

    return tuple(
        sorted(
            {
                name
                for name, e, call in reads
                if (is_os(e, "getenv", getenvs) if call else is_os(e, "environ", environs))
            }
        )
    )


def _literal(e: ast.expr) -> str | None:
    return e.value if isinstance(e, ast.Constant) and isinstance(e.value, str) else None


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module" and (
            isinstance(func.value, ast.Name) and func.value.id == "importlib"
        )
    return isinstance(func, ast.Name) and func.id in {"import_module", "__import__"}


# -- finding a module as Python would --------------------------------------------------------


class Found(NamedTuple):
    """Where a module is: its file (None for a namespace package) and, for a package, the
    directories its submodules are searched in."""

    origin: str | None
    locations: tuple[str, ...] | None


_LOADERS = (
    (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
    (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
)


# What one resolution rested on, each a key whose value `Resolver.fact` computes again:
# "d:<dir>" a directory listing (`Resolver.dir_key`), "m:<name>" (a digest of) what
# `sys.modules` holds for a name, "x:<name>" what the meta-path finders say of a name found
# in no directory, "s:" the `sys.path` a top-level name was searched on; and, computed by the
# graph when targets are sorted, "p:<dir>" (a digest of) the project root, the directory's real
# path and its environment verdict, "k:<module>|<path>" an outside target's kind. A value None
# means "cannot be checked later": the resolution is then not recorded.
Facts = dict[str, Any]


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def _encode_found(found: Found | None) -> Any:
    if found is None:
        return []
    return [found.origin, list(found.locations) if found.locations is not None else None]


def _encode_loaded(loaded: tuple[bool, Found | None]) -> Any:
    return [loaded[0], _encode_found(loaded[1])]


_ABSENT: Any = object()  # the finder of a sys.path entry that does not exist

_STANDARD_FINDERS = (
    importlib.machinery.BuiltinImporter,
    importlib.machinery.FrozenImporter,
    importlib.machinery.PathFinder,
)


class Resolver:
    """Finds modules for one snapshot. Each directory gets its own `FileFinder`, created for
    this snapshot (so files added since an earlier snapshot are seen, and the interpreter's
    own finder caches are left alone); the order across directories is `PathFinder`'s."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self.sys_path = tuple(
            os.path.realpath(p or os.getcwd()) for p in sys.path if isinstance(p, str)
        )
        self._finders: dict[str, Any] = {}
        self._memo: dict[tuple[str, tuple[str, ...]], tuple[Found | None, Facts]] = {}
        # What the resolution being recorded rested on (see `Facts`); None: not recording.
        self.facts: Facts | None = None
        self._dir_keys: dict[str, str | None] = {}
        self._sys_path_digest: str | None = None

    def fact(self, key: str) -> Any:
        """The current value of a fact (see `Facts`), as `record` would note it now."""
        kind, _, arg = key.partition(":")
        if kind == "d":
            return self.dir_key(arg)
        if kind == "m":
            return _digest(_encode_loaded(self._loaded(arg)))
        if kind == "x":
            return _digest(_encode_found(self._meta(arg)))
        if kind == "s":
            return self._search_path_digest()
        return None

    def _search_path_digest(self) -> str:
        if self._sys_path_digest is None:
            self._sys_path_digest = _digest(list(self.sys_path))
        return self._sys_path_digest

    def _note(self, key: str, value: Any) -> None:
        if self.facts is not None:
            self.facts[key] = value

    def dir_key(self, path: str) -> str | None:
        """What a `FileFinder` listing of `path` rests on: a directory's mtime, ctime and
        inode ("absent", "other" for a missing path or a file); None when the directory
        changed within the racy window (2 s), when a later change in the same timestamp tick
        could keep its stat data. Memoized per snapshot."""
        if path in self._dir_keys:
            return self._dir_keys[path]
        key: str | None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            key = "absent"
        except OSError:
            key = None
        else:
            if not stat.S_ISDIR(st.st_mode):
                key = "other"
            elif time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) <= RACY_NS:
                key = None
            else:
                key = f"{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
        self._dir_keys[path] = key
        return key

    def find(self, fullname: str, path: Sequence[str]) -> Found | None:
        """The module `fullname` searched in directories `path`, as `PathFinder.find_spec`
        does: the first entry holding a module or regular package wins; otherwise the
        namespace portions of all entries make a namespace package."""
        key = (fullname, tuple(path))
        hit = self._memo.get(key)
        if hit is not None:
            if self.facts is not None:
                self.facts.update(hit[1])
            return hit[0]
        outer, self.facts = self.facts, {}
        portions: list[str] = []
        result: Found | None = None
        try:
            for entry in path:
                found = self._find_in(fullname, entry)
                if found is None:
                    continue
                if found.origin is not None:
                    result = found
                    break
                portions.extend(found.locations or ())
            if result is None and portions:
                result = Found(None, tuple(portions))
            self._memo[key] = (result, self.facts)
        finally:
            if outer is not None:
                outer.update(self.facts)
            self.facts = outer
        return result

    def _find_in(self, fullname: str, entry: str) -> Found | None:
        if self.snap.mode == "index" and self._in_project(entry):
            return self._find_in_index(fullname, entry)
        if self.facts is not None:
            # A FileFinder's answer rests on the listing of `entry`, and of the package
            # directory `entry/<name>` whose __init__ it looks for.
            self._note("d:" + entry, self.dir_key(entry))
            tail = os.path.join(entry, fullname.rpartition(".")[2])
            self._note("d:" + tail, self.dir_key(tail))
        finder = self._finders.get(entry)
        if finder is None:
            if os.path.isdir(entry):
                finder = importlib.machinery.FileFinder(entry, *_LOADERS)
            elif not os.path.exists(entry):
                finder = _ABSENT  # no importer accepts a missing path (python311.zip)
            else:  # a zip file or another importer's entry: the interpreter's own finder
                finder = importlib.machinery.PathFinder
            self._finders[entry] = finder
        if finder is _ABSENT:
            return None  # its fact, "absent", changes when it appears
        if finder is importlib.machinery.PathFinder:
            self._note("d:" + entry, None)  # another importer's entry: not recorded
            spec = finder.find_spec(fullname, [entry])
        else:
            spec = finder.find_spec(fullname)
        if spec is None:
            return None
        locs = spec.submodule_search_locations
        locations = tuple(locs) if locs is not None else None
        if spec.loader is None:
            return Found(None, locations or ()) if locations else None
        return Found(spec.origin if spec.has_location else None, locations)

    def _in_project(self, entry: str) -> bool:
        root = self.snap.root
        return (entry == root or entry.startswith(root + os.sep)) and not in_environment(
            os.path.join(entry, "x"), root
        )

    def _find_in_index(self, fullname: str, entry: str) -> Found | None:
        """`FileFinder.find_spec`'s rules applied to the files the index holds: a directory
        with `__init__.py` is a regular package, before a `name.py` module; a directory
        without one is a namespace portion. (Extension modules are never staged sources.)"""
        base = os.path.join(entry, fullname.rpartition(".")[2])
        rel = self.snap.rel(base)
        if rel is None:
            return None
        is_dir = self.snap.staged_dir(rel)
        if is_dir:
            for suffix in importlib.machinery.SOURCE_SUFFIXES:
                if self.snap.exists(f"{rel}/__init__{suffix}"):
                    return Found(os.path.join(base, "__init__" + suffix), (base,))
        for suffix in importlib.machinery.SOURCE_SUFFIXES:
            if self.snap.exists(rel + suffix):
                return Found(base + suffix, None)
        return Found(None, (base,)) if is_dir else None

    def exists(self, path: str) -> bool:
        """Whether the file at `path` is there, in this snapshot's view."""
        if self.snap.mode == "index":
            rel = self.snap.rel(path)
            if rel is not None:
                return self.snap.exists(rel)
        directory = os.path.dirname(path)
        self._note("d:" + directory, self.dir_key(directory))
        return os.path.isfile(path)

    def loaded(self, name: str) -> tuple[bool, Found | None]:
        """In work-tree mode, a module already imported is the one Python would use:
        (True, its Found, None for a builtin); (False, None) when it is not loaded."""
        result = self._loaded(name)
        if self.facts is not None:
            self.facts["m:" + name] = _digest(_encode_loaded(result))
        return result

    def _loaded(self, name: str) -> tuple[bool, Found | None]:
        mod = sys.modules.get(name) if self.snap.mode == "worktree" else None
        if mod is None:
            return False, None
        f = getattr(mod, "__file__", None)
        paths = getattr(mod, "__path__", None)
        locations = tuple(str(p) for p in paths) if paths is not None else None
        if f:
            return True, Found(str(f), locations)
        if locations:
            return True, Found(None, locations)  # a namespace package
        return True, None  # a builtin module

    def resolve(self, ref: ImportRef, here: str) -> Iterator[str]:
        """Files an import statement in a file in directory `here` loads: each package
        `__init__` on the way, the module, and for `from m import n` any `n` that is itself
        a submodule. An absolute name found nowhere yields a `<module>name` pseudo-path, so
        an installed package is still recorded."""
        parts = ref.module.split(".") if ref.module else []
        locations: tuple[str, ...] | None = None
        prefix = ""
        if ref.level:
            base = here
            for _ in range(ref.level - 1):
                base = os.path.dirname(base)
            init = os.path.join(base, "__init__.py")
            if self.exists(init):
                yield init
            locations = (base,)
            prefix = "_"  # a finder looks at the last part of a name only
        for i, part in enumerate(parts):
            name = f"{prefix}.{part}" if prefix else part
            is_loaded, found = (False, None) if ref.level else self.loaded(name)
            if not is_loaded:
                top = not ref.level and i == 0
                found = self._find_top(name, here) if top else self.find(name, locations or ())
            if found is None:
                if not ref.level:
                    yield "<module>" + name
                return
            if found.origin is not None:
                yield found.origin
            if found.locations is None and i < len(parts) - 1:
                return  # a plain module has no submodules: the import fails in Python too
            locations, prefix = found.locations, name
        if not ref.names or locations is None:
            return  # a plain module: the names are its attributes
        for n in ref.names:
            is_loaded, sub = (False, None) if ref.level else self.loaded(f"{prefix}.{n}")
            if not is_loaded:
                sub = self.find(f"{prefix}.{n}", locations)
            if sub is not None and sub.origin is not None:
                yield sub.origin

    def _find_top(self, name: str, here: str) -> Found | None:
        """A top-level module: on sys.path, else (as a script or `python -m` would see it)
        in the importing file's directory or the project root."""
        if name in sys.builtin_module_names:
            return None
        self._note("s:", self._search_path_digest())  # the rest is in the resolution's key
        found = self.find(name, (*self.sys_path, here, self.snap.root))
        if found is None:
            found = self._find_meta(name)
        return found

    def _find_meta(self, name: str) -> Found | None:
        """A top-level module that no directory holds, from the finders Python consults after
        the path finder (an editable install's finder maps names to its source tree). They
        map names to files; no module is imported."""
        found = self._meta(name)
        self._note("x:" + name, _digest(_encode_found(found)))
        return found

    def _meta(self, name: str) -> Found | None:
        for finder in sys.meta_path:
            if finder in _STANDARD_FINDERS or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, None)
            if spec is None:
                continue
            locs = spec.submodule_search_locations
            locations = tuple(locs) if locs is not None else None
            origin = spec.origin if spec.has_location else None
            if origin is not None or locations:
                return Found(origin, locations)
        return None


# -- where files lie --------------------------------------------------------------------------

_env_dirs: dict[str, bool] = {}
_STDLIB = {
    os.path.realpath(p) for k in ("stdlib", "platstdlib") if (p := sysconfig.get_paths().get(k))
}


def in_site_packages(path: str) -> bool:
    parts = path.replace(os.sep, "/").split("/")
    return "site-packages" in parts or "dist-packages" in parts


def in_environment(path: str, root: str) -> bool:
    """True for files of an installed environment: site-packages, or a virtualenv or conda
    environment kept inside the project."""
    if in_site_packages(path):
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


def outside_kind(path: str, module: str) -> str:
    """ "package" for files of installed distributions and unresolvable names, "stdlib", or
    "file" for a plain file outside the project (the caller decides whether a distribution
    owns its module)."""
    if path.startswith("<module>"):
        return "package"
    real = os.path.realpath(path)
    if in_site_packages(real):
        return "package"
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or any(real.startswith(p + os.sep) for p in _STDLIB):
        return "stdlib"
    return "file"


# -- the graph of one snapshot ----------------------------------------------------------------


class Graph:
    """Every file's resolved imports within one snapshot, computed once and shared by all
    the closures walked in it."""

    def __init__(self, snap: Snapshot, cache: CodeCache | None) -> None:
        self.snap = snap
        self.cache = cache
        self.resolver = Resolver(snap)
        self._edges: dict[str, Edges] = {}
        self._external: dict[str, tuple[str, Edges]] = {}
        self._rel: dict[str, str | None] = {}
        self._kinds: dict[tuple[str, str], str] = {}
        self._statements: dict[tuple[int, str, tuple[str, ...], str], tuple[tuple[str, ...], Facts]]
        self._statements = {}
        self._closures: dict[str, Edges] = {}
        self._closure_sets: dict[str, _Sets] = {}  # every complete closure, as `_walk` merges them
        self._resolving = threading.Lock()
        self._facts: Facts = {}  # each fact's value now, computed once

    def project_rel(self, path: str) -> str | None:
        """`path` relative to the project root when it is project code: inside the root and
        not in an environment (a virtualenv) kept there; else None."""
        if path in self._rel:
            return self._rel[path]
        rel: str | None = None
        if not path.startswith("<module>"):
            rel = self.snap.rel(path)
            if rel is not None and in_environment(os.path.abspath(path), self.snap.root):
                rel = None
        self._rel[path] = rel
        return rel

    def edges(self, rel: str, blob: str) -> Edges:
        """The resolved imports of project file `rel` (whose blob id is `blob`)."""
        hit = self._edges.get(rel)
        if hit is None:
            here = os.path.dirname(self.snap.abspath(rel))
            key = self._resolution_key(rel, blob)
            hit = self._stored(key) if key is not None else None
            if hit is None:
                hit = self._resolve_file(rel, blob, here, key)
            self._edges[rel] = hit
        return hit

    def _resolution_key(self, rel: str, blob: str) -> str | None:
        """Where a file's resolution is kept in the code cache: its absolute path (so its
        directory and the project root) and blob id (None: not kept, in index mode)."""
        if self.cache is None or self.snap.mode != "worktree":
            return None
        return f"{self.snap.abspath(rel)}|{blob}"

    def _resolve_file(self, rel: str, blob: str, here: str, key: str | None) -> Edges:
        s = scan(blob, lambda: self.snap.read(rel), self.cache)
        incomplete = []
        if s.error:
            incomplete.append(f"{rel}: cannot be parsed ({s.error})")
        for line in s.dynamic:
            incomplete.append(
                f"{rel}:{line}: a dynamic import with a computed module name; edits to the "
                f"module it loads are not seen (import it statically, or list it in "
                f"file_deps)"
            )
        facts: Facts = {}
        targets = self._targets(s, here, facts)
        edges = self._classify(targets, tuple(incomplete), facts)._replace(env=s.env)
        if key is not None and self.cache is not None and None not in facts.values():
            self.cache.put_resolution(key, {"facts": facts, "edges": _encode_edges(edges)})
        return edges

    def _stored(self, key: str) -> Edges | None:
        """A file's resolved imports from the code cache, when every fact they rested on
        still holds (each fact is computed once per snapshot); None otherwise."""
        assert self.cache is not None
        stored = self.cache.resolution(key)
        try:
            facts = stored["facts"]
            edges = _decode_edges(stored["edges"])
        except (TypeError, KeyError):
            return None
        if edges is None or not isinstance(facts, dict):
            return None
        known = self._facts
        for k, v in facts.items():
            now = known.get(k, _UNSET)
            if now is _UNSET:
                now = self._now(k)
            if now is None or now != v:
                return None
        return edges

    def _now(self, key: str) -> Any:
        """A fact's value now (see `Facts`), computed once per snapshot."""
        now = self._facts.get(key, _UNSET)
        if now is _UNSET:
            now = self._facts[key] = self._fact(key)
        return now

    def _fact(self, key: str) -> Any:
        if not isinstance(key, str):
            return None
        kind, _, arg = key.partition(":")
        if kind == "p":
            return self._dir_class(arg)
        if kind == "k":
            module, _, path = arg.partition("|")
            return outside_kind(path, module)
        return self.resolver.fact(key)

    def _dir_class(self, directory: str) -> str:
        """What `project_rel` of a file in `directory` rests on: the project root, the
        directory's real path and whether it lies in an environment kept in the project."""
        real = os.path.realpath(directory)
        env = in_environment(os.path.join(directory, "x"), self.snap.root)
        return _digest([self.snap.root, real, env])

    def closure(self, rel: str) -> Edges:
        """Project file `rel` and everything its imports reach through project files,
        transitively (files outside the project are left to the caller). Computed once per
        file per snapshot; a file on an import cycle is memoized only at the cycle's entry,
        where its closure is complete."""
        hit = self._closures.get(rel)
        if hit is None:
            files, packages, external, incomplete, env = self._walk(rel, {}, 0)[1]
            hit = Edges(
                tuple(files),
                tuple(packages),
                tuple(external),
                tuple(incomplete),
                tuple(sorted(env)),
            )
            self._closures[rel] = hit
        return hit

    def _walk(self, rel: str, stack: dict[str, int], depth: int) -> tuple[int, _Sets]:
        """(the lowest stack depth an import cycle from `rel` reached, its closure's parts as
        ordered dicts, which merge into a parent's without copying). Only the files asked for
        by `closure` become `Edges`: the modules between them (a chain of 20 in each of 20
        stages) are merged, never turned into tuples."""
        done = self._closure_sets.get(rel)
        if done is not None:
            return depth, done
        stack[rel] = depth
        files: dict[str, None] = {rel: None}
        packages: dict[str, None] = {}
        external: dict[tuple[str, str], None] = {}
        incomplete: dict[str, None] = {}
        env: set[str] = set()
        low = depth
        if rel.endswith(".py"):
            e = self.edges(rel, self.snap.file_id(rel).id)
            packages.update(dict.fromkeys(e.packages))
            external.update(dict.fromkeys(e.external))
            incomplete.update(dict.fromkeys(e.incomplete))
            env.update(e.env)
            for child in e.files:
                if child in stack:  # a cycle back to a file being walked
                    low = min(low, stack[child])
                    continue
                if child in files:
                    continue
                sub_low, (sub_files, sub_packages, sub_external, sub_incomplete, sub_env) = (
                    self._walk(child, stack, depth + 1)
                )
                low = min(low, sub_low)
                files.update(sub_files)
                if sub_packages:
                    packages.update(sub_packages)
                if sub_external:
                    external.update(sub_external)
                if sub_incomplete:
                    incomplete.update(sub_incomplete)
                env.update(sub_env)
        del stack[rel]
        sets = (files, packages, external, incomplete, env)
        if low >= depth:  # nothing reached a file above this one: complete
            self._closure_sets[rel] = sets
        return low, sets

    def external(self, module: str, path: str) -> tuple[str, Edges]:
        """(blob id, resolved imports) of a module file outside the project that no
        distribution owns (a sys.path hack): identified by name and content, never by path."""
        hit = self._external.get(path)
        if hit is None:
            with open(path, "rb") as f:
                data = f.read()
            blob = hash_bytes(data)
            s = scan(blob, lambda: data, self.cache)
            targets = self._targets(s, os.path.dirname(path), {})
            edges = self._classify(targets, (), {})._replace(env=s.env)
            hit = self._external[path] = (blob, edges)
        return hit

    def module(self, module: str, filename: str) -> Edges:
        """The edge to a module loaded from `filename` (a callable's defining module)."""
        return self._classify([(filename, module)], (), {})

    def _targets(self, s: Scan, here: str, facts: Facts) -> list[tuple[str, str]]:
        """(path, module) of every file the scanned imports load; what the resolution rested
        on is added to `facts`."""
        targets: list[tuple[str, str]] = []
        for ref in s.imports:
            # The same statement in the same directory resolves the same way (`import os`
            # in every file): resolved once per snapshot.
            key = (ref.level, ref.module, ref.names, here)
            hit = self._statements.get(key)
            if hit is None:
                # The resolver notes facts on itself: one statement at a time, so a thread's
                # facts never land in another's record.
                with self._resolving:
                    self.resolver.facts = {}
                    try:
                        paths = tuple(self.resolver.resolve(ref, here))
                        hit = self._statements[key] = (paths, self.resolver.facts)
                    finally:
                        self.resolver.facts = None
            facts.update(hit[1])
            targets.extend((p, ref.module) for p in hit[0])
        return targets

    def _classify(
        self, targets: list[tuple[str, str]], incomplete: tuple[str, ...], facts: Facts
    ) -> Edges:
        """Targets sorted into project files, packages and outside files; what that rested
        on is added to `facts` ("p:<dir>", "k:<module>|<path>")."""
        files: dict[str, None] = {}
        packages: dict[str, None] = {}
        external: dict[tuple[str, str], None] = {}
        for path, module in targets:
            if not path.startswith("<module>"):
                d = "p:" + os.path.dirname(os.path.abspath(path))
                facts[d] = self._now(d)
            rel = self.project_rel(path)
            if rel is not None:
                files[rel] = None
                continue
            kind = self._kinds.get((path, module))
            if kind is None:
                kind = self._kinds[(path, module)] = outside_kind(path, module)
            if not path.startswith("<module>"):
                facts[f"k:{module}|{path}"] = kind
            if path.startswith("<module>"):
                packages[path[len("<module>") :]] = None
            elif kind == "package":
                packages[module] = None
            elif kind == "file":
                external[(module, path)] = None
            # stdlib files: nothing to record
        return Edges(tuple(files), tuple(packages), tuple(external), incomplete)


_UNSET = object()
# A closure's files, packages, external files and incomplete lines as ordered dicts, and its
# environment variables.
_Sets = tuple[
    dict[str, None], dict[str, None], dict[tuple[str, str], None], dict[str, None], set[str]
]


def _encode_edges(e: Edges) -> list[Any]:
    external = [list(x) for x in e.external]
    return [list(e.files), list(e.packages), external, list(e.incomplete), list(e.env)]


def _decode_edges(v: Any) -> Edges | None:
    """Stored resolved imports, or None when the value is not exactly the shape
    `_encode_edges` writes."""
    try:
        files, packages, external, incomplete, env = v
        for x in (*files, *packages, *incomplete, *env):
            if type(x) is not str:
                return None
        pairs = []
        for module, path in external:
            if type(module) is not str or type(path) is not str:
                return None
            pairs.append((module, path))
        return Edges(tuple(files), tuple(packages), tuple(pairs), tuple(incomplete), tuple(env))
    except (TypeError, ValueError):
        return None


def graph(snap: Snapshot, cache: CodeCache | None = None) -> Graph:
    """The import graph of `snap`, created on first use and kept with the snapshot."""
    g = snap.memo.get("imports")
    if not isinstance(g, Graph):
        g = snap.memo["imports"] = Graph(snap, cache if cache is not None else snap.code_cache)
    return g
