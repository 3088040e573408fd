"""hfbuild.lock: the committed record of what every stage was built from and what it produced.

Owns: reading, writing and merging the lock at the repository root, and recognizing git's
merge conflict markers in it (and the sides they separate). One entry per stage
(fingerprint, input stages, the full manifest, output rows and content hash, a sharded
stage's content hash per shard key, the dirty files it was built from and the files it read
at run time, if any), as sorted, indented JSON so one stage's change is one small diff; the
content hashes a lock pins by store key (`pins`: what a pull must match). Writes are atomic
and serialized by a file lock, so concurrent builds do not lose entries.

Must never: be the basis of a freshness decision (the store is), or import datasets.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from typing import Any, NamedTuple

from hfbuild.core.errors import HfbuildError

LOCK_NAME = "hfbuild.lock"
SCHEMA = 1


class LockError(HfbuildError):
    """hfbuild.lock cannot be read."""


class ConflictedLockError(LockError):
    """hfbuild.lock holds unresolved merge conflict markers."""

    def __init__(self, where: str) -> None:
        name = where.rsplit(" ", 1)[-1]
        super().__init__(
            f"{where} has unresolved merge conflict markers (both branches rebuilt stages). "
            f"Do not edit it by hand: run `hfbuild lock`, which rewrites it from the current "
            f"code, the store's results and the entries of either side that still match, "
            f"building nothing; then `git add {name}`."
        )


_MARKER = re.compile(r"^(<{7}|\|{7}|={7}|>{7})(?: |$)", re.MULTILINE)


def conflicted(text: str) -> bool:
    """Whether `text` holds git's merge conflict markers (a `<<<<<<<` and a `>>>>>>>` line)."""
    if "<<<<<<<" not in text or ">>>>>>>" not in text:
        return False  # a substring search, where the line-anchored scan costs ms in a big lock
    found = {m.group(1)[0] for m in _MARKER.finditer(text)}
    return {"<", ">"} <= found


def sides(text: str) -> list[dict[str, Any]]:
    """The stages of each side of a conflicted lock: the merged text with every conflict
    taken from ours, from the merge base (when git wrote it with `merge.conflictStyle
    diff3`), and from theirs; the sides that parse as a lock."""
    parts: dict[str, list[str]] = {"ours": [], "base": [], "theirs": []}
    state: str | None = None
    has_base = False
    for line in text.splitlines(keepends=True):
        mark = _MARKER.match(line)
        kind = mark.group(1)[0] if mark else None
        if kind == "<" and state is None:
            state = "ours"
        elif kind == "|" and state == "ours":
            state, has_base = "base", True
        elif kind == "=" and state in ("ours", "base"):
            state = "theirs"
        elif kind == ">" and state == "theirs":
            state = None
        elif state is None:
            for lines in parts.values():
                lines.append(line)
        else:
            parts[state].append(line)
    out = []
    for side in ("ours", "base", "theirs") if has_base else ("ours", "theirs"):
        try:
            out.append(loads("".join(parts[side])))
        except LockError:
            continue
    return out


def dumps(stages: Mapping[str, Any]) -> str:
    """The lock's text: sorted JSON indented by one space, as `json.dumps(doc, indent=1,
    sort_keys=True, ensure_ascii=False)` writes it. Each stage's entry is encoded by itself
    and its text kept for the process (`_encoded`): a build records its stages one at a
    time, and each record rewrites the lock, whose other entries (a sharded stage's: a
    content hash per shard) are then the same text again, not encoded again."""
    if not stages:
        return json.dumps({"hfbuild": SCHEMA, "stages": {}}, indent=1) + "\n"
    parts = [
        f"  {json.dumps(name, ensure_ascii=False)}: {_encoded(name, e)}"
        for name, e in sorted(stages.items())
    ]
    body = ",\n".join(parts)
    return f'{{\n "hfbuild": {SCHEMA},\n "stages": {{\n{body}\n }}\n}}\n'


# stage name -> (its entry's compact JSON, the entry's text at the depth `dumps` writes it).
_texts: dict[str, tuple[str, str]] = {}


def _encoded(name: str, entry: Any) -> str:
    # A tree of plain values: no cycle to check for (json's indenting encoder checks with an
    # id() per list and dict, each an audit event observe.py's hook is called for). The
    # compact text (C's encoder, 1, 1.0 and true apart) says whether the entry is the one
    # encoded last; the indented text is Python's encoder, many times slower.
    flat = json.dumps(entry, sort_keys=True, ensure_ascii=False, check_circular=False)
    hit = _texts.get(name)
    if hit is not None and hit[0] == flat:
        return hit[1]
    # A string holds no raw line break (JSON escapes it): every line break is the indenter's.
    text = _indented(entry, "\n").replace("\n", "\n  ")
    _texts[name] = (flat, text)
    return text


