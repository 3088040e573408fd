"""The driver's connection to its Ray cluster, made early and on a thread.

A build command on Ray paid, one after the other: importing ray (~0.3 s), connecting
(~0.15 s), the first `ray.put`'s setup of Ray's serializers (~0.2 s of imports), and then,
waiting for its first result, the job's first worker starting and importing what a task
imports (datasets, hfbuild, s3fs: ~1 s) while the driver only waited. Now a stage the store
lacks, on the Ray executor with a remote (`executor.expect`, before the remote is asked for
it), starts all of it on a thread (`start`) while the driver imports the remote's file
system, asks it and prepares the tasks; the job's workers are warmed at once (a task per CPU
of the cluster importing what a task imports, `raywarm.warm_up`), so the real tasks find
them ready. The driver's first use of Ray waits for the connection (`connected`); an error
connecting is raised there, as before.

Owns: connecting this process to the cluster once (Ray's own RAY_ADDRESS, else `ray.init()`'s
default), on the `hfbuild-ray-connect` thread (`start`; `connected` starts it if nothing
did), with Ray's SIGTERM handler set from the main thread (Ray sets it only there) and its
warning about that dropped; the warm-up tasks; the exit's disconnect (`ray.shutdown` without
the 0.5 s sleep Ray's own exit hook starts with, for forwarded logs there are none of:
`log_to_driver=False`), waiting for a connection still being made at exit first.

Must never: import ray at module level, connect a process that builds on no Ray executor or
whose stages its store holds (a stage the remote holds is connected for: the pull is not
known before it is asked), or let a warm-up task run project code (it imports installed
packages only).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import signal
import sys
import threading
from typing import Any

from hfbuild.core.errors import ConfigError

_lock = threading.Lock()
_thread: threading.Thread | None = None
_error: list[BaseException] = []  # what the connecting thread raised, for `connected`
_ready = threading.Event()  # connected, or failed to (`_error`)
_warming: list[Any] = []  # the warm-up tasks' references (held: nothing waits on them)

# At exit, a connection still being made is waited for this long before Ray is shut down
# (an unreachable cluster: ray.init retries for longer; the process then exits without it).
EXIT_WAIT = 5.0


def start() -> None:
    """Connect to the cluster on a thread, and warm the job's workers, unless already
    connected or connecting. Call it from the main thread (Ray's SIGTERM handler is set
    there)."""
    global _thread
    with _lock:
        if _thread is not None:
            return
        # What ray.init does on the main thread: SIGTERM exits through the exit hooks,
        # which disconnect the driver.
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _sigterm)
        _error.clear()
        _ready.clear()
        # The thread's submitting imports numpy (Ray's serializers): imported here first, since
        # keying on this thread meanwhile looks optional libraries up in sys.modules
        # (`canonical`) and would find one half imported ("partially initialized module").
        with contextlib.suppress(ImportError):
            importlib.import_module("numpy")
        atexit.register(_at_exit)  # before the hooks ray.init registers: it runs after them
        _thread = threading.Thread(target=_connect, name="hfbuild-ray-connect", daemon=True)
        _thread.start()


def connected() -> None:
    """Wait for the connection `start` began (starting it if none is); raise what the
    connection raised (a later call tries again)."""
    global _thread
    start()
    _ready.wait()
    if _error:
        with _lock:
            err, _thread = _error[0], None
            _error.clear()
        if isinstance(err, ImportError):
            raise missing(err) from err
        raise err


def missing(e: ImportError) -> ConfigError:
    """The error naming what to install, Ray's import having failed with `e`."""
    return ConfigError(
        f"the Ray executor needs Ray, which cannot be imported here ({e}). Install it "
        f"into this environment: pip install 'hfbuild[ray]' (or pip install ray), or "
        f"choose the local executor (unset HFBUILD_EXECUTOR)."
    )


def _sigterm(signum: int, frame: object) -> None:
    sys.exit(signum)


class _NotMainThread(logging.Filter):
    """Drops Ray's warning that ray.init, off the main thread, did not set its SIGTERM
    handler (`start` set it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _connect() -> None:
    try:
        import ray

        if not ray.is_initialized():
            # Ray's error listener prints each error the cluster reports for this job on
            # the driver's stdout ("(raylet) A worker died ...", lines per retry), with no
            # setting to stop it: its stop event is set first, so it returns at once. The
            # errors stay in Ray's logs; a task's failure reaches the driver as its result.
            worker = getattr(ray._private.worker, "global_worker", None)
            stop = getattr(worker, "threads_stopped", None)
            if stop is not None:
                stop.set()
            quiet = _NotMainThread()
            log = logging.getLogger("ray._private.worker")
            log.addFilter(quiet)
            try:
                # RAY_ADDRESS is read by ray.init itself. Workers' output stays in Ray's logs.
                ray.init(log_to_driver=False, logging_level=logging.WARNING)
            finally:
                log.removeFilter(quiet)
            # Ray's exit hook first sleeps 0.5 s for forwarded logs (none: log_to_driver=
            # False); this one, registered later, runs first: the disconnect without it.
            atexit.register(ray.shutdown)
    except BaseException as e:  # raised by `connected` on the thread that waits
        _error.append(e)
        return
    finally:
        _ready.set()
    with contextlib.suppress(Exception):  # a warm-up that fails leaves the tasks to import
        _warm(ray)


def _warm(ray: Any) -> None:
    """A warm-up task per CPU of the cluster (each takes one: each its own worker) and Ray's
    serializers set up here (the first `ray.put` would import them)."""
    from hfbuild.builds import raywarm

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    warm = ray.remote(num_cpus=1, max_retries=0)(raywarm.warm_up)
    _warming.extend(warm.options(name="hfbuild:warm-up").remote() for _ in range(cpus))
    worker = getattr(ray._private.worker, "global_worker", None)
    context = getattr(worker, "get_serialization_context", None)
    if context is not None:
        context()


def _at_exit() -> None:
    """A connection still being made at exit: waited for, then closed (the hooks it
    registers now would not run)."""
    with _lock:
        t = _thread
    if t is None or not t.is_alive():
        return
    t.join(EXIT_WAIT)
    ray = sys.modules.get("ray")
    if ray is not None and not t.is_alive() and ray.is_initialized():
        ray.shutdown()
