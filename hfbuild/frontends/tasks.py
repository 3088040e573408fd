"""doit task dicts for a pipeline, and `hfbuild.Pipeline`, whose `tasks()` makes them.

Owns: one plain doit task dict per stage (`actions`, `uptodate`, `task_dep`, `clean`, `doc`),
so `doit run/list/info/clean/-n` work as doit users expect. `uptodate` asks the store whether it
holds the stage's current fingerprint; doit's own database decides nothing. Ctrl-C under doit is
one line and exit 130: during a stage's check or build, and while doit imports dodo.py (from
`import hfbuild` on, a SIGINT handler that stands in for Python's only during that import).

Must never: import `datasets` (doit evaluates `uptodate` for every stage on every run).
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

from hfbuild.core import teardown
from hfbuild.core.errors import HfbuildError, doit_loading
from hfbuild.core.spec import rows_text, stored_rows
from hfbuild.keys.fingerprint import strict
from hfbuild.pipeline import pipeline, record, witness
from hfbuild.source import refs

if TYPE_CHECKING:
    from doit.exceptions import TaskFailed

    from hfbuild.core.spec import StageSpec


class Pipeline(pipeline.Pipeline):
    """`hfbuild.Pipeline`: a pipeline (`pipeline.Pipeline`: its stages, keys and results)
    whose stages are doit tasks. The doit front lives here, above the builds it runs, so the
    pipeline below never imports what builds its stages."""

    def tasks(self, basename: str | None = None) -> Iterator[dict[str, Any]]:
        """doit task dicts, one per stage; `yield from pipe.tasks()` in `task_<basename>`."""
        if basename is None:
            caller = sys._getframe(1).f_code.co_name
            basename = caller[5:] if caller.startswith("task_") else self.name
        self.name = basename
        _import_done()
        if not self.recording and self.origin is not None and not record.cli_loading:
            # doit imported dodo.py: the record saves only the imports of modules named by
            # reference and not imported yet. Without any, the code cache's fingerprints cost
            # about what the record's check does (the 20k-file repository: the check +40 ms).
            session = record.session(self.origin, "doit") if _unimported_refs(self) else None
            if session is not None:
                self.use_record(session)
            # What this run builds is recorded confirmed by a fresh import beside it (witness.py).
            self.witness_builds("doit")
        return pipeline_tasks(self, basename)


def _interrupted_import(signum: int, frame: FrameType | None) -> None:
    """SIGINT while doit imports dodo.py: one line and exit 130, as a Ctrl-C during a
    stage's build gives, instead of doit's traceback of the import. After the import, the
    interrupt Python's own handler raises."""
    if doit_loading(frame):
        witness.interrupted()  # a side check started while doit loads the tasks
        print(
            "hfbuild: interrupted while doit imported dodo.py; nothing was built.", file=sys.stderr
        )
        sys.stderr.flush()
        raise SystemExit(130)
    _import_done()
    signal.default_int_handler(signum, frame)


