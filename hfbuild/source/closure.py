"""Which files, packages and bound values define a callable.

Owns: `Context` (what one fingerprint computation gathers) and turning a callable into (a) a
`target` naming it, (b) the in-repo files of its *closure* (the file defining it plus every
in-repo module it imports, transitively: the graph of `imports.py`), (c) the `name==version`
of third-party distributions those files import (`distributions.py` tells them), and (d) the
values it carries with it (closure cells, defaults unless they are its source's, as
`defaults.py` tells, attributes set on it, what it wraps, `functools.partial` arguments, the
instance behind a bound method or callable object), which count as arguments; a function's
code by its digest (`codedigest.py`), the module values it reads (`modvalues.py`); what a
callable can keep between calls (`kept_state`).

Must never: import a module to find it (that would run user code), follow files into
site-packages or a virtualenv, or identify anything by absolute path or object id. Scans are
memoized by blob id: a blob's imports never change.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hfbuild.core import canonical
from hfbuild.core.errors import ClosureError, UnhashableArgumentError
from hfbuild.source import defaults, imports, modvalues
from hfbuild.source.codedigest import code_digest
from hfbuild.source.distributions import UNTRACKED_DISTRIBUTIONS, distributions
from hfbuild.source.gitrepo import FileId
from hfbuild.source.gitstate import Snapshot


@dataclass
class Context:
    """Everything one fingerprint computation gathers while it walks callables and arguments."""

    snapshot: Snapshot
    files: dict[str, FileId] = field(default_factory=dict)
    external: dict[str, str] = field(default_factory=dict)  # module -> blob id, outside root
    packages: set[str] = field(default_factory=set)
    env: set[str] = field(default_factory=set)  # environment variables the closure reads
    incomplete: list[str] = field(default_factory=list)  # "path:line: why"
    _seen_modules: set[str] = field(default_factory=set)
    # Module values that differ from their source (modvalues.py, issue #9 item 5): qualified
    # name -> {"source": literal, "value": in memory}; and the code already followed for them.
    module_values: dict[str, Any] = field(default_factory=dict)
    values_seen: set[int] = field(default_factory=set)
    # Ids of what is being encoded (canonical.py): a callable met again inside what it
    # carries (a recursive nested function, a wrapper reaching itself) is named, not followed.
    active: set[int] = field(default_factory=set)
    # Values keyed by their source (module constants equal to it, a function's literal
    # defaults) that may hold a string naming a project file, whose content argpaths.py keys:
    # where `explain` says it is (`module value transforms.TOKENIZER`) -> value.
    constants: dict[str, Any] = field(default_factory=dict)

    def encode(self, value: Any, path: str) -> canonical.Encoded:
        return canonical.encode(
            value, path, on_callable=self._on_callable, root=self.snapshot.root, active=self.active
        )

    def encode_reduced(self, value: Any, path: str) -> canonical.Encoded:
        return canonical.encode_reduced(
            value, path, on_callable=self._on_callable, root=self.snapshot.root, active=self.active
        )

    def _on_callable(self, fn: Callable[..., Any], path: str) -> canonical.Encoded:
        return describe(fn, self, path)

    def add_file(self, rel: str) -> FileId:
        fid = self.files.get(rel)
        if fid is None:
            fid = self.files[rel] = self.snapshot.file_id(rel)
            if rel.endswith(".py"):
                self._add_closure(imports.graph(self.snapshot).closure(rel))
        return fid

    def project_rel(self, path: str) -> str | None:
        """`path` relative to the project root when it is project code: inside the root and
        not in an environment (a virtualenv) kept there; else None."""
        return imports.graph(self.snapshot).project_rel(path)

    # -- the import graph (resolved once per snapshot, in imports.py) ------------------------

    def _add_closure(self, closure: imports.Edges) -> None:
        """Add a file's transitive closure (computed once per snapshot by the graph)."""
        for rel in closure.files:
            if rel not in self.files:
                self.files[rel] = self.snapshot.file_id(rel)
        self._add_edges(closure._replace(files=()))

    def follow_module(self, module: str, filename: str | None) -> None:
        """Add a module (by name and the file it was loaded from) to the closure."""
        if filename is None:
            self._add_package(module)
            return
        self._add_edges(imports.graph(self.snapshot).module(module, filename))

    def _add_edges(self, edges: imports.Edges) -> None:
        self.incomplete.extend(m for m in edges.incomplete if m not in self.incomplete)
        self.env.update(edges.env)
        for rel in edges.files:
            self.add_file(rel)
        for module in edges.packages:
            self._add_package(module)
        for module, path in edges.external:
            if distributions(module.split(".")[0]):
                self._add_package(module)
            elif module not in self.external:
                # A module outside the project that no distribution owns (a sys.path hack):
                # it is identified by its module name and content, never by where it lies.
                blob, sub = imports.graph(self.snapshot).external(module, path)
                self.external[module] = blob
                self._add_edges(sub)

    def _add_package(self, module: str) -> None:
        top = module.split(".")[0]
        if not top or top in self._seen_modules:
            return
        self._seen_modules.add(top)
        if top in sys.stdlib_module_names or top in sys.builtin_module_names:
            return
        for dist, version in distributions(top):
            if dist.lower() not in UNTRACKED_DISTRIBUTIONS:
                self.packages.add(f"{dist}=={version}")