# Plain values by exact type: a subclass (an IntEnum, say) is left to json's own encoder.
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _indented(value: Any, pad: str) -> str:
    """`json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False)` at the depth whose
    line break and indent is `pad`. Python's indenting encoder takes a generator step per
    value (~1.9 ms for the entry of a load of 1,001 files: its files and shard hashes);
    here each dict or list of plain values is one call of json's C encoder, its item
    separator the indented line break (JSON escapes every control character in a string: a
    raw line break is always a separator), and a list of such lists has its values encoded
    by one call (~1.2 ms). Anything else is json's own encoder's."""
    t = type(value)
    if t is dict:
        if not value:
            return "{}"
        if not all(type(k) is str for k in value):
            return _reference(value, pad)
        inner = pad + " "
        if _SCALARS.issuperset(map(type, value.values())):
            text = json.dumps(
                value,
                sort_keys=True,
                ensure_ascii=False,
                check_circular=False,
                separators=("," + inner, ": "),
            )
            return f"{{{inner}{text[1:-1]}{pad}}}"
        items = [
            f"{json.dumps(k, ensure_ascii=False)}: {_indented(v, inner)}"
            for k, v in sorted(value.items())
        ]
        return f"{{{inner}{(',' + inner).join(items)}{pad}}}"
    if t is list or t is tuple:
        if not value:
            return "[]"
        inner = pad + " "
        if _SCALARS.issuperset(map(type, value)):
            text = json.dumps(
                value, ensure_ascii=False, check_circular=False, separators=("," + inner, ": ")
            )
            return f"[{inner}{text[1:-1]}{pad}]"
        if all((type(v) is list or type(v) is tuple) and v for v in value) and _SCALARS.issuperset(
            type(x) for v in value for x in v
        ):  # a list of lists of plain values (a load's data files): their values in one call
            pieces = iter(_scalars([x for v in value for x in v]))
            deeper = inner + " "
            rows = [
                f"[{deeper}{(',' + deeper).join(islice(pieces, len(v)))}{inner}]" for v in value
            ]
            return f"[{inner}{(',' + inner).join(rows)}{pad}]"
        return _reference(value, pad)
    if t in _SCALARS:
        return json.dumps(value, ensure_ascii=False)
    return _reference(value, pad)


def _scalars(values: list[Any]) -> list[str]:
    """Each plain value's JSON, from one call of the C encoder (a raw line break separates
    them: JSON has none in a value)."""
    return json.dumps(values, ensure_ascii=False, separators=("\n", ":"))[1:-1].split("\n")


def _reference(value: Any, pad: str) -> str:
    text = json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False, check_circular=False)
    return text.replace("\n", pad)


def loads(text: str, where: str = LOCK_NAME) -> dict[str, Any]:
    """The stages of a lock document."""
    if conflicted(text):
        raise ConflictedLockError(where)
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise LockError(
            f"{where} is not valid JSON: {e}. Regenerate it with `hfbuild lock` (from the "
            f"store's results) or `doit run preprocess` (building what is missing)."
        ) from e
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), dict):
        raise LockError(f"{where} is not an hfbuild lock (no 'stages' object).")
    stages: dict[str, Any] = doc["stages"]
    return stages


def _text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except ValueError:
        return ""  # corrupt bytes: handled like invalid JSON


def read(path: str) -> dict[str, Any]:
    """The stages recorded in the lock at `path`; empty when there is no lock yet or it is
    not valid (regenerable, never fatal for a build). A lock with merge conflict markers
    raises `ConflictedLockError`: reading it as empty would drop both sides' entries."""
    return _parsed(_text(path), path)


def _parsed(text: str | None, path: str) -> dict[str, Any]:
    """`read`'s answer for the lock text `text` read at `path`."""
    if not text:
        return {}
    try:
        return loads(text, os.path.basename(path))
    except ConflictedLockError:
        raise
    except LockError:
        return {}


def conflict(path: str, name: str = LOCK_NAME) -> ConflictedLockError | None:
    """The error to report when the lock at `path` has merge conflict markers, else None
    (through `read_cached`: `status` reads the lock once)."""
    try:
        read_cached(path)
    except ConflictedLockError:
        return ConflictedLockError(name)
    return None


def candidates(path: str) -> list[dict[str, Any]]:
    """Every set of entries the lock at `path` records: itself, or each side of a conflict."""
    text = _text(path)
    if not text:
        return []
    if conflicted(text):
        return sides(text)
    try:
        return [loads(text)]
    except LockError:
        return []


_seen: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}


