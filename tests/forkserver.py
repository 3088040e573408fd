"""A fork server for tests that run many short Python processes: it imports the heavy modules
once (`datasets`, and `hfbuild` unless started with `--plain`), then serves each request in a
child forked from that pristine state, so every request runs in a process of its own that has
never run user code, without paying the ~1 s start-up of Python and `datasets` again.

Protocol: one JSON line per request on stdin, `{"op", "cwd", "env", "out", "arg"}`; the server
forks, the child changes to `cwd`, updates its environment, sends its stdout and stderr to
`out + ".log"`, runs the operation and exits with its exit code; the server answers one JSON
line `{"rc": code}` (`-9` when the child was killed after `timeout` seconds). Operations (each
writes its answer to `out` with pickle; the test reads what its own children wrote):

- `build`: `hfbuild build` (`hfbuild.cli.main.main`), the exit code is the command's;
- `results`: each stage of the dodo.py's pipeline through `pipe.result()`, as plain values;
- `reference`: plain `datasets` over the spec in `arg`: one `load_dataset`, then the same
  `map`/`filter` calls, caching disabled, a fresh HF cache (`arg["cache"]`);
- `script`: the Python code `arg["code"]` run as `__main__` with `cwd` first on `sys.path`
  and `sys.argv` `["-c", *arg["argv"]]` (what `python -c CODE ARGV...` run in `cwd` runs);
  the answer is what it printed, the exit code 1 when it raised (the traceback in the log)
  or its `SystemExit`'s.

`"environ": true` in a request makes `env` the child's whole environment (the test's), not
additions to the server's. It is set in the child before the operation runs, so it is what
the operation reads; what the modules the server imported read from the environment on
import (`datasets.config`'s cache paths and offline switch, huggingface_hub's constants) is
the server's own, and a switch hfbuild reads on import (`HFBUILD_OBSERVE`) cannot be turned
here: a test of those starts a fresh process.

The child ends as an interpreter does: it waits for its non-daemon threads (a pool still
pushing), runs the `atexit` functions, then exits with the operation's code.

The server must never import the project's code: only its children do.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import signal
import sys
import threading
import time
from typing import Any


def _values(ds: Any) -> dict[str, Any]:
    """A Dataset or DatasetDict as Python values: split order, features and rows per split."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        parts = {k: ds[k] for k in splits}
    else:
        splits = [None]
        parts = {None: ds}
    return {
        "kind": type(ds).__name__,
        "splits": splits,
        "features": {k: v.features.to_dict() for k, v in parts.items()},
        "rows": {k: v.to_list() for k, v in parts.items()},
    }


def _error(e: BaseException) -> dict[str, Any]:
    return {"error": type(e).__name__, "message": str(e)[:2000]}


def _op_build(arg: Any) -> tuple[int, Any]:
    from hfbuild.cli.main import main

    sys.argv = ["hfbuild", "build"]
    try:
        rc = main(["build"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    return int(rc or 0), None


def _op_results(arg: Any) -> tuple[int, Any]:
    from hfbuild.cli.project import load_pipeline

    pipe = load_pipeline("dodo.py")
    out: dict[str, Any] = {}
    for stage in arg["stages"]:
        try:
            out[stage] = _values(pipe.result(stage))
        except Exception as e:
            out[stage] = _error(e)
    return 0, out


def _op_reference(arg: Any) -> tuple[int, Any]:
    import importlib

    import datasets

    sys.path.insert(0, os.getcwd())
    datasets.disable_caching()
    datasets.config.HF_DATASETS_CACHE = arg["cache"]
    mod = importlib.import_module(arg["module"])
    out: dict[str, Any] = {}
    load = dict(arg["load"])
    if load.get("features") is not None:
        load["features"] = datasets.Features(
            {k: datasets.Value(v) for k, v in load["features"].items()}
        )
    try:
        ds = datasets.load_dataset(arg["builder"], cache_dir=arg["cache"], **load)
        out[arg["load_name"]] = _values(ds)
        for st in arg["stages"]:
            method = getattr(ds, st["kind"])
            ds = method(getattr(mod, st["fn"]), fn_kwargs=st["kwargs"], **st["options"])
            out[st["name"]] = _values(ds)
    except Exception as e:
        failed = next(
            n for n in [arg["load_name"], *(s["name"] for s in arg["stages"])] if n not in out
        )
        out[failed] = _error(e)
    return 0, out


def _op_script(arg: Any) -> tuple[int, Any]:
    import contextlib
    import io
    import traceback

    sys.path.insert(0, os.getcwd())
    sys.argv = ["-c", *arg.get("argv", ())]
    printed = io.StringIO()
    rc = 0
    with contextlib.redirect_stdout(printed):
        try:
            exec(compile(arg["code"], "<script>", "exec"), {"__name__": "__main__"})
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
    return rc, printed.getvalue()


OPS = {
    "build": _op_build,
    "results": _op_results,
    "reference": _op_reference,
    "script": _op_script,
}


def _child(req: dict[str, Any]) -> None:
    """Runs in the forked child; never returns."""
    rc = 3
    try:
        os.setpgid(0, 0)
        log = os.open(req["out"] + ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdin.close()
        os.chdir(req["cwd"])
        if req.get("environ"):
            os.environ.clear()
        os.environ.update(req.get("env") or {})
        rc, answer = OPS[req["op"]](req.get("arg"))
        with open(req["out"], "wb") as f:
            pickle.dump(answer, f)
    except BaseException:
        import traceback

        traceback.print_exc()
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # as Py_Finalize: threads joined
        atexit._run_exitfuncs()  # what the end of a fresh process runs (trash, teardown)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(rc)


def serve(timeout: float) -> None:
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints from imports must not reach the protocol
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                rc = -9
                break
            time.sleep(0.002)
        proto.write(json.dumps({"rc": rc}) + "\n")
        proto.flush()


if __name__ == "__main__":
    plain = "--plain" in sys.argv
    import datasets  # noqa: F401

    if not plain:
        import hfbuild.builds.builder
        import hfbuild.builds.stage
        import hfbuild.cli.main  # noqa: F401
    serve(float(os.environ.get("FORKSERVER_TIMEOUT", "600")))
