"""The digest of a code object: what a function's or module's code is, in a key.

Owns: `code_digest` (bytecode, constants and names, recursively, without line tables or file
names; frozenset constants in sorted order), and walking a code object's nested code.

Must never: include a file name, line number, object id or hash-seed-dependent order in a
digest; import an hfbuild module but `canonical`.
"""

from __future__ import annotations

import types
from collections.abc import Iterator

from hfbuild.core import canonical


def code_digest(code: types.CodeType) -> str:
    """Bytecode, constants and names, recursively, without line tables or file names."""
    parts: list[bytes] = [code.co_code]
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            parts.append(code_digest(c).encode())
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


def walk_code(code: types.CodeType) -> Iterator[types.CodeType]:
    """`code` and every code object nested in it, depth first."""
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from walk_code(c)
