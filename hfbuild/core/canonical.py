"""The canonical encoding of transform arguments.

Owns: turning a Python value into a JSON-able tree that is *typed* (`1`, `True`, `1.0` and `"1"`
encode differently), *injective* (containers carry a tag a user value can never produce), and
*deterministic* (dicts and sets are sorted by the encoding of their members, never by hash
order). The tree goes into a stage's manifest as it is, so `hfbuild explain` can show an
argument's old and new value. The encoder (`_Encoder`) walks a value; what identifies an object
of an optional library that is no walk of its parts (a tokenizer's saved files, a transformers
tokenizer's state) is a function of that object alone, below it.

Must never: pickle, dill, repr an unknown object, fall back to `id()` or anything random, or
import numpy/datasets/tokenizers itself (a type is only recognised once its module is loaded).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import pathlib
import sys
import types
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any, Protocol

import xxhash

from hfbuild.core.errors import UnhashableArgumentError

Encoded = Any  # a JSON-able tree: None, bool, int, str, list, or a one-key tagged dict
Encoder = Callable[[Any], Any]

_registry: dict[type, Encoder] = {}

# Arrays and byte strings above this size are represented by their digest, not their bytes,
# so manifests stay small enough to diff.
_INLINE_BYTES = 64


def register_canonical(tp: type, fn: Encoder) -> None:
    """Teach hfbuild to fingerprint instances of `tp` (and its subclasses): `fn(obj)` must return
    a value hfbuild can already encode (str, int, dict, tuple, ...) that identifies the object's
    state completely."""
    if not isinstance(tp, type):
        raise TypeError(f"register_canonical takes a type, not {tp!r}")
    _registry[tp] = fn


class CallableEncoder(Protocol):
    def __call__(self, fn: Callable[..., Any], path: str) -> Encoded: ...


def dumps(tree: Encoded) -> str:
    """The canonical JSON text of an encoded tree: sorted keys, no whitespace, ASCII only."""
    return json.dumps(tree, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def digest(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def _qualname(tp: type) -> str:
    return f"{tp.__module__}:{tp.__qualname__}"


class _Encoder:
    def __init__(
        self, on_callable: CallableEncoder | None, root: str | None, active: set[int] | None
    ) -> None:
        self.on_callable = on_callable
        self.root = root
        # Ids of containers and callables being encoded, to refuse or name cycles; shared by
        # the encodings one callable's description makes of what it carries, so a function
        # reachable from its own closure cell is named there instead of followed forever.
        self.active: set[int] = set() if active is None else active
        # `root` with one trailing separator (as `os.path.join(root, "")`, without its cost:
        # an encoder is made per encoding, thousands per no-op).
        self._in_root = (root if root.endswith(os.sep) else root + os.sep) if root else None

    def sorted_members(self, items: list[Encoded]) -> list[Encoded]:
        return sorted(items, key=dumps)

    def encode(self, x: Any, path: str) -> Encoded:
        tp = type(x)
        # Exact builtin types first: the common case, and subclasses must not slip through as
        # their base (an IntEnum is not an int, a NamedTuple is not a tuple).
        if tp is str:
            if self._in_root is not None and x.startswith(self._in_root):
                # An absolute path inside the project, relative to it: two clones agree
                # (argpaths.py keys the content of what it names).
                return {"str-in-root": x[len(self._in_root) :]}
            return x
        if x is None or tp is bool:
            return x
        if tp is int:
            return x
        if tp is float:
            return {"float": _float(x)}
        if tp is bytes or tp is bytearray:
            return {tp.__name__: _bytes(bytes(x))}
        if tp in _registry or any(t in _registry for t in tp.__mro__[1:]):
            fn = _registry.get(tp) or next(_registry[t] for t in tp.__mro__ if t in _registry)
            return {"registered": [_qualname(tp), self.encode(fn(x), f"{path}<registered>")]}
        hook = getattr(tp, "__hfbuild_fingerprint__", None)
        if hook is not None and not isinstance(x, type):
            return {"custom": [_qualname(tp), self.encode(x.__hfbuild_fingerprint__(), path)]}
        if isinstance(x, enum.Enum):
            return {"enum": [_qualname(tp), x.name]}
        if tp is complex:
            return {"complex": [_float(x.real), _float(x.imag)]}
        if isinstance(x, pathlib.PurePath):
            return {"path": self._path(x)}
        special = self._known_library_type(x, path)
        if special is not None:
            return special
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            # Every field, `compare=False` ones too: excluded from `==` is not excluded from
            # what the transform can read.
            fields = [
                [f.name, self.encode(getattr(x, f.name), f"{path}.{f.name}")]
                for f in dataclasses.fields(x)
            ]
            return {"dataclass": [_qualname(tp), fields]}
        if isinstance(x, tuple) and hasattr(tp, "_fields"):
            fields = [
                [name, self.encode(v, f"{path}.{name}")]
                for name, v in zip(tp._fields, x, strict=True)
            ]
            return {"namedtuple": [_qualname(tp), fields]}
        if isinstance(x, (list, tuple, dict, set, frozenset)):
            return self._container(x, path)
        if isinstance(x, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)) or (
            callable(x) and _is_partial(x)
        ):
            return self._callable(x, path)
        if isinstance(x, type):
            return {"type": _qualname(x)}
        if isinstance(x, (str, int, float, bytes)):
            return self._builtin_subclass(x, path)
        if not hasattr(x, "__dict__"):
            # A C-implemented object (operator.itemgetter, a compiled pattern, a date) or a
            # slotted one: what pickling it would save is its whole state.
            return self.reduced(x, path)
        raise UnhashableArgumentError(path, x)

    def reduced(self, x: Any, path: str) -> Encoded:
        """`x` by its pickle reduction, found as pickle finds it (copyreg's dispatch table,
        then `__reduce_ex__(4)`): its reconstructor, arguments and state. Refused when it has
        none (it cannot be pickled), or when that reduction shows no state at all: an object
        is never encoded as empty."""
        import copyreg

        key = id(x)
        if key in self.active:
            raise UnhashableArgumentError(path, x, "it contains itself")
        reducer = copyreg.dispatch_table.get(type(x))
        try:
            rv = reducer(x) if reducer is not None else x.__reduce_ex__(4)
        except Exception as e:  # whatever a reducer raises, the object is opaque
            raise UnhashableArgumentError(path, x, f"it has no state hfbuild can see: {e}") from e
        if isinstance(rv, str):  # a module-level singleton, by name
            return {"global": f"{type(x).__module__}:{rv}"}
        ctor, args, state, items, pairs = (*rv, None, None, None)[:5]
        args = tuple(args or ())
        if ctor is copyreg.__newobj__ or ctor is copyreg.__newobj_ex__:  # type: ignore[attr-defined]
            cls, args = args[0], args[1:]
            if not args and state is None and items is None and pairs is None:
                raise UnhashableArgumentError(
                    path, x, "it has no state hfbuild can see: its pickle reduction is empty"
                )
            ctor = cls
        self.active.add(key)
        try:
            return {
                "reduce": [
                    _qualname(type(x)),
                    self._reconstructor(ctor, f"{path}<reconstructor>"),
                    self.encode(args, f"{path}<args>"),
                    self.encode(state, f"{path}<state>"),
                    None if items is None else self.encode(list(items), f"{path}<items>"),
                    None if pairs is None else self.encode(dict(pairs), f"{path}<dict items>"),
                ]
            }
        finally:
            self.active.discard(key)

    def _reconstructor(self, ctor: Any, path: str) -> Encoded:
        """What a reduction calls to rebuild the object: a class, a `functools.partial` of
        one, or a function by its code (by module and name when there is no code snapshot)."""
        if isinstance(ctor, type):
            return {"type": _qualname(ctor)}
        if _is_partial(ctor):
            return {
                "partial": [
                    self._reconstructor(ctor.func, path),
                    self.encode(ctor.args, f"{path}.args"),
                    self.encode(ctor.keywords, f"{path}.keywords"),
                ]
            }
        if self.on_callable is not None:
            return self._callable(ctor, path)
        module, name = getattr(ctor, "__module__", None), getattr(ctor, "__qualname__", None)
        if not module or not name:
            raise UnhashableArgumentError(path, ctor, "it cannot be named")
        return {"global": f"{module}:{name}"}

    def _container(self, x: Any, path: str) -> Encoded:
        key = id(x)
        if key in self.active:
            raise UnhashableArgumentError(path, x, "it contains itself")
        self.active.add(key)
        try:
            tp = type(x)
            if isinstance(x, list):
                items = [self.encode(v, f"{path}[{i}]") for i, v in enumerate(x)]
                return items if tp is list else {"subclass": [_qualname(tp), items]}
            if isinstance(x, tuple):
                enc = {"tuple": [self.encode(v, f"{path}[{i}]") for i, v in enumerate(x)]}
                return enc if tp is tuple else {"subclass": [_qualname(tp), enc]}
            if isinstance(x, (set, frozenset)):
                members = self.sorted_members([self.encode(v, f"{path}{{{v!r:.40}}}") for v in x])
                return {"set" if isinstance(x, set) else "frozenset": members}
            pairs = [
                [self.encode(k, f"{path}<key {k!r:.40}>"), self.encode(v, f"{path}[{k!r:.40}]")]
                for k, v in x.items()
            ]
            if tp is OrderedDict:
                return {"OrderedDict": pairs}  # its order is part of its value
            enc = {"dict": sorted(pairs, key=lambda kv: dumps(kv[0]))}
            if tp is dict:
                return enc
            if tp is defaultdict:
                factory = self.encode(x.default_factory, f"{path}.default_factory")
                return {"defaultdict": [factory, enc]}
            if getattr(x, "__dict__", None):
                raise UnhashableArgumentError(path, x, "a dict subclass with extra state")
            return {"subclass": [_qualname(tp), enc]}
        finally:
            self.active.discard(key)

    def _builtin_subclass(self, x: Any, path: str) -> Encoded:
        if getattr(x, "__dict__", None):
            raise UnhashableArgumentError(path, x, "a subclass of a builtin with extra state")
        base = next(b for b in (bool, int, float, str, bytes) if isinstance(x, b))
        return {"subclass": [_qualname(type(x)), self.encode(base(x), path)]}

    def _callable(self, fn: Any, path: str) -> Encoded:
        if self.on_callable is None:
            raise UnhashableArgumentError(path, fn, "callables need a code snapshot")
        key = id(fn)
        if key in self.active:
            # A callable reachable from its own arguments (a recursive closure): name it.
            return {"recursive": getattr(fn, "__qualname__", type(fn).__qualname__)}
        self.active.add(key)
        try:
            return {"callable": self.on_callable(fn, path)}
        finally:
            self.active.discard(key)

    def _path(self, p: pathlib.PurePath) -> Encoded:
        # A path inside the project is encoded relative to it, so two clones agree.
        if self.root is not None and p.is_absolute():
            rel = os.path.relpath(os.fspath(p), self.root)
            if not rel.startswith(os.pardir):
                return ["<root>", pathlib.PurePath(rel).as_posix()]
        return [type(p).__name__, p.as_posix()]

    def _known_library_type(self, x: Any, path: str) -> Encoded | None:
        """Types from optional libraries, recognised only when their module is loaded."""
        np = sys.modules.get("numpy")
        if np is not None:
            if isinstance(x, np.ndarray):
                if x.dtype.hasobject:
                    return {"ndarray-object": [list(x.shape), self.encode(x.tolist(), path)]}
                buf = np.ascontiguousarray(x)
                return {"ndarray": [buf.dtype.str, list(buf.shape), _bytes(buf.data)]}
            if isinstance(x, np.generic):
                return {"numpy": [x.dtype.str, _bytes(np.asarray(x).tobytes())]}
            if isinstance(x, np.dtype):
                return {"dtype": x.str if x.fields is None else self.encode(x.descr, path)}
        ds = sys.modules.get("datasets")
        if ds is not None and isinstance(x, ds.Features):
            # Column order is part of a schema, so it is kept.
            return {
                "Features": [[k, self.encode(v, f"{path}[{k!r}]")] for k, v in x.to_dict().items()]
            }
        tk = sys.modules.get("tokenizers")
        if tk is not None and isinstance(x, tk.Tokenizer):
            return {"tokenizer": _tokenizer_digest(x)}
        tf = sys.modules.get("transformers")
        if tf is not None and isinstance(x, tf.PreTrainedTokenizerBase):
            state = _hf_tokenizer_state(x)
            return {"transformers-tokenizer": self.encode(state, f"{path}<tokenizer>")}
        return None


# -- tokenizers: what identifies one, from the tokenizer alone ---------------------------------

# Written by save_pretrained for a tokenizer with a `tokenizers` backend; encoded from the
# backend itself, without the padding and truncation state calls leave in it.
_BACKEND_FILE = "tokenizer.json"
# What a backend tokenizer's last call left in its padding and truncation state, which
# transformers copies into the configuration when it loads a saved tokenizer (every call
# resets it; the side attributes are encoded from the tokenizer itself).
_CALL_STATE = (
    "max_length",
    "stride",
    "truncation_strategy",
    "truncation_side",
    "pad_to_multiple_of",
    "pad_token_type_id",
    "padding_side",
)
# Where and how a tokenizer was loaded (from_pretrained's own options, which transformers
# keeps in the saved configuration), not what it does.
_PROVENANCE = (
    "name_or_path",
    "_name_or_path",
    "tokenizer_file",
    "is_local",
    "local_files_only",
    "cache_dir",
    "force_download",
    "proxies",
    "revision",
    "subfolder",
    "token",
    "use_auth_token",
    "_commit_hash",
    "trust_remote_code",
)


def _hf_tokenizer_state(tok: Any) -> dict[str, Any]:
    """A transformers tokenizer by what shapes its output: the attributes its `__call__`
    reads, its chat template, the backend tokenizer's JSON without the padding/truncation
    state each call sets, and every other file `save_pretrained` writes (the vocabulary
    and merges of a Python tokenizer, added tokens, tokenizer_config.json, the chat
    template as transformers 5 saves it). Calling it, or saving and reloading it,
    changes none of them; provenance (`name_or_path`) never enters."""
    state: dict[str, Any] = {"class": _qualname(type(tok))}
    for attr in (
        "model_max_length",
        "padding_side",
        "truncation_side",
        "clean_up_tokenization_spaces",
        "split_special_tokens",
    ):
        if hasattr(tok, attr):
            state[attr] = getattr(tok, attr)
    state["special_tokens"] = dict(getattr(tok, "special_tokens_map", {}) or {})
    state["model_input_names"] = list(getattr(tok, "model_input_names", []) or [])
    template = getattr(tok, "chat_template", None)
    if template is not None:
        state["chat_template"] = digest(dumps(template).encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        saved = json.loads(backend.to_str())
        saved.pop("padding", None)
        saved.pop("truncation", None)
        state["backend"] = digest(dumps(saved).encode())
    state["files"] = _saved_files(tok, skip=_BACKEND_FILE if backend else None)
    return state


def _saved_files(tok: Any, skip: str | None) -> list[list[str]]:
    """[name, digest] of every file `save_pretrained` writes (`skip`: one covered
    otherwise). JSON files count by their parsed content without provenance keys."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        out = []
        for dirpath, _, names in os.walk(d):
            for name in names:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, d).replace(os.sep, "/")
                if rel == skip:
                    continue
                with open(full, "rb") as fh:
                    data = fh.read()
                if name.endswith(".json"):
                    doc = json.loads(data)
                    if isinstance(doc, dict):
                        for key in _PROVENANCE:
                            doc.pop(key, None)
                        if skip is not None and name == "tokenizer_config.json":
                            for key in _CALL_STATE:
                                doc.pop(key, None)
                    data = dumps(doc).encode()
                out.append([rel, digest(data)])
        return sorted(out)


