"""The `hfbuild` command: parse, dispatch to `commands/`, and the one error boundary.

Exit codes: 0 ok; 1 a check failed or a user error (an `HfbuildError`, printed as one message);
3 a bug in hfbuild (traceback printed); 130 interrupted; 141 (128 + SIGPIPE) the reader of the
output went away (`hfbuild status | head -1`), silently, as standard CLIs do.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import select
import signal
import stat
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hfbuild.core import teardown
from hfbuild.core.errors import HfbuildError

if TYPE_CHECKING:
    from hfbuild.pipeline.pipeline import Pipeline


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hfbuild", description="Correct caching for datasets transforms, run by doit."
    )
    dodo_help = "the dodo file defining the pipeline (default: ./dodo.py)"
    p.add_argument("--dodo", metavar="PATH", help=dodo_help)
    # The global options are accepted after the command too (`hfbuild install-hook --dodo X`):
    # each subparser knows them with a suppressed default, so one given before the command is
    # kept when the command does not repeat it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dodo", metavar="PATH", default=argparse.SUPPRESS, help=dodo_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmd = functools.partial(sub.add_parser, parents=[common])
    s = cmd("status", help="each stage: up to date, stale and why, or dirty")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing; exit 1 if stale")
    s.add_argument(
        "--strict",
        action="store_true",
        help="a stage whose key holds uncommitted code is an error (also HFBUILD_STRICT=1)",
    )
    e = cmd("explain", help="what changed since a stage was last built")
    e.add_argument("stage")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    gr = cmd("graph", help="the stage graph with each stage's state, as Mermaid, DOT or a page")
    gr.add_argument(
        "--format",
        choices=("mermaid", "dot", "json"),
        default="mermaid",
        help="what to print (default: mermaid, which GitHub and GitLab render in markdown)",
    )
    gr.add_argument(
        "--html",
        metavar="FILE",
        help="write one self-contained HTML page (picture, table of stages) instead",
    )
    v = cmd("verify", help="check hfbuild.lock (pre-commit hook and CI)")
    mode = v.add_mutually_exclusive_group()
    mode.add_argument("--staged", action="store_true", help="check what is staged (the hook)")
    mode.add_argument(
        "--rebuild",
        action="store_true",
        help="rebuild every stage in a scratch store and compare with the lock",
    )
    mode.add_argument(
        "--deep",
        action="store_true",
        help="read every stored result in full and check its content hash",
    )
    v.add_argument("--strict", action="store_true", help="uncommitted code is an error")
    v.add_argument(
        "--require-data",
        action="store_true",
        help="a load stage whose data files are absent (and not confirmed by the remote) is "
        "an error, not a notice",
    )
    v.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    cmd(
        "lock",
        help="rewrite hfbuild.lock from the current code and the store, building nothing "
        "(resolves a merge conflict in it)",
    )
    for verb, text in (
        ("push", "upload current results the remote lacks"),
        ("pull", "download current results the store lacks"),
    ):
        t = cmd(verb, help=text)
        t.add_argument("stages", nargs="*", metavar="STAGE", help="default: every stage")
        t.add_argument(
            "--remote",
            metavar="URL",
            help="fsspec URL (default: $HFBUILD_REMOTE, "
            "else [tool.hfbuild] remote in pyproject.toml)",
        )
    r = cmd("remote", help="manage the remote cache's entries")
    rsub = r.add_subparsers(dest="remote_command", required=True, metavar="ACTION")
    rm = rsub.add_parser(
        "rm",
        parents=[common],
        help="remove the remote's entry for a stage's current key (a bad one: the committed "
        "lock's record is the check)",
    )
    rm.add_argument("stage", metavar="STAGE")
    rm.add_argument("--shard", metavar="LABEL", help="one shard of the stage (its data file)")
    rm.add_argument(
        "--force",
        action="store_true",
        help="remove it even when it holds what the committed lock records",
    )
    rm.add_argument("--remote", metavar="URL", help="fsspec URL (default as for push)")
    b = cmd("build", help="build stages (what `doit run` does), choosing the executor")
    b.add_argument("stages", nargs="*", metavar="STAGE", help="default: every stage")
    b.add_argument(
        "--executor",
        choices=("local", "ray"),
        help="where missing results are built (default: $HFBUILD_EXECUTOR, else "
        "[tool.hfbuild] executor in pyproject.toml, else local); ray needs a remote cache",
    )
    g = cmd("gc", help="delete store entries nothing references")
    g.add_argument(
        "--keep-commits",
        type=int,
        default=1,
        metavar="N",
        help="keep what the lock references in the last N commits (default 1: HEAD)",
    )
    g.add_argument(
        "--keep-days",
        type=float,
        default=7.0,
        metavar="D",
        help="keep anything used in the last D days (default 7)",
    )
    g.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    g.add_argument(
        "--executor",
        choices=("local", "ray"),
        help="with ray, each alive node's store is collected too, by the same rules (default "
        "as for build: $HFBUILD_EXECUTOR, else [tool.hfbuild] executor, else local)",
    )
    d = cmd("du", help="the store's size per stage")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    dr = cmd("doctor", help="check that the store can be used (and shared)")
    dr.add_argument(
        "--shared",
        action="store_true",
        help="check it as a store shared by a group even if it does not look like one",
    )
    h = cmd("install-hook", help="install a plain git pre-commit hook")
    h.add_argument("--force", action="store_true", help="replace an existing hook")
    return p


def _record_modes(args: argparse.Namespace) -> tuple[str, ...]:
    """The snapshot modes whose manifests the command can take from the no-import record
    (record.py); () for a command that always imports dodo.py."""
    if args.command in ("status", "explain", "build", "graph"):
        return ("worktree",)
    if args.command == "verify" and not (args.rebuild or args.deep):
        return ("index", "worktree") if args.staged else ("worktree",)
    return ()


def _run(args: argparse.Namespace) -> int:
    from hfbuild.cli.project import dodo_path, load_pipeline, recorded_pipeline
    from hfbuild.pipeline import record

    dodo = dodo_path(args.dodo)  # before load_pipeline changes the working directory
    if getattr(args, "html", None) is not None:
        args.html = os.path.abspath(args.html)
    modes = _record_modes(args)
    session = record.session(dodo, "cli") if modes else None
    if session is not None:
        pipe = recorded_pipeline(session, modes)
        if pipe is not None and (args.command != "build" or _all_stored(pipe)):
            try:
                return _command(args, pipe, dodo)
            except record.NeedsImport:
                session.drop()  # asked for what only dodo.py answers: nothing printed yet
                session = record.session(dodo, "cli")
    return _command(args, load_pipeline(args.dodo, session, modes), dodo)


def _all_stored(pipe: Pipeline) -> bool:
    """Whether the store holds every stage (so `hfbuild build` builds nothing)."""
    return all(pipe.store.has(m.fingerprint) for m in pipe.manifests().values())


def _command(args: argparse.Namespace, pipe: Pipeline, dodo: str) -> int:
    from hfbuild.keys.fingerprint import strict

    if args.command == "status":
        from hfbuild.cli.commands.status import status

        return status(pipe, as_json=args.json, quiet=args.quiet, strict=args.strict or strict())
    if args.command == "explain":
        from hfbuild.cli.commands.explain import explain

        return explain(pipe, args.stage, as_json=args.json)
    if args.command == "graph":
        from hfbuild.cli.commands.graph import graph

        return graph(pipe, fmt=args.format, html=args.html)
    if args.command == "verify":
        from hfbuild.cli.commands.verify import verify

        return verify(
            pipe,
            staged=args.staged,
            rebuild=args.rebuild,
            deep=args.deep,
            strict=args.strict or strict(),
            quiet=args.quiet,
            require_data=args.require_data,
        )
    if args.command == "lock":
        from hfbuild.cli.commands.lock import lock

        return lock(pipe)
    if args.command in ("push", "pull"):
        from hfbuild.cli.commands import transfer

        return int(getattr(transfer, args.command)(pipe, args.stages, args.remote))
    if args.command == "remote":
        from hfbuild.cli.commands.transfer import remote_rm

        return remote_rm(pipe, args.stage, args.shard, args.remote, args.force)
    if args.command == "build":
        from hfbuild.cli.commands.build import build

        pipe.witness_builds("cli")  # what it builds is recorded confirmed (witness.py)
        return build(pipe, args.stages, args.executor)
    if args.command == "gc":
        from hfbuild.cli.commands.gc import gc

        return gc(
            pipe,
            keep_commits=args.keep_commits,
            keep_days=args.keep_days,
            dry_run=args.dry_run,
            executor=args.executor,
        )
    if args.command == "du":
        from hfbuild.cli.commands.gc import du

        return du(pipe, as_json=args.json)
    if args.command == "doctor":
        from hfbuild.cli.commands.doctor import doctor

        return doctor(pipe, shared=args.shared)
    if args.command == "install-hook":
        from hfbuild.cli.commands.install_hook import install_hook

        return install_hook(pipe, dodo, force=args.force)
    raise AssertionError(args.command)


def _reader_gone() -> bool:
    """Whether stdout's or stderr's reader has gone away (`hfbuild status | head -1`), rather
    than some other pipe or socket having broken (a remote's connection, say): a write end
    whose reader is gone polls as an error."""
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            if not hasattr(select, "poll"):  # Windows: no poll(); a pipe is the best guess
                if stat.S_ISFIFO(os.fstat(fd).st_mode):
                    return True
                continue
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            if any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0)):
                return True
        except (OSError, ValueError):
            continue
    return False


def _quiet_exit() -> int:
    """What CLIs do when their reader goes away: stop, say nothing, exit 128 + SIGPIPE. The
    standard streams are pointed at /dev/null so flushing them at exit raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE if hasattr(signal, "SIGPIPE") else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    teardown.skip_final_collection()  # takes effect at exit only
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = _run(args)
        for w in {str(w.message): w for w in caught if w.category.__module__.startswith("hfbuild")}:
            print(f"warning: {w}", file=sys.stderr)
        sys.stdout.flush()  # a closed pipe shows here, inside the error boundary
        return code
    except BrokenPipeError:
        if not _reader_gone():
            return _internal_error()
        return _quiet_exit()
    except HfbuildError as e:
        print(f"hfbuild: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from hfbuild.pipeline import witness

        witness.interrupted()  # a build's side check dies with it
        print("hfbuild: interrupted", file=sys.stderr)
        return 130
    except Exception:
        return _internal_error()


def _internal_error() -> int:
    traceback.print_exc()
    print(
        "hfbuild: internal error: this is a bug in hfbuild; please report it with the "
        "traceback above.",
        file=sys.stderr,
    )
    return 3


if __name__ == "__main__":
    sys.exit(main())
