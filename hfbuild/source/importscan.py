"""Scanning one Python file for its imports: a static AST walk, memoized by blob id.

Owns: `scan` (the imports of a file, the lines of `import_module`/`__import__` calls with a
non-literal name, the environment variables it reads by literal name, or why it cannot be
parsed), memoized by blob id in this process and in the store's code cache (`caches.py`),
encoded for that cache and decoded only when exactly the shape it writes.

Must never: import or execute the file it scans, trust a cached scan that is not a well-formed
scan, resolve an import (`importfind.py` does).
"""

from __future__ import annotations

import ast
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from hfbuild.source.caches import CodeCache


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
            result = scan_tree(tree)
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


def scan_tree(tree: ast.AST) -> Scan:
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
    return Scan(tuple(imports), tuple(sorted(dynamic)), None, env_reads(tree) if reads_env else ())


def env_reads(tree: ast.AST) -> tuple[str, ...]:
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
