"""Whether the code a transform runs is the code its fingerprint hashed (issue #9, item 4).

Owns: `check_loaded`, which refuses (`StaleModuleError`) a fingerprint whose closure holds a
module this process loaded (`loadaudit.py`) from a file that has changed since, unless the
loaded code compiles to the same as the file now (a touch, a comment or blank-line edit);
`check_function`, which refuses a function object kept from an earlier load of its module (a
name imported before an `importlib.reload`); `check_built`, which asks again after a stage ran
(a reload, or a lazy import, after the fingerprint was taken). The file now is what the
fingerprint hashes (its blob id); committing an edit keeps the blob id, so only "loaded ==
file now" matters. A source's compiled digests (`codedigest.py`), memoized by blob id.

Cost: a stat per closure file per fingerprint; a compile once per blob id, only when a file's
stat moved since it was loaded (or it was loaded within 2 s of its last change).
Must never: import, reload or execute a user module; put an object id or path into a manifest.
"""

from __future__ import annotations

import os
import sys
import threading
import types
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from hfbuild.core.errors import GitStateError, StaleModuleError
from hfbuild.source.codedigest import code_digest
from hfbuild.source.loadaudit import Loaded, Stat, file_key, loaded, stat_now

if TYPE_CHECKING:
    from hfbuild.source.gitrepo import FileId
    from hfbuild.source.gitstate import Snapshot


class Closure(Protocol):
    """What the checks read of a fingerprint's closure (`closure.Context`)."""

    snapshot: Snapshot
    files: dict[str, FileId]


_verdicts: dict[tuple[int, str], tuple[Loaded, bool]] = {}  # (record, blob) -> same code?
_compiled: dict[str, tuple[str, dict[str, str]] | None] = {}  # blob -> (module, defs) digests
_checked: dict[tuple[str, str], Loaded] = {}  # (file key, blob) -> load check_loaded vouched for
_lock = threading.Lock()


def check_loaded(ctx: Closure) -> None:
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
            known = keys[rel] = (path, file_key(path))
        path, key = known
        rec = loaded(key)
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


def _now(snap: Snapshot, rel: str, path: str) -> Stat | None:
    """The file's stat data as the snapshot took it when identifying the file (the blob id
    the closure holds is of that state), else as it is now."""
    st = snap.stat_of(rel)
    if st is None:
        return stat_now(path)
    return Stat(st.st_mtime_ns, st.st_size, st.st_ino)


def check_built(root: str, doc: Mapping[str, Any]) -> None:
    """After a stage ran, before its result is stored under `doc`'s fingerprint: every module
    of its code files that ran is the load `check_loaded` vouched for, or a later load (a lazy
    import during the build, an `importlib.reload` after the fingerprint was taken) of the
    same content. Otherwise the result must not be stored (`StaleModuleError`)."""
    from hfbuild.source.gitstate import Snapshot

    snap: Snapshot | None = None
    for rel, blob in (doc.get("code") or {}).get("files") or []:
        if not rel.endswith(".py"):
            continue
        path = os.path.join(root, *rel.split("/"))
        rec = loaded(file_key(path))
        if rec is None or _checked.get((file_key(path), blob)) is rec:
            continue  # never loaded (so never ran), or the load that was checked
        snap = snap or Snapshot(root)
        current = snap
        if (
            current.file_id(rel).id != blob
            or rec.code is None
            or not _same_as_file(rec, path, blob, lambda r=rel, c=current: c.read(r))
        ):
            raise StaleModuleError(rel, _module_of(path), after_fingerprint=True)


def check_function(fn: types.FunctionType, ctx: Closure) -> None:
    """Refuse a function kept from an earlier load of its (since reloaded, changed) module."""
    code = fn.__code__
    path = code.co_filename
    rec = loaded(file_key(path))
    if rec is None or ctx.snapshot.mode != "worktree" or rec.holds(code):
        return
    rel = ctx.snapshot.rel(path)
    fid = ctx.files.get(rel) if rel else None
    if rel is None or fid is None:
        return
    compiled = _compile(fid.id, path, lambda: ctx.snapshot.read(rel))
    if compiled is None or compiled[1].get(_qualname(fn)) != code_digest(code):
        raise StaleModuleError(rel, fn.__module__, function=fn.__qualname__)


def _same_as_file(rec: Loaded, path: str, blob: str, read: Any) -> bool:
    compiled = _compile(blob, path, read)
    if compiled is None:
        return False
    if rec.code is not None:
        return code_digest(rec.code) == compiled[0]
    # Loaded before hfbuild was imported: only its functions and classes can be compared.
    mod = _loaded_module(path)
    if mod is None:
        return True  # no longer in sys.modules: nothing of it can run
    defs = compiled[1]
    for name, code in _module_code(mod, path):
        if defs.get(name) != code_digest(code):
            return False  # changed, or no longer defined by the file
    # A def the file has now and the loaded module lacks (a decorated one that hides its code
    # is present under its name, which is all that can be asked of it).
    names = vars(mod)
    return all(q in names for q in defs if "." not in q and not q.startswith("<"))


def _module_code(mod: types.ModuleType, path: str) -> Iterator[tuple[str, types.CodeType]]:
    """(qualname, code) of the functions and methods a module defines, as loaded."""
    key = file_key(path)

    def own(obj: Any) -> Iterator[tuple[str, types.CodeType]]:
        for _ in range(20):  # unwrap decorators that keep __wrapped__
            code = getattr(obj, "__code__", None)
            if isinstance(code, types.CodeType) and file_key(code.co_filename) == key:
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
    key = file_key(path)
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if isinstance(f, str) and file_key(f) == key:
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
        defs = {q: code_digest(c) for q, c in _named_code(code, "")}
        result = (code_digest(code), defs)
    with _lock:
        _compiled[blob] = result
    return result


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
