"""Independent calls run a few at a time on threads, so that round trips overlap.

The remote's calls for one stage's shards (whether each is there, pulling each) are each a
few round trips, almost all of it waiting: run one after another they add up to seconds for
a thousand shards; on a few threads they overlap.

Owns: `each`, one function called over many items on a small thread pool, each call's result
or exception returned in the items' order; `Pool`, calls submitted one at a time as their
items arrive, collected the same way.

Must never: swallow an exception (each is handed back, in order, for the caller to raise or
report), leave calls running after the caller stops (Ctrl-C cancels those not started and
waits for none), or be used for calls that write shared state without their own lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    import concurrent.futures

T = TypeVar("T")
R = TypeVar("R")

# Enough to overlap the round trips of a remote on loopback or a LAN; few enough that a
# thousand pulls do not open a thousand connections.
WORKERS = 8


def each(fn: Callable[[T], R], items: Iterable[T], workers: int = WORKERS) -> list[R | Exception]:
    """`fn` called on every item, `workers` at a time: the results, or the exception a call
    raised, in the items' order."""
    todo = list(items)
    if len(todo) <= 1:
        return [_call(fn, x) for x in todo]
    pool = Pool(fn, workers)
    try:
        for x in todo:
            pool.submit(x)
        return pool.results()
    finally:
        pool.close()


def _call(fn: Callable[[T], R], x: T) -> R | Exception:
    try:
        return fn(x)
    except Exception as e:
        return e


class Pool(Generic[T, R]):
    """`fn` called on items submitted one at a time, `workers` at a time; `results()` waits
    for them all. `close()` (also after Ctrl-C) cancels the calls not started yet."""

    def __init__(self, fn: Callable[[T], R], workers: int = WORKERS) -> None:
        # Imported here: it imports `logging` (~5 ms), which a no-op never needs.
        import concurrent.futures

        self._fn = fn
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="hfbuild")
        self._futures: list[concurrent.futures.Future[R | Exception]] = []

    def submit(self, item: T) -> None:
        self._futures.append(self._pool.submit(_call, self._fn, item))

    def results(self) -> list[R | Exception]:
        """Every submitted call's result or exception, in the order submitted."""
        return [f.result() for f in self._futures]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def import_meanwhile(module: str) -> None:
    """Import `module` (datasets: seconds of it) on a thread while the caller waits on
    something else; whoever needs it then finds it imported, or waits for the import."""
    import importlib
    import threading

    threading.Thread(target=importlib.import_module, args=(module,), daemon=True).start()
