"""A Ray task's shards as packs: what the worker pushes, and how either side takes a pack.

A tiny shard pushed as an entry of its own costs four requests to the remote (its three
files and its manifest). A task's load and map shards are instead pushed as packs
(`packbuild`: one entry whose rows are the shards' ranges, listed by the stage's entry as a
local build lists a load's pack): one entry, four requests, for up to `PACK_SHARDS` shards.

Owns, on the worker: pushing the shards a task built since its last push (`publish_chunk`:
those its loads built together are already one pack, `rayloads`; runs of the others written
as packs, `packbuild.of_entries`; any other shard pushed by itself; each pack once a task,
`Pushed`, however many chunks name it), each packed shard's
result naming its pack, with the pack's files when this push published it and it is small;
taking a map shard's input shard kept in a pack (`take_packed`: the pack taken once per task,
the shard's range checked against the committed lock's pin, its row as a list would record
it given for the build to read the rows from the pack in place). On the
driver: a map shard's input as the entry to have on the remote (`input_entry`), the share of
a pack a shard unit reads (`packed_weight`), and taking the pack a shard's result names
(`take`: the pack once, the shard as its list will record it).

Must never: push a pack before its ranges are checked, or take a packed input shard whose
range the committed lock pins with another content hash.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from hfbuild.builds import packbuild, raytree
from hfbuild.core import threads
from hfbuild.core.errors import BuildError

if TYPE_CHECKING:
    from hfbuild.builds.units import Unit
    from hfbuild.core.spec import StageSpec
    from hfbuild.keys.place import Place
    from hfbuild.store.remote import Remote
    from hfbuild.store.store import Store

# A task's shards are pushed as packs of at most this many shards, or once their files reach
# `PACK_BYTES`; a pack's shards' results are yielded once it is published.
PACK_SHARDS = 64
PACK_BYTES = 64 * 1024 * 1024

Built = tuple[dict[str, Any], dict[str, Any]]  # a shard's job and its result, built


def entry_bytes(store: Store, fp: str) -> int:
    """The bytes of the files of entry `fp` in `store`."""
    return sum(int(v) for v in ((store.read_manifest(fp) or {}).get("files") or {}).values())


def publish_chunk(
    place: Place,
    remote: Remote,
    spec: StageSpec,
    chunk: list[Built],
    alone: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]],
    send_bytes: int,
    pushed: Pushed | None = None,
) -> list[dict[str, Any]]:
    """Push the shards `chunk` holds (in order): those a load built together as their pack
    (named by their result's "packed"), runs of the others written as packs
    (`packbuild.of_entries`), each pack pushed as one entry (first writer wins; once a task,
    `pushed`: a load's pack spans the task's chunks, pushed on threads at once), any other
    by `alone` (a few at a time); their results, in order. A packed shard's result names its
    pack, with the pack's entry (`sent_entry`) when this task's push published it and it is
    small (each result of it carries it, at most `send_bytes` in all: the driver takes the
    pack from whichever arrives first)."""
    from hfbuild.store.remote import sent_entry

    store = place.store
    keys = [str(b["fingerprint"]) for _, b in chunk]
    packs = {str(b["fingerprint"]): str(b.pop("packed")) for _, b in chunk if "packed" in b}
    rest = [k for k in keys if k not in packs]
    packs.update(packbuild.of_entries(place, spec, rest) if len(rest) > 1 else {})
    loose = [(one, b) for one, b in chunk if str(b["fingerprint"]) not in packs]
    each_alone = iter(threads.each(lambda item: alone(*item), loose))
    sent: dict[str, dict[str, Any] | None] = {}
    out = []
    for one, built in chunk:
        pack = packs.get(str(built["fingerprint"]))
        if pack is None:
            got = next(each_alone)
            if isinstance(got, Exception):
                raise got
            out.append(got)
            continue
        if pack not in sent:
            label = f"{one['stage']} {one['shard']['label']} (pack)"
            push = functools.partial(remote.push_built, store, pack, label)
            won = (pushed or Pushed()).once(pack, push)
            members = len((store.read_manifest(pack) or {}).get("pack") or [pack])
            sent[pack] = sent_entry(store, pack, send_bytes // members) if won else None
        built["pack"] = {"key": pack, "entry": sent[pack]}
        out.append(built)
    return out


class Pushed:
    """The packs one task pushed, each pushed once: a chunk naming a pack another chunk's
    push (on another thread) is pushing waits for it and shares its outcome, instead of
    uploading it again to lose the race (a load's shards built together are one pack, and
    its 200 shards four chunks: four uploads, three deleted)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pushes: dict[str, concurrent.futures.Future[bool]] = {}

    def once(self, pack: str, push: Callable[[], bool]) -> bool:
        """`push()` of `pack` the first time; whether that push published it."""
        with self.lock:
            done = self.pushes.get(pack)
            mine = done is None
            if done is None:
                done = self.pushes[pack] = concurrent.futures.Future()
        if mine:
            try:
                done.set_result(push())
            except BaseException as e:
                done.set_exception(e)
                raise
        return done.result()


def take_packed(
    place: Place,
    remote: Remote,
    fp: str,
    dep: str,
    packed: Mapping[str, Any],
    taken: set[str],
    take: Callable[[str, str], None],
    facts: Callable[[str, str], dict[str, Any] | None] | None = None,
) -> list[Any] | None:
    """Have input shard `fp`, a row range of the pack `packed` names (its input's list
    keeps it there), readable in the node's store: the pack taken once per task (`take`,
    as any input: pulled, checked whole and range by range; `taken`: this task's packs),
    the shard's range checked against the committed lock's pin for `fp`; the shard's row as
    its stage's list records it (split, key, label, the pack's files, its facts with the
    pack and its span), for its build to read its rows from the pack in place, as a local
    build reads a packed input shard (`Store.load_listed`). None for a shard the node's
    store holds as an entry of its own (checked against its pin, read by its key).
    `facts`: what the pack's manifest records of a shard (`packbuild.packed`), read once a
    task."""
    from hfbuild.store.remotereach import RefusedEntryError

    store = place.store
    pack = str(packed["key"])
    if pack not in taken:
        take(pack, f"{dep} (pack)")
        taken.add(pack)
    pin = remote.pins().get(fp)
    held = store.intact_manifest(fp)
    where = f"the pack {pack} gives" if held is None else "the node's store holds"
    of_pack = facts or functools.partial(packbuild.packed, store)
    found = of_pack(pack, fp) if held is None else None
    got = (held or found or {}).get("content_hash")
    if pin is not None and got != pin.content_hash:
        raise RefusedEntryError(
            f"{where} input shard {fp} ({dep}) with content hash {got}, but the committed "
            f"lock records {pin.content_hash}; not used."
        )
    if held is not None:
        store.touch(fp)  # used: `hfbuild gc --keep-days` keeps it on this node
        return None
    shard = packed["shard"]
    if found is None:
        raise BuildError(f"input shard {shard.get('label')} ({fp}) is not in the pack {pack}.")
    return [shard["split"], fp, shard["label"], found["files"], found]


def input_entry(place: Place, unit: Unit, fp: str) -> str:
    """The entry a worker reads input `fp` of `unit` from: the pack a map shard's input
    shard is kept in (`raytree.input_pack`), else `fp`."""
    packed = raytree.input_pack(place, unit)
    return str(packed["key"]) if packed is not None else fp


def packed_weight(place: Place, unit: Unit) -> tuple[int, int]:
    """(rows, bytes) a transform shard unit whose input shard is a row range of a pack
    reads: its rows, and its share of the pack's bytes."""
    assert unit.shard is not None
    via = unit.inputs[unit.spec.inputs[0]].fingerprint
    row = place.store.listed_row(via, unit.shard.input)
    facts = row[4] if row is not None and isinstance(row[4], dict) else {}
    held = row[3] if row is not None and isinstance(row[3], dict) else {}
    rows, pack = int(facts.get("rows") or 0), str(facts.get("pack") or "")
    whole = _pack_rows(place.store, pack) if pack else 0
    return rows, sum(int(v) for v in held.values()) * rows // max(1, whole)


# The rows of each pack a driver weighed, by (store, pack): a pack's entry is never rewritten,
# and its manifest, listing every shard, is read once a process, not once per shard unit
# (200 shards of one pack: ~1.6 ms each).
_PACK_ROWS: dict[tuple[str, str], int] = {}


def _pack_rows(store: Store, pack: str) -> int:
    """The rows of the pack `pack` in `store` (0 when it is not held)."""
    at = (str(store.root), pack)
    if at not in _PACK_ROWS:
        rows = int((store.read_manifest(pack) or {}).get("rows") or 0)
        if not rows:
            return 0
        _PACK_ROWS[at] = rows
    return _PACK_ROWS[at]


class PackRows:
    """What a stage's list records of each shard of the packs `store` holds intact
    (`packbuild.packed`), each pack's manifest read once (a pack's entry is never
    rewritten); a pack not held is asked for again next time."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.rows: dict[str, dict[str, dict[str, Any]]] = {}

    def __call__(self, pack: str, key: str) -> dict[str, Any] | None:
        if pack not in self.rows:
            got = packbuild.packed_all(self.store, pack)
            if got is None:
                return None
            self.rows[pack] = got
        return self.rows[pack].get(key)


def take(
    store: Store,
    remote: Remote,
    res: Mapping[str, Any],
    fp: str,
    label: str,
    rows: PackRows | None = None,
) -> Any:
    """Shard `fp` a worker's result `res` names as a row range of a pack: the pack taken
    into `store` once (`Remote.take`: from the result when it carries it, else pulled);
    what the stage's list records of the shard (`rows`, `packbuild.packed`), None when the
    pack lacks it. None for a result naming no pack."""
    pack = res.get("pack")
    if not isinstance(pack, dict):
        return None
    where = str(pack["key"])
    if not store.has(where):
        remote.take(store, where, f"{label} (pack)", pack.get("entry"))
    return (rows or PackRows(store))(where, fp)
