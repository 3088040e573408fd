"""Where a pipeline's stages are keyed and built: the few values its builders need.

Owns: the `Place` value: the project root, the store, the stat cache of data-file ids, the
lock file's path and name, the remote cache (a callable: asked when a build needs it, as it
reads the committed lock's pins then), the stages by name (the pipeline's own table, read
only: a stage defined later is in it) and, in a Ray worker's tree, the folders it holds with
their names (`listed`). A `Pipeline` makes one; the ledger, the key
resolution, the executors and the builders receive it instead of the pipeline.

Must never: hold the stages or their manifests, or compute anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hfbuild.core.spec import StageSpec
    from hfbuild.source.datafiles import StatCache
    from hfbuild.store.remote import Remote
    from hfbuild.store.store import Store


@dataclass(frozen=True)
class Place:
    """A pipeline's root, store, stat cache, lock, remote cache (`remote()`: None when
    there is none, or it is turned off) and stages (name -> spec, in order)."""

    root: str
    store: Store
    stat_cache: StatCache
    lock_path: str
    lock_name: str
    remote: Callable[[], Remote | None]
    stages: Mapping[str, StageSpec]
    # A Ray worker's tree (`raytree`): the listings (`dir/.`, `.`) of the folders shipped with
    # the names the key holds; a listing of any other folder there is not the project's
    # (`fullkey.Seen` refuses it). None in a work tree, where every listing is the project's.
    listed: frozenset[str] | None = None
