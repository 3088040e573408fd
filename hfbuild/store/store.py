"""The content-addressed store of built results: one object that answers for a store directory.

Owns: `Store`, the store as the rest of hfbuild uses it, made of the parts that do the work:
its layout (`paths.py`: every path under the store), its entries' manifests and identity
records (`entry.py`), the checks that decide whether an entry is served
(`check.py`), loading an entry as a Dataset (`load.py`), locks and atomic publishing
(`publish.py`; equal results share their files, `equal.py`), gc and the lock files
registered with the store (`collect.py`), and the
records beside the entries: refs, run-time reads, failed builds (`records.py`).
`objects/<fp[:2]>/<fp>/` holds `data/` (a `save_to_disk` layout) and `manifest.json`; an
entry's `data/` may instead hold only indices into another entry, its *base* (`indexed.py`),
or the entry be a list of shards; an entry exists only once its complete manifest does. Modes
follow sharing.py (group-shared inside a setgid store).

Must never: do the work of a part itself (each method hands it to the part that owns it),
unpickle or execute anything it reads, import `datasets` at module level.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

from hfbuild.store import collect as storegc
from hfbuild.store.check import Checks
from hfbuild.store.entry import Manifests, row_owner, row_pack
from hfbuild.store.load import Loader
from hfbuild.store.paths import Layout, tree_size
from hfbuild.store.publish import Publisher
from hfbuild.store.records import Records


class Store:
    """A store directory. Cheap to create: nothing is touched until something is written."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.layout = Layout(root)
        self.root = self.layout.root
        self.manifests = Manifests(self.layout)
        self.checks = Checks(self.layout, self.manifests, self.load)
        self.loader = Loader(self.layout, self.manifests, self.has)
        self.publisher = Publisher(self.layout, self.manifests, self.checks)
        self.records = Records(self.layout)

    # -- layout (storepaths) -------------------------------------------------------------------

    def entry(self, fp: str) -> str:
        return self.layout.entry(fp)

    def data_path(self, fp: str) -> str:
        return self.layout.data_path(fp)

    def code_cache_path(self, *, create: bool = False) -> str:
        """The code cache file (`caches.py`); with `create`, its directory is made first."""
        return self.layout.code_cache_path(create=create)

    def record_path(self, name: str) -> str:
        """The no-import record of one dodo file (`record.py`); `name` is a digest."""
        return self.layout.record_path(name)

    def key_dirs(self) -> list[str]:
        """The directories whose entries a stage's current key is chosen among (`fullkey`)."""
        return self.layout.key_dirs()

    def fingerprints(self) -> list[str]:
        return self.layout.fingerprints()

    # -- reading and checking (storemanifest, storecheck) --------------------------------------

    def read_manifest(self, fp: str) -> dict[str, Any] | None:
        """The entry's manifest, or None when there is no intact manifest under `fp`."""
        return self.manifests.read(fp)

    def manifest_stamp(self, fp: str) -> list[int] | None:
        """The entry's manifest file as [mtime in ns, size] (None when absent)."""
        return self.manifests.stamp(fp)

    def references(self, fp: str, doc: dict[str, Any] | None = None) -> list[str]:
        """The entries `fp`'s entry needs: the shards it lists, the base it selects rows of."""
        return self.manifests.references(fp, doc)

    def check(self, fp: str) -> str | None:
        """Why the entry for `fp` cannot be used (None when it is intact or absent)."""
        return self.checks.check(fp)

    def intact_manifest(self, fp: str) -> dict[str, Any] | None:
        """The manifest of the complete, intact entry for `fp`, else None."""
        return self.checks.intact_manifest(fp)

    def absent(self, fps: Iterable[str]) -> set[str]:
        """Of `fps`, those without an entry now: one listing per directory of entries they
        fall in, not a failed manifest read each (a cold build's 5,000 shards). One
        published after the listing is not seen: built again, the first publication wins
        (`publish_first`)."""
        return self.layout.absent(fps)

    def has(self, fp: str) -> bool:
        """True when a complete, intact entry for `fp` exists (see `check`)."""
        return self.checks.intact_manifest(fp) is not None

    def check_base(self, doc: dict[str, Any]) -> str | None:
        """Why an indices entry's base cannot serve it (None: it can, or `doc` has none)."""
        return self.checks.check_base(doc)

    def files_intact(self, fp: str, files: dict[str, int]) -> bool:
        """Whether the entry `fp` has these data files, intact (`Checks.files_intact`)."""
        return self.checks.files_intact(fp, files)

    def check_list(self, fp: str, doc: dict[str, Any]) -> str | None:
        """`check` of the list of shards `doc` (the manifest of `fp`, already read)."""
        return self.checks.check_list(fp, doc)

    # -- loading (storeload) -------------------------------------------------------------------

    def load(self, fp: str) -> Any:
        """The stored Dataset or DatasetDict, memory-mapped (nothing is unpickled)."""
        return self.loader.load(fp)

    def load_indices(self, fp: str, doc: dict[str, Any], data: str) -> Any:
        """An indices entry whose files are at `data`, over its base loaded from this store."""
        return self.loader.load_indices(fp, doc, data)

    def load_listed(self, fp: str, split: str, rows: list[list[Any]]) -> Any:
        """Some consecutive shard rows of one split of the list `fp`, as one Dataset."""
        return self.loader.load_listed(fp, split, rows)

    def listed_features(self, fp: str, split: str, rows: list[list[Any]]) -> Any:
        """The features of `load_listed(fp, split, rows)`, its rows unread."""
        return self.loader.listed_features(fp, split, rows)

    def listed_row(self, via: str, key: str) -> list[Any] | None:
        """The row of the list `via` naming shard `key` (`Loader.listed_row`)."""
        return self.loader.listed_row(via, key)

    def has_shard(self, key: str, via: str | None) -> bool:
        """Whether shard `key` is here intact: its row range of an intact pack, as the list
        `via` names it (a stat per pack file), else its own entry (`has`)."""
        row = self.loader.listed_row(via, key) if via is not None else None
        if row is not None and row_pack(row) is not None and isinstance(row[3], dict):
            return self.checks.files_intact(row_owner(row), row[3])
        return self.has(key)

    def load_shard(self, key: str, via: str | None) -> Any:
        """The shard `key`: its own entry, or its row of the list `via` (a packed shard)."""
        return self.loader.load_shard(key, via)

    # -- writing (storepublish) ----------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, fp: str, timeout: float = -1) -> Iterator[None]:
        """Exclusive lock for building `fp`. An OS-level lock: a killed holder releases it."""
        with self.publisher.lock(fp, timeout):
            yield

    def new_build_dir(self, fp: str) -> str:
        """A fresh build directory for `fp` (call with the lock held)."""
        return self.publisher.new_build_dir(fp)

    def publish(
        self, build_dir: str, fp: str, manifest: dict[str, Any], *, durable: bool = True
    ) -> dict[str, Any]:
        """Seal `build_dir` and move it into place with one rename (call with the lock
        held); the manifest now in the store (`Publisher.publish`)."""
        return self.publisher.publish(build_dir, fp, manifest, durable=durable)

    def publish_first(self, build_dir: str, fp: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """`publish` of a shard without the entry's lock (`Publisher.publish_first`)."""
        return self.publisher.publish_first(build_dir, fp, manifest)

    def discard(self, path: str) -> None:
        """Remove `path`, a build leftover in this store's tmp/, by the time the process exits."""
        self.publisher.discard(path)

    def prepare_discard(self) -> None:
        """Make this process's trash now, before forking workers that `discard` into it."""
        self.publisher.prepare_discard()

    def quarantine(self, fp: str) -> str | None:
        """Move a broken entry out of the way (to tmp/, where gc removes it)."""
        return self.publisher.quarantine(fp)

    def remove(self, fp: str) -> bool:
        return self.publisher.remove(fp)

    # -- gc and the lock files that use this store (storegc) -----------------------------------

    def roots(self) -> list[str]:
        """Absolute paths of the lock files registered as using this store."""
        return storegc.roots(self.layout)

    def register_root(self, lock_path: str) -> None:
        """Remember that the lock file at `lock_path` records results of this store."""
        storegc.register_root(self.layout, lock_path)

    def touch(self, fp: str) -> None:
        """Record that the entry was used now (its directory's mtime), for `gc --keep-days`."""
        with contextlib.suppress(OSError):
            os.utime(self.entry(fp))

    def size(self, fp: str) -> int:
        return tree_size(self.entry(fp))

    def gc(self, keep: set[str], keep_seconds: float, *, dry_run: bool) -> list[tuple[str, int]]:
        """Delete entries not in `keep` and unused for `keep_seconds`, and leftover build
        directories (never one whose build lock is held). Returns (path, bytes) of each."""
        return storegc.collect(
            self.layout,
            self.manifests,
            self.remove,
            self.publisher.equal.forget,
            keep,
            keep_seconds,
            dry_run=dry_run,
        )

    # -- refs, run-time reads, failed builds (storerecords) ------------------------------------

    def read_observed(self, static_fp: str) -> list[list[str]]:
        """The path sets builds of `static_fp` read at run time, newest first; [] if none."""
        return self.records.read_observed(static_fp)

    def add_observed(self, static_fp: str, paths: list[str]) -> None:
        """Record that a build of `static_fp` read `paths` (with its build lock held)."""
        self.records.add_observed(static_fp, paths)

    def record_failure(self, fp: str, stage: str, error: str) -> None:
        """Record that building `stage` under key `fp` failed with `error`."""
        self.records.record_failure(fp, stage, error)

    def read_failure(self, fp: str) -> str | None:
        """The error a build of `fp` last failed with, if one did and none succeeded since."""
        return self.records.read_failure(fp)

    def clear_failure(self, fp: str) -> None:
        """Forget a failed build of `fp` (it was built or pulled since)."""
        self.records.clear_failure(fp)

    def set_ref(self, stage: str, fp: str) -> None:
        self.records.set_ref(stage, fp)

    def get_ref(self, stage: str) -> str | None:
        return self.records.get_ref(stage)
