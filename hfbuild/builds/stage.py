"""Building one stage into the store, on this machine.

Owns: the order of a build (the store, else the remote cache, else build the inputs and then
the stage under its per-fingerprint lock), setting a damaged entry aside, publishing the result
with its stored manifest, recording a failed build in the store (`Store.record_failure`, until
a build of that key succeeds), pushing it when HFBUILD_PUSH=1, and turning a full disk into a
`StoreError` (`local`). Where a missing entry is built is the executor's choice (`executor`:
here, by `local.build_here`, or on a Ray cluster); running the transform itself is `builder`'s
job. The one module of the build that holds the `Pipeline`: the executors and builders below
receive its `Place` and the manifests they build, and call nothing back; after each build
the pipeline keys its stages again (`Pipeline.record`, `Pipeline.rekey`: a build published
under another key than the one assumed, what it read at run time, and the stages waiting for
its result).

Must never: decide freshness from anything but the store holding the stage's fingerprint, or
leave a partly built entry where the store would find it.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from hfbuild.builds.executor import choose, executor_name, expect
from hfbuild.builds.units import Unit
from hfbuild.core.errors import BuildError, CorruptEntryWarning, MissingDataError, RemoteWarning
from hfbuild.core.spec import Report, stored_rows
from hfbuild.keys.fingerprint import check_dirty
from hfbuild.source import hub
from hfbuild.store.remotereach import RemoteError, RemoteUnreachableError, unavailable

if TYPE_CHECKING:
    from hfbuild.keys.manifest import Manifest
    from hfbuild.keys.manifests import Manifests
    from hfbuild.pipeline.pipeline import Pipeline
    from hfbuild.store.remote import Remote


def build(
    pipe: Pipeline,
    name: str,
    *,
    log: Callable[[str], None] | None = None,
    record: bool = True,
    executor: str | None = None,
) -> Report:
    """Build `name` (and any input it needs) unless the store has it. With `record`, the
    stage's ref and hfbuild.lock entry are updated afterwards. `executor` names where missing
    entries are built (see `executor.executor_name` for the default)."""
    manifests = pipe.manifests()
    try:
        m = manifests[name]
    except MissingDataError as e:
        raise _as_datasets_refuses(pipe, name, e) from e
    spec = pipe[name].spec
    store = pipe.store
    if m.pending:
        # Its key holds its inputs' results (inputid.py): build them first, then it may be up
        # to date (cut off: an input rebuilt with the same result), in the remote, or stale.
        manifests, m = _with_inputs(pipe, name, log=log, record=record, executor=executor)
    fp = m.fingerprint
    check_dirty(m, f"stage {name!r}")
    if (stored := store.intact_manifest(fp)) is not None:
        report = Report(name, fp, "up to date", stored_rows(stored), 0.0, entry=stored)
    elif pipe.leave_record() and pipe.manifests()[name].fingerprint != fp:
        # The key came from the no-import record: what follows pulls or builds, so it is
        # computed from the code now (leave_record dropped the record's answers).
        return build(pipe, name, log=log, record=record, executor=executor)
    elif (pulled := _pull(pipe, name, fp, executor, record)) is not None:
        report = pulled
    else:
        if any(not store.has(manifests[dep].fingerprint) for dep in spec.inputs):
            manifests, m = _with_inputs(pipe, name, log=log, record=record, executor=executor)
        else:
            manifests = pipe.manifests()  # an input's build may have changed its key
            m = manifests[name]
        fp = m.fingerprint
        if (stored := store.intact_manifest(fp)) is not None:  # cut off: its inputs' results
            report = Report(name, fp, "up to date", stored_rows(stored), 0.0, entry=stored)
            return _done(pipe, name, report, log=log, record=record)
        # Builds of one static fingerprint are serialized: they may publish under any key.
        with store.lock(m.static_fingerprint):
            if not store.has(fp) and store.read_observed(m.static_fingerprint):
                # Another process may have built it while we waited, under a key only its
                # build could tell: resolve it again. A key that waits for an input again
                # (an input keyed otherwise now) is never built: the one resolved before is.
                again = pipe.manifests(fresh=True)[name]
                if not again.pending:
                    m, fp = again, again.fingerprint
            if (stored := store.intact_manifest(fp)) is not None:  # built while we waited
                report = Report(name, fp, "built elsewhere", stored_rows(stored), 0.0, entry=stored)
            else:
                _set_aside_if_corrupt(pipe, name, fp)
                if m.hub:  # Hub files the cache lacks: fetched online, else a clear error
                    files = m.data_files
                    hub.ensure(
                        [f for g in files.values() for f in g]
                        if isinstance(files, dict)
                        else files or []
                    )
                unit = Unit(spec, m, {i: manifests[i] for i in spec.inputs})
                try:
                    report = choose(pipe.root, executor).build(pipe.place, unit)
                except BuildError as e:
                    store.record_failure(fp, name, str(e))  # for `status` and `explain`
                    raise
                store.clear_failure(fp)
    return _done(pipe, name, report, log=log, record=record)


def _with_inputs(
    pipe: Pipeline,
    name: str,
    *,
    log: Callable[[str], None] | None,
    record: bool,
    executor: str | None,
) -> tuple[Manifests, Manifest]:
    """Build the stage's inputs the store lacks, then its manifest keyed by their results.
    Another process may have built an input under a key known only after its build (what it
    read at run time): the manifests are computed afresh before building one here."""
    manifests = pipe.manifests(fresh=True)
    for dep in pipe[name].spec.inputs:
        if manifests[dep].pending or not pipe.store.has(manifests[dep].fingerprint):
            build(pipe, dep, log=log, record=record, executor=executor)
    manifests = pipe.manifests()  # keyed again by its inputs' results (`_done`)
    m = manifests[name]
    if m.pending:
        raise BuildError(
            f"stage {name!r}: its input {m.pending[0]!r} was built, yet its result is not in "
            f"the store {pipe.store.root} (removed meanwhile by `hfbuild gc`?); build again."
        )
    return manifests, m


def _done(
    pipe: Pipeline,
    name: str,
    report: Report,
    *,
    log: Callable[[str], None] | None,
    record: bool,
) -> Report:
    """Touch, record and push what `build` got; the stages whose keys waited for it are
    keyed again (`inputid`: the next up-to-date check sees them cut off or stale), and the
    stage itself when its build read more than its key assumed (then its key holds that)."""
    fp = report.fingerprint
    pipe.store.touch(fp)
    if record:
        pipe.record(name, report.entry)
    if report.action == "built" and os.environ.get("HFBUILD_PUSH", "") in {"1", "true"}:
        _push(pipe, name, fp)
    if log is not None:
        log(report.line())
    moved = pipe.manifests()[name].fingerprint != fp  # built under what it read at run time
    pipe.rekey(name if moved else None)
    return report


def _as_datasets_refuses(pipe: Pipeline, name: str, e: MissingDataError) -> MissingDataError:
    """A load stage whose data files match nothing fails with the error plain `datasets`
    raises for the same patterns as well (its type and message: which one depends on the
    builder), so a user reads what `datasets` would have said; `e` itself when the stage is
    not a load, or datasets loads something there (then hfbuild's resolution is the news)."""
    import tempfile

    spec = pipe[name].spec
    if spec.kind != "load" or hub.any_hub(spec.options["data_files"]):
        return e  # datasets cannot list a Hub commit offline: hub.py's message says it all
    from hfbuild.builds import builder

    with tempfile.TemporaryDirectory(prefix="hfbuild-refusal-") as scratch:
        theirs = builder.refusal(spec, pipe.root, scratch)
    if theirs is None:
        return e
    return MissingDataError(
        f"{e} Plain datasets fails here too: {type(theirs).__name__}: {theirs}".rstrip(": ")
    )


def _set_aside_if_corrupt(pipe: Pipeline, name: str, fp: str) -> None:
    """With the lock held: an entry that exists but fails its checks is reported and moved
    aside (gc deletes it), so the build can publish a good one in its place."""
    why = pipe.store.check(fp)
    if why is not None:
        moved = pipe.store.quarantine(fp)
        warnings.warn(
            f"stage {name!r}: the stored result {fp} is damaged ({why}); moved aside to "
            f"{moved} and rebuilding it.",
            CorruptEntryWarning,
            stacklevel=4,
        )


def _pull(pipe: Pipeline, name: str, fp: str, executor: str | None, record: bool) -> Report | None:
    """Fetch the stage's result from the remote cache instead of building it, when the
    remote has it. A remote entry that fails its checks is reported and never used; an
    unreachable remote is reported once, and the stage built here (`remote.unavailable`)."""
    t0 = time.perf_counter()
    if pipe.remote_url() is not None:  # on Ray: connecting while the remote is asked
        expect(pipe.root, executor)
    try:
        remote = pipe.remote()
        if remote is None:
            return None
        if adopt_inputs(pipe, remote, name, record):
            # Its key holds its inputs' results (inputid.py): keyed by the adopted ones now.
            fp = pipe.manifests(fresh=True)[name].fingerprint
            if (stored := pipe.store.intact_manifest(fp)) is not None:
                return Report(name, fp, "up to date", stored_rows(stored), 0.0, entry=stored)
        if remote.pull(pipe.store, fp, name) == 0:
            return None
    except RemoteError as e:
        ray = executor_name(pipe.root, executor) == "ray"
        message = unavailable(e, f"stage {name!r}", ray=ray)
        if message is not None:
            warnings.warn(message, RemoteWarning, stacklevel=3)
        return None
    stored = pipe.store.intact_manifest(fp)
    if stored is None:
        return None
    return Report(name, fp, "pulled", stored_rows(stored), time.perf_counter() - t0, entry=stored)


def adopt_inputs(pipe: Pipeline, remote: Remote, name: str, record: bool) -> bool:
    """Before stage `name` is pulled or built on its inputs: an input this store built but
    the remote holds another copy of (first writer wins) is replaced by the remote's, so the
    stage's input, or the base it selects rows of, is the published entry (`Remote.adopt`);
    with `record`, the input's lock entry then records the adopted content. True when an
    input was replaced (the stage's key, which holds its inputs' results, changes)."""
    manifests = pipe.manifests()
    adopted = False
    for dep in pipe[name].spec.inputs:
        fp = manifests[dep].fingerprint
        if remote.adopt(pipe.store, fp, dep):
            adopted = True
            pipe.ledger.forget(fp)
            warnings.warn(
                f"stage {dep!r}: this store's copy of {fp} was never published, and the "
                f"remote {remote.url} holds another (first writer wins): the remote's copy "
                f"replaces it, and what is built on it now uses the published one.",
                RemoteWarning,
                stacklevel=3,
            )
            if record:
                pipe.record(dep)
    return adopted


def _push(pipe: Pipeline, name: str, fp: str) -> None:
    try:
        remote = pipe.remote()
        if remote is not None:
            remote.push(pipe.store, fp, name)
    except RemoteUnreachableError as e:
        if not e.again:
            warnings.warn(f"stage {name!r}: push failed: {e}", RemoteWarning, stacklevel=3)
    except RemoteError as e:
        warnings.warn(f"stage {name!r}: push failed: {e}", RemoteWarning, stacklevel=3)
