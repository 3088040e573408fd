"""Building a unit of work in this process: the local executor.

Owns: `build_here`, one whole stage's build into the store (a sharded stage's missing shards
by `shardbuild`, a batched stage's missing units by `batchunits` when it can be, else the
transform by `builder`, observed by `fullkey.observing`, published under the key of what it
read), a full disk during it as a `StoreError` saying what was kept, and `LocalExecutor`
(whole units by `build_here`, shard units by `shardunits.build_shard_here`).

Must never: decide whether a stage is up to date, compute another stage's key, or leave a
partly built entry where the store would find it. It receives the pipeline's `Place`, never
the pipeline; a key other than the one assumed is the report's, for the stage build to take.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence

from hfbuild.builds import batchunits
from hfbuild.builds.units import Unit
from hfbuild.core.errors import StoreError
from hfbuild.core.spec import Report, StageSpec
from hfbuild.keys.fullkey import entry_doc, observing
from hfbuild.keys.manifest import Manifest, full_key
from hfbuild.keys.place import Place
from hfbuild.source import liveness
from hfbuild.store.paths import disk_full


def build_here(
    place: Place, spec: StageSpec, m: Manifest, manifests: Mapping[str, Manifest]
) -> Report:
    """Build one unit in this process and publish it in `place.store` (the caller holds the
    lock of `m`'s static fingerprint); `manifests` holds at least the inputs'. Its report's
    key is the one it was built under (what it read at run time may add to `m`'s)."""
    from hfbuild.builds import builder
    from hfbuild.store import indexed

    store = place.store
    fp = m.fingerprint
    if m.shards is not None:  # only the shards the store lacks (shardbuild.py)
        return _build_sharded(place, spec, m, manifests)
    if batchunits.eligible(spec):  # only the units the store lacks, when it can be
        report = _build_units(place, spec, m, manifests)
        if report is not None:
            return report
    t0 = time.perf_counter()
    tmp = store.new_build_dir(m.static_fingerprint)
    try:
        inputs = [store.load(manifests[i].fingerprint) for i in spec.inputs]
        with observing(place, tmp) as seen:
            result = builder.run_stage(spec, inputs, fp, tmp, place.root, m.data_files)
            liveness.check_built(place.root, m.doc)  # the code that ran is the code hashed
            fps = [manifests[i].fingerprint for i in spec.inputs]
            sources = indexed.sources(store, fps, inputs)
            info = builder.save(result, os.path.join(tmp, "data"), tmp, sources)
            observed = seen.identify(m)
        fp = full_key(m.static_fingerprint, observed)
        seconds = time.perf_counter() - t0
        doc = entry_doc(
            spec.name,
            m,
            {i: manifests[i].fingerprint for i in spec.inputs},
            rows=info.rows,
            content_hash=info.content_hash,
            seconds=seconds,
            written_bytes=info.written_bytes,
            observed=observed,
            listed=seen.listed(observed),
            form=info.form,
        )
        if info.indices is not None:  # its rows are its input's: it references their entry
            doc["indices"] = info.indices
        shutil.rmtree(builder.scratch_dir(tmp), ignore_errors=True)  # may be large: now
        stored = store.intact_manifest(fp) if fp != m.fingerprint else None
        if stored is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # pulled meanwhile under the key it read
        else:
            stored = store.publish(tmp, fp, doc)
        seen.publish(m.static_fingerprint, observed)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _full_disk(
            e, spec, store.root, "Nothing was published and earlier results are intact:"
        )
        if full is not None:
            raise full from e
        raise
    return Report(spec.name, fp, "built", info.rows, seconds, entry=stored)


def _build_units(
    place: Place, spec: StageSpec, m: Manifest, manifests: Mapping[str, Manifest]
) -> Report | None:
    kept = "Nothing was published"  # units are published together, at the end
    return _in_pieces(place, spec, kept, lambda: batchunits.build(place, spec, m, manifests))


def _build_sharded(
    place: Place, spec: StageSpec, m: Manifest, manifests: Mapping[str, Manifest]
) -> Report:
    from hfbuild.builds import shardbuild

    kept = "Shards already built stay in the store"
    report = _in_pieces(place, spec, kept, lambda: shardbuild.build(place, spec, m, manifests)[0])
    assert report is not None
    return report


def _in_pieces(
    place: Place, spec: StageSpec, kept: str, run: Callable[[], Report | None]
) -> Report | None:
    """Build a stage made of pieces (shards or units): a full disk is a `StoreError` saying
    what was `kept`."""
    try:
        return run()
    except BaseException as e:
        full = _full_disk(e, spec, place.store.root, kept + ";")
        if full is not None:
            raise full from e
        raise


def _full_disk(e: BaseException, spec: StageSpec, store: str, kept: str) -> StoreError | None:
    """The error a build stopped by a full disk raises (None for another error): what was
    `kept`, and what to do."""
    full = disk_full(e)
    if full is None:
        return None
    return StoreError(
        f"stage {spec.name!r}: the disk holding the store ({store}) is full "
        f"({full.strerror}). {kept} free some space (`hfbuild gc`), or point HFBUILD_STORE "
        f"at a larger disk, and build again."
    )


class LocalExecutor:
    """Builds units in this process, one after another (`datasets` may still use `num_proc`
    workers)."""

    def build(self, place: Place, unit: Unit) -> Report:
        if unit.shard is not None:
            from hfbuild.builds.shardunits import build_shard_here

            return build_shard_here(place, unit)
        return build_here(place, unit.spec, unit.manifest, unit.inputs)

    def build_all(self, place: Place, units: Sequence[Unit], label: str) -> list[Report]:
        return [self.build(place, u) for u in units]
