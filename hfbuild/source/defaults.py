"""A function's default values, and whether they are what its module's source gives it.

Owns: a function's defaults by parameter name (positional and keyword-only alike);
whether a function is the one its module holds under its qualname (or what that wraps);
every function a module's source defines by name with its defaults as literals where they are
literals (an AST walk, memoized by blob id); looking an object up by module and qualname in
`sys.modules`.

Must never: import or execute a module (only `sys.modules` is read), evaluate a default that
is not a literal.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

from hfbuild.source import modvalues


def default_values(fn: types.FunctionType) -> dict[str, Any]:
    """`fn`'s default values by parameter name, positional and keyword-only ones alike."""
    code = fn.__code__
    positional = fn.__defaults__ or ()
    params = code.co_varnames[: code.co_argcount]
    if len(positional) <= len(params):
        names = params[len(params) - len(positional) :]
    else:  # `__defaults__` assigned longer than the signature: by position
        names = tuple(f"<default {i}>" for i in range(len(positional)))
    values = dict(zip(names, positional, strict=True))
    values.update(fn.__kwdefaults__ or {})
    return values


# (blob id) -> {(qualname, first line): (positional defaults, keyword-only defaults)}, each
# default (True, its literal value) or (False, None) for an expression that is not a literal.
_Default = tuple[bool, Any]
_source_defs: dict[str, dict[tuple[str, int], tuple[list[_Default], dict[str, _Default]]]] = {}


def source_defaults(fn: types.FunctionType, blob: str, read: Callable[[], bytes]) -> bool:
    """Whether `fn`'s defaults are what its module's source gives it: a function defined by
    name at module or class level (`defined_by_name`: the caller asks first), from the `def`
    at its first line in the file of blob id `blob` (its bytes: `read`), whose literal
    defaults have the source's values. A default written as another expression (`k=MAX_LEN`,
    `tok=load()`) is evaluated once, when the module is imported, like a module value
    computed at import: it counts as the source's."""
    code = fn.__code__
    defs = _source_defs.get(blob)
    if defs is None:
        defs = _source_defs[blob] = _scan_defaults(read())
    found = defs.get((fn.__qualname__, code.co_firstlineno))
    if found is None:
        return False
    positional, keyword = found
    given, kw = fn.__defaults__ or (), fn.__kwdefaults__ or {}
    if len(positional) != len(given) or keyword.keys() != kw.keys():
        return False
    pairs = [*zip(positional, given, strict=True), *((keyword[k], kw[k]) for k in keyword)]
    return all(not lit or modvalues.same_literal(value, src) for (lit, src), value in pairs)


def defined_by_name(fn: types.FunctionType) -> bool:
    """Whether `fn` is what its module holds under its qualname, or what that wraps (a
    decorated function: `functools.wraps` chains lead from the name to it). Not one of many
    functions a `def` in a loop or a factory made."""
    obj = lookup(fn.__module__ or "__main__", fn.__qualname__)
    for _ in range(100):  # as inspect.unwrap, a chain has an end
        if obj is fn:
            return True
        obj = getattr(obj, "__dict__", {}).get("__wrapped__")
        if obj is None:
            return False
    return False


def _scan_defaults(
    source: bytes,
) -> dict[tuple[str, int], tuple[list[_Default], dict[str, _Default]]]:
    """Every function a module's source defines by name (at module level, in classes, under
    `if`/`try`/`with` blocks), with its defaults as literals where they are literals."""
    import ast
    import contextlib

    out: dict[tuple[str, int], tuple[list[_Default], dict[str, _Default]]] = {}
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return out

    def literal(node: ast.expr) -> _Default:
        with contextlib.suppress(ValueError, TypeError, SyntaxError, RecursionError):
            return True, ast.literal_eval(node)
        return False, None

    def walk(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                a = node.args
                out[(prefix + node.name, first)] = (
                    [literal(d) for d in a.defaults],
                    {
                        arg.arg: literal(d)
                        for arg, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)
                        if d is not None
                    },
                )
            elif isinstance(node, ast.ClassDef):
                walk(node.body, f"{prefix}{node.name}.")
            else:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.stmt):
                        walk([child], prefix)
                    elif isinstance(child, ast.ExceptHandler):
                        walk(child.body, prefix)

    walk(tree.body, "")
    return out


def lookup(module: str | None, qualname: str | None) -> Any:
    """The object `module`'s qualname names in `sys.modules`, else None."""
    if not module or not qualname or "<" in qualname:
        return None
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
