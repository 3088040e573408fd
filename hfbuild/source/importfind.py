"""Finding a module as Python's path-based import would, without importing it.

Owns: `Resolver`, for one snapshot: `sys.modules` first (in work-tree mode: what is loaded is
what runs), then `importlib.machinery.FileFinder`s over `sys.path`, followed by the importing
file's own directory and the project root (where a script and `python -m`/doit put them), with
`PathFinder`'s precedence: the first regular package or module wins, namespace portions are
gathered only when none is found; then other meta-path finders. In index mode a directory
inside the project is listed from the git index. Each answer notes the facts it rested on
(`Facts`: directory listings, loaded modules, meta-path answers, `sys.path`), which `fact`
computes again. Where a file lies: site-packages, an environment kept inside the project
(`in_environment`), the standard library (`outside_kind`).

Must never: import a module to find it (that would run user code), leave the interpreter's own
finder caches changed.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import stat
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from hfbuild.source.caches import RACY_NS
from hfbuild.source.gitstate import Snapshot
from hfbuild.source.importscan import ImportRef

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


def digest(value: Any) -> str:
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


def _meta(name: str) -> Found | None:
    """What the meta-path finders after the standard ones say of a top-level module: the first
    that maps `name` to a file or to directories."""
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
            return digest(_encode_loaded(self._loaded(arg)))
        if kind == "x":
            return digest(_encode_found(_meta(arg)))
        if kind == "s":
            return self._search_pathdigest()
        return None

    def _search_pathdigest(self) -> str:
        if self._sys_path_digest is None:
            self._sys_path_digest = digest(list(self.sys_path))
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
            self.facts["m:" + name] = digest(_encode_loaded(result))
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
        self._note("s:", self._search_pathdigest())  # the rest is in the resolution's key
        found = self.find(name, (*self.sys_path, here, self.snap.root))
        if found is None:
            found = self._find_meta(name)
        return found

    def _find_meta(self, name: str) -> Found | None:
        """A top-level module that no directory holds, from the finders Python consults after
        the path finder (an editable install's finder maps names to its source tree). They
        map names to files; no module is imported."""
        found = _meta(name)
        self._note("x:" + name, digest(_encode_found(found)))
        return found


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