# -- describing a callable --------------------------------------------------------------------


def describe(fn: Any, ctx: Context, path: str = "fn") -> dict[str, Any]:
    """The code identity of `fn`: {"target": ..., "args": ...}; its files and packages are
    added to `ctx`. `args` holds what the callable carries with it, canonically encoded."""
    key = id(fn)
    if key in ctx.active or not isinstance(fn, types.FunctionType):
        # A callable object's own state is encoded below: it must not look like a cycle.
        return _describe(fn, ctx, path)
    # A function met again inside what it carries (a cell, an attribute, what it wraps) is
    # named there by the encoder, not followed again.
    ctx.active.add(key)
    try:
        return _describe(fn, ctx, path)
    finally:
        ctx.active.discard(key)


def _describe(fn: Any, ctx: Context, path: str) -> dict[str, Any]:
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
            if defaults.lookup(fn.__module__, fn.__qualname__) is not fn:
                # A C method bound to an instance (`rng.random`, `{}.get`): its class's
                # method, with the instance's state.
                tp = type(owner)
                _named(tp, ctx, f"{path}.__self__.__class__")
                qualname = f"{tp.__qualname__}.{fn.__name__}"
                return {"target": {"module": tp.__module__, "qualname": qualname}, "args": args}
        return {"target": _named(fn, ctx, path), "args": args}
    if isinstance(fn, type):
        return {"target": _named(fn, ctx, path), "args": args}
    if callable(fn):
        if (
            defaults.lookup(getattr(fn, "__module__", None), getattr(fn, "__qualname__", None))
            is fn
        ):
            # A named callable object from a module (a numpy ufunc, say): by reference.
            return {"target": _named(fn, ctx, path), "args": args}
        call = type(fn).__call__
        if isinstance(call, types.FunctionType):
            inner = _function(call, ctx, f"{path}.__call__")
            args["self"] = _state(fn, ctx, path)
            args.update(inner["args"])
            return {"target": inner["target"], "args": args}
        state = _state(fn, ctx, path)  # an opaque object is refused here, never empty
        tp = type(fn)
        args["self"] = state
        wrapped = getattr(fn, "__dict__", {}).get("__wrapped__", _ABSENT)
        if wrapped is not _ABSENT and not _is(state, "object"):
            # A wrapper whose state is not its attributes (`functools.cache` of a nested
            # function reduces to its name only): what it wraps, with what that carries.
            args["wrapped"] = _wrapped(wrapped, ctx, path)
        if _is(state, "reduce"):
            # C callables (itemgetter, a method descriptor): the reduction names what
            # rebuilds them, so their type needs no importable name of its own.
            return {
                "target": {"module": tp.__module__, "qualname": tp.__qualname__},
                "args": args,
            }
        return {"target": _named(tp, ctx, path), "args": args}
    raise ClosureError(f"{path}: {fn!r} is not callable")


