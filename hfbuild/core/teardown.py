"""How a short-lived hfbuild process ends: without the interpreter's final garbage collection;
and the collector paused while a large manifest is parsed.

Owns: `skip_final_collection()`, called once a process is known to be a one-shot command (a
doit run loading the pipeline's tasks, an `hfbuild` command). At exit it moves every object
still alive into the collector's permanent generation (`gc.freeze`), so the collection the
interpreter runs while shutting down does not traverse the hundreds of thousands of objects
that a pipeline's manifests, code cache and lock leave behind (bench/scale_repo.py: tens of ms of
a no-op's CPU time in a 20,000-file repository). The memory goes back to the system with the
process, as it would anyway. Also `collection_paused()`: a block during which the cyclic
collector does not run (parsing a list of thousands of shards makes hundreds of thousands of
objects that live on: each collection they trigger traverses them all, ~0.02 s of a no-op over
5,000 files); it runs again, as it was, when the block ends.

Must never: freeze before the process exits or pause beyond the block (a long-lived process
keeps collecting), or be needed for anything but time. Python does not promise finalizers at
exit; hfbuild's own writes (store entries, the lock, refs, the code and stat caches) are
complete, closed and renamed before the code that makes them returns, and doit closes its
database itself.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import threading
from collections.abc import Iterator

_registered = False
_lock = threading.Lock()


def skip_final_collection() -> None:
    """At exit, freeze what is alive so the interpreter's last collection skips it; the
    first call registers the handler, later ones do nothing."""
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    # atexit runs handlers last-in first-out: this one, registered late, runs before the
    # handlers of modules imported earlier, which still work (frozen objects stay alive and
    # usable; only the collector skips them).
    atexit.register(gc.freeze)


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """The cyclic collector paused for the block (reference counting still frees what is
    dropped); what the block left in cycles is collected once the collector runs again. A
    collector already paused by someone else stays paused."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