def read_cached(path: str) -> dict[str, Any]:
    """`read(path)`, parsed once per version of the file in this process (a no-op run asks
    for it once per stage). A version is the file's inode, size and nanosecond mtime: every
    write here is an atomic rename (a new inode), and size and mtime catch an editor writing
    in place. The result is shared: never modify it."""
    try:
        st = os.stat(path)
    except OSError:
        _seen.pop(path, None)
        return {}
    sig = (st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _seen.get(path)
    if hit is not None and hit[0] == sig:
        return hit[1]
    stages = read(path)
    _seen[path] = (sig, stages)
    return stages


def entry(
    manifest: Mapping[str, Any],
    fingerprint: str,
    inputs: Mapping[str, str],
    stored: Mapping[str, Any],
    dirty: list[str],
    hub: Sequence[Mapping[str, str]] = (),
) -> dict[str, Any]:
    """A stage's lock entry; `stored` is the store entry's manifest (rows, content hash);
    `hub`: the Hub revisions a load read and the commits they resolved to (hub.Pin)."""
    e: dict[str, Any] = {
        "fingerprint": fingerprint,
        "inputs": dict(inputs),
        "manifest": manifest,
        "rows": stored.get("rows"),
        "content_hash": stored.get("content_hash"),
    }
    if isinstance(stored.get("form"), str):
        # With the content hash, what its consumers' keys hold of it (inputid.py): a clone
        # without the store (CI, `verify`) computes their keys from the lock.
        e["form"] = stored["form"]
    if dirty:
        e["dirty"] = sorted(dirty)
    if hub:
        # The commit each Hub revision was read at: a colleague, CI or a worker reads the
        # same files (their ids are in the manifest), and `status` names a moved branch.
        e["hub"] = [dict(p) for p in hub]
    hashes = shard_hashes(stored)
    if hashes:
        # Each shard's content hash by shard key, so a pulled shard is checked by itself
        # (`pins`): the combined hash above could refuse a forged list, but not say which of
        # its shards is bad, nor vouch for a shard once the stage's key moved on.
        e["shard_hashes"] = hashes
    if stored.get("observed"):
        # Files the build read at run time: with the static fingerprint, a clone without the
        # store (CI, or one pulling from a remote) computes the same key (see fullkey.py).
        e["static_fingerprint"] = stored.get("static_fingerprint")
        e["observed"] = stored["observed"]
    return e


def shard_hashes(stored: Mapping[str, Any]) -> dict[str, str]:
    """Shard key -> content hash of a sharded result: from a store entry's list of shards
    (`[split, key, label, files, {content_hash, ...}]` rows), or a lock entry's own record."""
    recorded = stored.get("shard_hashes")
    if isinstance(recorded, dict):
        return {str(k): str(v) for k, v in recorded.items()}
    rows = stored.get("shards")
    out: dict[str, str] = {}
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, list) and len(row) >= 5 and isinstance(row[4], dict):
            h = row[4].get("content_hash")
            if isinstance(h, str):
                out[str(row[1])] = h
    return out


class Pin(NamedTuple):
    """What a lock records for one store key: the content hash and where it says so."""

    content_hash: str
    stage: str  # the stage whose entry records it
    shard: bool  # a shard of that stage (else the stage's own result)


def pins(stages: Mapping[str, Any]) -> dict[str, Pin]:
    """Every key the lock's entries pin to a content hash: each stage's fingerprint, and
    each shard key of a sharded stage. What a pull from a remote must match (`remote.py`)."""
    out: dict[str, Pin] = {}
    for name, e in sorted(stages.items()):
        if not isinstance(e, dict):
            continue
        fp, h = e.get("fingerprint"), e.get("content_hash")
        if isinstance(fp, str) and isinstance(h, str):
            out[fp] = Pin(h, name, False)
        for key, sh in shard_hashes(e).items():
            out.setdefault(key, Pin(sh, name, True))
    return out


@contextlib.contextmanager
def _locked(lock_dir: str) -> Iterator[None]:
    from hfbuild.store import sharing
    from hfbuild.store.paths import permission_hint

    with permission_hint(os.path.dirname(lock_dir)):
        sharing.makedirs(lock_dir)
        lock = sharing.file_lock(os.path.join(lock_dir, "hfbuild-lockfile.lock"))
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def update(path: str, lock_dir: str, updates: Mapping[str, Any], keep: set[str]) -> bool:
    """Set the entries in `updates`, drop entries of stages not in `keep`, and rewrite the
    file only if its text changes. Returns whether it did. A lock with conflict markers is
    never overwritten this way (`ConflictedLockError`): `replace` resolves it."""
    from hfbuild.store.sharing import write_text_atomic

    with _locked(lock_dir):
        was = _text(path)
        stages = _parsed(was, path)
        new = {k: v for k, v in stages.items() if k in keep}
        new.update(updates)
        text = dumps(new)
        if was == text:
            return False
        write_text_atomic(path, text)
        return True


def replace(
    path: str, lock_dir: str, stages: Mapping[str, Any], *, only_if_conflicted: bool = False
) -> bool:
    """Write exactly `stages` as the lock (if its text changes). With `only_if_conflicted`,
    only while the file still holds conflict markers (a concurrent build may have resolved
    it). Returns whether it wrote."""
    from hfbuild.store.sharing import write_text_atomic

    with _locked(lock_dir):
        old = _text(path)
        if only_if_conflicted and not (old and conflicted(old)):
            return False
        text = dumps(stages)
        if old == text:
            return False
        write_text_atomic(path, text)
        return True