def _function(fn: types.FunctionType, ctx: Context, path: str) -> dict[str, Any]:
    code = fn.__code__
    module = fn.__module__ or "__main__"
    target: dict[str, Any] = {"module": module, "qualname": fn.__qualname__}
    args: dict[str, Any] = {}
    if "<lambda>" in fn.__qualname__ or "<locals>" in fn.__qualname__:
        # Two lambdas in one file share a qualname; their line and bytecode tell them apart.
        target["line"] = code.co_firstlineno
        target["code"] = code_digest(code)
    held: list[Any] = []  # the cells' values: a `__wrapped__` among them is keyed already
    if fn.__closure__:
        cells = {}
        for name, cell in zip(code.co_freevars, fn.__closure__, strict=True):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later)
                cells[name] = {"empty-cell": None}
                continue
            held.append(value)
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
        if (fn.__defaults__ or fn.__kwdefaults__) and not _source_defaults(fn, ctx):
            args["defaults"] = _defaults(fn, ctx, path)
        elif fn.__defaults__ or fn.__kwdefaults__:
            # Keyed by the source; a string among them may name a file whose content must
            # be keyed too (argpaths.py), as for a module constant.
            for name, value in defaults.default_values(fn).items():
                if isinstance(value, (str, list, tuple, dict, set, frozenset)):
                    ctx.constants[f"argument {name} (default of {fn.__qualname__})"] = value
        _carried(fn, held, args, ctx, path)
        # The code in memory is the code in the files, and the module values it reads.
        modvalues.follow_globals(fn, ctx)
        return {"target": target, "args": args}
    if module != "__main__" and defaults.lookup(module, fn.__qualname__) is fn:
        # Defined in an installed package or the standard library: by name and version
        # (what it carries is what that version's source gives it).
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
        target["code"] = code_digest(code)
    if fn.__defaults__:
        args["defaults"] = ctx.encode(fn.__defaults__, f"{path}.__defaults__")
    if fn.__kwdefaults__:
        args["kwdefaults"] = ctx.encode(fn.__kwdefaults__, f"{path}.__kwdefaults__")
    _carried(fn, held, args, ctx, path)
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


# -- what a function object carries beyond its code (issue #25 item 1) -----------------------

_ABSENT = object()


def _marker(name: str) -> bool:
    """Dunder attributes describe a function to Python and its tools, not state it computes
    with: what `functools.update_wrapper` assigns (`__qualname__`, `__doc__`, ...; slots on a
    function, `__dict__` entries on another object), `typing.final`'s `__final__`,
    `typing.override`'s `__override__`, `abc`'s `__isabstractmethod__`, `__signature__`; and
    `__wrapped__`, followed as the wrapped callable itself (`_wrapped`). Keying them would
    change the keys of functions that carry nothing new."""
    return name.startswith("__") and name.endswith("__")


def _carried(
    fn: types.FunctionType, held: list[Any], args: dict[str, Any], ctx: Context, path: str
) -> None:
    """Add to `args` what `fn` carries in its `__dict__`: attributes set on it (`attrs`; not
    the entries `functools.wraps` copied from the wrapped function's `__dict__`, which are that
    function's attributes, keyed with it) and the callable it wraps (`wrapped`), unless that is
    one of its closure cells (`held`), keyed there already as a decorator's wrapper holds it."""
    own = vars(fn)
    if not own:
        return
    wrapped = own.get("__wrapped__", _ABSENT)
    copied = getattr(wrapped, "__dict__", None) or {}
    attrs = {
        name: ctx.encode(value, f"{path}.{name}")
        for name, value in sorted(own.items())
        if not _marker(name) and not (name in copied and copied[name] is value)
    }
    if attrs:
        args["attrs"] = attrs
    if wrapped is not _ABSENT and not any(v is wrapped for v in held):
        args["wrapped"] = _wrapped(wrapped, ctx, path)


def _wrapped(wrapped: Any, ctx: Context, path: str) -> canonical.Encoded:
    """The callable a wrapper's `__wrapped__` names, encoded with what it carries (a chain
    that comes back to a callable being encoded is named there: `Context.active`)."""
    return ctx.encode(wrapped, f"{path}.__wrapped__")


def _defaults(fn: types.FunctionType, ctx: Context, path: str) -> dict[str, Any]:
    """`fn`'s default values by parameter name, positional and keyword-only ones alike (names
    are unique in a signature), so `explain` names the one that changed."""
    return {
        name: ctx.encode(value, f"{path}.<default {name}>")
        for name, value in sorted(defaults.default_values(fn).items())
    }


def _source_defaults(fn: types.FunctionType, ctx: Context) -> bool:
    """Whether `fn`'s defaults are what its module's source gives it, the source the key
    names (`defaults.source_defaults`). Such a function's key is what it was before
    defaults counted."""
    if not defaults.defined_by_name(fn):
        return False
    code = fn.__code__
    rel = ctx.project_rel(code.co_filename) if os.path.isfile(code.co_filename) else None
    fid = ctx.files.get(rel) if rel is not None else None
    if rel is None or fid is None:
        return False
    return defaults.source_defaults(fn, fid.id, lambda: ctx.snapshot.content(rel, fid.id))


def _named(obj: Any, ctx: Context, path: str) -> dict[str, Any]:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not module or not qualname or defaults.lookup(module, qualname) is not obj:
        raise ClosureError(
            f"{path}: cannot identify {obj!r}: it is not reachable as {module}.{qualname}. "
            f"Use a module-level function instead."
        )
    ctx.follow_module(module, getattr(sys.modules.get(module), "__file__", None))
    return {"module": module, "qualname": qualname}