def _import_done() -> None:
    """Python's own SIGINT handler again, in place of `_interrupted_import`."""
    if signal.getsignal(signal.SIGINT) is _interrupted_import:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _during_import() -> None:
    """When doit is importing dodo.py (which imports hfbuild first), Ctrl-C until the import
    ends is `_interrupted_import`'s; a handler of the user's own is left alone."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        and doit_loading(sys._getframe(1))
    ):
        signal.signal(signal.SIGINT, _interrupted_import)


_during_import()


def _unimported_refs(pipe: pipeline.Pipeline) -> bool:
    """Whether a stage names its function by a reference whose module is not imported."""
    return any(s.ref is not None and s.ref.partition(":")[0] not in sys.modules for s in pipe.specs)


def _uptodate(pipe: pipeline.Pipeline, name: str) -> bool:
    # A user error here (a missing data file, a corrupt git index) would make doit print a
    # traceback: report "not up to date" instead, and let the build action fail with the
    # message. A warning (the lock was rewritten) is printed as `_build` prints them.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if not pipe.is_built(name):
                return False
            # Strict mode allows no result of uncommitted code or data, even one already
            # built: the build action then fails with the DirtyTreeError naming the files.
            return not (strict() and pipe.manifests()[name].dirty)
        except HfbuildError:
            return False
        except KeyboardInterrupt:
            raise _interrupted(name) from None
        finally:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)


def _build(pipe: pipeline.Pipeline, name: str) -> TaskFailed | None:
    # Under doit a warning's source line (inside hfbuild) says nothing useful: print the
    # message itself, once per stage. A user error fails the task with its message (doit
    # prints it without a traceback into hfbuild); bugs still raise.
    from doit.exceptions import TaskFailed

    from hfbuild.builds.stage import build

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                report = build(pipe, name)
            finally:
                for w in caught:
                    print(f"warning: {w.message}", file=sys.stderr)
    except KeyboardInterrupt:
        raise _interrupted(name) from None
    except HfbuildError as e:
        after = _built_from(pipe, name)
        if after:  # doit stops here and names none of them: say they fail with it
            return TaskFailed(
                f"{e}\nfailed with it, as they are built from {name!r}: {', '.join(after)}"
            )
        return TaskFailed(str(e))
    print(report.line())
    sys.stdout.flush()
    return None


def _interrupted(name: str) -> SystemExit:
    """Ctrl-C under doit: one line and exit 130, as the `hfbuild` command does, instead of
    doit's traceback. Nothing half-built is published (builds clean up as they unwind), and
    a build's side check is killed."""
    witness.interrupted()
    print(f"hfbuild: interrupted (stage {name!r}); nothing of it was published.", file=sys.stderr)
    sys.stderr.flush()
    return SystemExit(130)


def _built_from(pipe: pipeline.Pipeline, name: str) -> list[str]:
    """The stages built from `name`, directly or through others, in pipeline order."""
    down = {name}
    for spec in pipe.specs:
        if any(i in down for i in spec.inputs):
            down.add(spec.name)
    return [s.name for s in pipe.specs if s.name in down and s.name != name]


def _title(pipe: pipeline.Pipeline, name: str, task: Any) -> str:
    """doit's line for the task: with the row count once the stage is in the store, so a
    no-op run prints one informative line per stage."""
    try:
        m = pipe.manifests()[name]
        # In strict mode a result of uncommitted files is not served: its build fails.
        doc = None if strict() and m.dirty else pipe.ledger.stored(m.fingerprint)
    except HfbuildError:
        doc = None
    if doc is None:
        return str(task.name)
    return f"{task.name} ({rows_text(stored_rows(doc))}, up to date)"


def _clean(pipe: pipeline.Pipeline, name: str) -> None:
    err = pipe.manifests().error(name)
    if err is not None:  # it has no fingerprint, so no result of it can be current
        print(f"{name}: nothing to remove ({err})")
        return
    fp = pipe.manifests()[name].fingerprint
    pipe.ledger.forget(fp)
    if pipe.store.remove(fp):
        print(f"{name}: removed {fp} from the store")


def _failing_last(pipe: pipeline.Pipeline) -> list[StageSpec]:
    """The stages in pipeline order, except that those that cannot be fingerprinted (and
    their consumers) come last: doit stops at the first failed task, so every other stage is
    built before a broken one fails with its message."""
    try:
        failed = pipe.manifests().failed
    except HfbuildError:  # nothing can be fingerprinted: every task fails with the message
        return pipe.specs
    return [s for s in pipe.specs if s.name not in failed] + [
        s for s in pipe.specs if s.name in failed
    ]


def pipeline_tasks(pipe: pipeline.Pipeline, basename: str) -> Iterator[dict[str, Any]]:
    teardown.skip_final_collection()  # takes effect at exit only
    yield {
        "name": None,
        "doc": f"build the hfbuild pipeline's {len(pipe)} stages (those whose result is stale)",
    }
    for spec in _failing_last(pipe):
        doc = spec.doc or (
            f"{spec.kind} "
            + (
                f"{spec.options.get('builder')} data"
                if spec.kind == "load"
                else refs.qualname(spec) + (f" on {', '.join(spec.inputs)}")
            )
        )
        yield {
            "name": spec.name,
            "doc": doc,
            "actions": [(_build, [pipe, spec.name])],
            "uptodate": [(_uptodate, [pipe, spec.name], {})],
            "task_dep": [f"{basename}:{dep}" for dep in spec.inputs],
            "clean": [(_clean, [pipe, spec.name])],
            "title": functools.partial(_title, pipe, spec.name),
            "verbosity": 2,
        }