def _tokenizer_digest(tok: Any) -> str:
    # `to_str()` is the tokenizer's full saved JSON (vocab in id order, merges, normalizers,
    # truncation and padding), serialized by serde from the Rust structs: fields in
    # declaration order, maps sorted, whatever order the loaded file had. So its text is
    # already canonical and is hashed as it is; parsing it and dumping it sorted cost 5x
    # more and told no two tokenizers apart that it does not.
    return digest(tok.to_str().encode())


def _is_partial(x: Any) -> bool:
    import functools

    return isinstance(x, functools.partial)


def _float(x: float) -> str:
    # repr is exact (round-trips) and readable; NaN and the infinities get fixed spellings.
    if math.isnan(x):
        return "nan"
    return repr(x)


def _bytes(b: bytes | memoryview) -> str:
    n = b.nbytes if isinstance(b, memoryview) else len(b)
    if n <= _INLINE_BYTES:
        return bytes(b).hex()
    return f"xxh3_128:{digest(b)}:{n}"


def encode(
    value: Any,
    path: str = "args",
    *,
    on_callable: CallableEncoder | None = None,
    root: str | None = None,
    active: set[int] | None = None,
) -> Encoded:
    """The canonical tree of `value`. `path` names it in errors (`fn_kwargs['cfg'].model`);
    `on_callable` encodes callables met inside it (by their code fingerprint); `root` makes
    absolute paths under it relative; `active` holds the ids of what encodings further up
    (an `on_callable` that encodes again) are encoding."""
    return _Encoder(on_callable, root, active).encode(value, path)


def encode_reduced(
    value: Any,
    path: str = "args",
    *,
    on_callable: CallableEncoder | None = None,
    root: str | None = None,
    active: set[int] | None = None,
) -> Encoded:
    """`value` by its pickle reduction (see `_Encoder.reduced`), even when it has a
    `__dict__`: for objects whose state lies partly outside it (a subclass of a C type) or
    that say themselves what their state is (`__reduce__`, `__getstate__`)."""
    return _Encoder(on_callable, root, active).reduced(value, path)