def _is(encoded: Any, tag: str) -> bool:
    return isinstance(encoded, dict) and len(encoded) == 1 and tag in encoded


def _state(obj: Any, ctx: Context, path: str) -> canonical.Encoded:
    """The state of an instance a callable is bound to: its canonical encoding when it has
    one, else its class and attributes, or its pickle reduction when its attributes are not
    all of its state. An object without attributes was already tried by its reduction: it
    is refused, never encoded as empty."""
    try:
        return ctx.encode(obj, path)
    except UnhashableArgumentError as e:
        if e.path != path or not hasattr(obj, "__dict__"):
            raise
    tp = type(obj)
    _named(tp, ctx, f"{path}.__class__")
    if _state_beyond_attributes(tp):
        return ctx.encode_reduced(obj, path)
    attrs: dict[str, Any] = {}
    if hasattr(obj, "__dict__"):
        attrs.update(vars(obj))
    for cls in tp.__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                attrs[slot] = getattr(obj, slot)
    fields = [[k, ctx.encode(v, f"{path}.{k}")] for k, v in sorted(attrs.items())]
    return {"object": [f"{tp.__module__}:{tp.__qualname__}", fields]}


_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: set for classes defined in Python


def _state_beyond_attributes(tp: type) -> bool:
    """True when an instance's `__dict__` and slots may not be its whole state: a base class
    implemented in C with fields of its own (random.Random's generator state; not a C mixin
    without fields such as `typing.Generic` on 3.12), or a class that defines its own pickle
    state (`__reduce__`, `__reduce_ex__`, `__getstate__`)."""
    for base in tp.__mro__:
        if base is object:
            continue
        if not base.__flags__ & _HEAPTYPE and base.__basicsize__ > object.__basicsize__:
            return True
        if any(k in vars(base) for k in ("__reduce__", "__reduce_ex__", "__getstate__")):
            return True
    return False


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


# -- state a callable keeps between calls (issue #24) --------------------------------------------

_STATE_TYPES = (list, dict, set, bytearray, int, float, complex, str, bytes, bool, tuple, frozenset)


def kept_state(fn: Any) -> dict[str, str]:
    """What `fn` can keep between calls, by name -> digest of its canonical encoding: the
    closure cells, defaults, `partial` arguments and bound instance it carries, and the
    module globals its code (and the in-repo functions it reaches through them) reads that
    hold a built-in container or scalar (a counter, a set of rows seen, a memo dict). A
    build compares it before and after running `fn` over part of its input: a difference
    means its output for later rows depends on the rows before them. Values that cannot be
    encoded canonically are left out, and so are globals bound to other objects (a
    tokenizer loaded on first use is not state the output depends on)."""
    out: dict[str, str] = {}
    seen: set[int] = set()

    def put(name: str, value: Any) -> None:
        try:
            enc = canonical.encode(value, name, on_callable=lambda f, p: {"callable": p})
        except Exception:  # unencodable: not compared
            return
        out[name] = canonical.digest(canonical.dumps(enc).encode())

    def walk(f: Any, path: str) -> None:
        if id(f) in seen:
            return
        seen.add(id(f))
        if isinstance(f, functools.partial):
            put(f"{path}.args", (f.args, f.keywords))
            walk(f.func, f"{path}.func")
            return
        if isinstance(f, types.MethodType):
            put(f"{path}.__self__", f.__self__)
            walk(f.__func__, f"{path}.__func__")
            return
        if not isinstance(f, types.FunctionType):
            if callable(f) and hasattr(f, "__dict__"):
                put(f"{path}.__self__", vars(f))
            return
        for name, cell in zip(f.__code__.co_freevars, f.__closure__ or (), strict=True):
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if isinstance(value, types.FunctionType):
                walk(value, f"{path}.<closure {name}>")
            else:
                put(f"{path}.<closure {name}>", value)
        put(f"{path}.__defaults__", (f.__defaults__, f.__kwdefaults__))
        for name in sorted(_global_names(f.__code__)):
            value = f.__globals__.get(name)
            key = f"{f.__module__}.{name}"
            if isinstance(value, types.FunctionType):
                if os.path.isfile(value.__code__.co_filename) and not _outside(value):
                    walk(value, key)
            elif isinstance(value, _STATE_TYPES):
                put(key, value)

    walk(fn, "fn")
    return out


def _outside(fn: types.FunctionType) -> bool:
    """Defined in an installed package or the standard library."""
    path = os.path.realpath(fn.__code__.co_filename)
    return "site-packages" in path or path.startswith(os.path.realpath(sys.prefix))
