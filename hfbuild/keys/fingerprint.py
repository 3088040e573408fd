"""Assembling a stage's manifest.

Owns: assembling the manifest (kind and output-relevant options, inputs' results, code
files with blob ids, canonical arguments, data identity, third-party package versions); the
`Manifest` value and its fingerprint, a pure function of it (the xxh3-128 of its canonical
JSON), are `manifest.py`'s. Also owns the dirty-tree policy (warn, or fail under HFBUILD_STRICT=1).

Must never: put an absolute path, time, host, PID, object id or hash-order-dependent sequence
into a manifest, or import `datasets` (an up-to-date check must stay cheap).
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hfbuild.core.errors import (
    DirtyTreeError,
    DirtyTreeWarning,
    HfbuildError,
    IncompleteClosureWarning,
    MissingDataError,
    ObservationWarning,
)
from hfbuild.keys import argpaths
from hfbuild.keys import shards as sharding
from hfbuild.keys.manifest import Manifest
from hfbuild.source import caches, hub, hubcard, liveness
from hfbuild.source.closure import Context, describe
from hfbuild.source.datafiles import (
    StatCache,
    expand,
    file_identities,
    file_identity,
    resolve_data_files,
    uncommitted,
)
from hfbuild.source.distributions import runtime_packages
from hfbuild.source.envvars import env_part
from hfbuild.source.gitrepo import FileId, find_root
from hfbuild.source.gitstate import Snapshot
from hfbuild.store.paths import default_root
from hfbuild.store.store import Store

if TYPE_CHECKING:
    from hfbuild.keys.absentdata import LockedData

SCHEMA = 1

# Options of Dataset.map / Dataset.filter that can change the output, with their defaults, so
# that passing a default explicitly and leaving it out give the same fingerprint.
_OUTPUT_OPTIONS: dict[str, dict[str, Any]] = {
    "map": {
        "with_indices": False,
        "with_rank": False,
        "input_columns": None,
        "batched": False,
        "batch_size": 1000,
        "drop_last_batch": False,
        "remove_columns": None,
        "features": None,
        "disable_nullable": False,
        "try_original_type": True,
        "on_mixed_types": "use_json",
    },
    "filter": {
        "with_indices": False,
        "with_rank": False,
        "input_columns": None,
        "batched": False,
        "batch_size": 1000,
    },
}
# Options that cannot change the output: they stay out of the fingerprint.
NEUTRAL_OPTIONS = frozenset(
    {
        "num_proc",
        "desc",
        "writer_batch_size",
        "load_from_cache_file",
        "keep_in_memory",
        "cache_file_name",
        "cache_file_names",
        "suffix_template",
        "new_fingerprint",
        "sharded",  # how the result is built and stored; a sharded key is another shape
    }
)


def normalize_options(kind: str, options: Mapping[str, Any] | None, ctx: Context) -> Any:
    """The output-relevant options of a transform, defaults filled in, canonically encoded.
    Options hfbuild does not know are kept (they might change the output)."""
    opts = {k: v for k, v in (options or {}).items() if k not in NEUTRAL_OPTIONS}
    n = (options or {}).get("num_proc")
    many = isinstance(n, int) and not isinstance(n, bool) and n > 1
    if opts.get("with_rank"):
        # With `with_rank=True` the function sees its process's rank, so the number of
        # processes shapes the output. datasets runs one shard without a rank for None, 0
        # and 1 alike, so those are one value.
        opts["num_proc"] = n if many else 1
    elif opts.get("batched") and many:
        # datasets cuts a batched map's or filter's input into `num_proc` contiguous parts
        # and batches within each: which rows share a batch depends on it (issue #24).
        opts["num_proc"] = n
    defaults = _OUTPUT_OPTIONS.get(kind)
    if defaults is not None:
        opts = {**defaults, **opts}
        if not opts.get("batched"):
            opts.pop("batch_size", None)  # ignored unless batched
            opts.pop("drop_last_batch", None)
        for key in ("input_columns", "remove_columns"):
            if isinstance(opts.get(key), str):
                opts[key] = [opts[key]]
        if opts.get("remove_columns") is not None:
            opts["remove_columns"] = sorted(opts["remove_columns"])  # a set, in effect
    # Keys are option names (strings we control), so a plain JSON object stays injective.
    return {k: ctx.encode(v, f"options[{k!r}]") for k, v in sorted(opts.items())}


def file_dep_ids(
    paths: Iterable[str | os.PathLike[str]], snap: Snapshot, cache: StatCache
) -> list[list[str]]:
    """Files a stage's code reads by itself, identified like load stages' data files (globs
    allowed, relative to the project root)."""
    found = [
        f for p in paths for f in expand(os.fspath(p), snap.root, "file_deps", snap.code_cache)
    ]
    return sorted(file_identities(list(dict.fromkeys(found)), snap, cache))


def load_data(
    stage: str,
    options: Mapping[str, Any],
    ctx: Context,
    stat_cache: StatCache,
    absent: LockedData | None = None,
) -> tuple[dict[str, Any], Any, tuple[Mapping[str, str], ...]]:
    """A load stage's data part: (its manifest entry, the resolved files, the Hub revisions
    it pinned). The entry names the builder, each data file by path and content id, and the
    other load options; the files are returned so the build reads exactly those, never a
    glob expanded again later. Given `absent` (`hfbuild verify` without the data), patterns
    matching no file take the files the lock records under them, and no files are returned.
    Hub files (`hf://datasets/...`) are named and identified by `hub.resolve`, from the Hub's
    metadata: their content is never read here, so they need no `absent` stand-in."""
    opts = dict(options)
    builder = opts.pop("builder")
    opts.pop(sharding.OPTION, None)  # how it is stored, not what it loads
    snap = ctx.snapshot
    files: Any = None
    ids: Any
    pinned: tuple[Mapping[str, str], ...] = ()
    card = opts.pop(hubcard.CARD_COMMIT, None)  # what the card's configuration gave is keyed
    if hub.any_hub(opts["data_files"]):
        try:
            got = hub.resolve(opts.pop("data_files"), f"load stage {stage!r}")
        except hub.HubError as e:
            if str(e).startswith("load stage"):
                raise
            raise hub.HubError(f"load stage {stage!r}: {e}") from None
        moved = hubcard.card_commit_moved(got.pins, str(card)) if card else None
        if moved:
            raise hub.HubError(
                f"load stage {stage!r}: revision {moved.revision} of {moved.repo} moved to "
                f"{moved.commit[:12]} after the pipeline read its dataset card at "
                f"{card[:12]}: define the pipeline again (run the command again)."
            )
        files, ids, pinned = got.files, got.ids, tuple(hub.pins_json(got.pins))
    else:
        files, ids = _local_files(stage, options, opts, snap, stat_cache, absent)
    data = {
        "builder": builder,
        "files": ids,
        "options": ctx.encode(opts, f"stage {stage!r} load options"),
    }
    given = options["data_files"]
    if isinstance(given, Mapping):
        # datasets' DatasetDict keeps the order of `data_files`' splits, and an apply may
        # depend on it: an order other than sorted is part of what is loaded (a sorted one
        # adds nothing, so its fingerprint stays as it was).
        splits = [str(k) for k in given]
        if splits != sorted(splits):
            data["splits"] = splits
    return data, files, pinned


def _local_files(
    stage: str,
    options: Mapping[str, Any],
    opts: dict[str, Any],
    snap: Snapshot,
    stat_cache: StatCache,
    absent: LockedData | None,
) -> tuple[Any, Any]:
    """A load's local data files (`opts`' `data_files`, popped) and their identities."""
    files: Any = None
    ids: Any = None
    try:
        # Without the data (`absent`), a pattern matching nothing takes the lock's files.
        files = resolve_data_files(
            opts.pop("data_files"),
            snap.root,
            f"load stage {stage!r}",
            strict=absent is not None,
            memo=snap.code_cache,
        )
    except MissingDataError:
        if absent is None:
            raise
        ids = absent.files(
            stage,
            options["data_files"],
            snap.root,
            lambda f: file_identity(f, snap, stat_cache),
        )
    if isinstance(files, dict):
        ids = {s: file_identities(fs, snap, stat_cache) for s, fs in sorted(files.items())}
    elif files is not None:
        ids = file_identities(files, snap, stat_cache)
    return files, ids


def build_manifest(
    *,
    kind: str,
    ctx: Context,
    fn: Callable[..., Any] | None = None,
    fn_kwargs: Mapping[str, Any] | None = None,
    inputs: Any = None,
    options: Mapping[str, Any] | None = None,
    data: Any = None,
    file_deps: Sequence[str | os.PathLike[str]] = (),
    stat_cache: StatCache | None = None,
) -> Manifest:
    """The manifest of a stage. All files it reads are gathered in `ctx`; `stat_cache` spares
    re-hashing unchanged untracked file_deps (an in-memory one when not given)."""
    doc: dict[str, Any] = {"hfbuild": SCHEMA, "kind": kind, "inputs": inputs}
    doc["options"] = normalize_options(kind, options, ctx)
    args: dict[str, Any] = {}
    if fn is not None:
        desc = describe(fn, ctx, "fn")
        args.update(desc["args"])
        args["fn_kwargs"] = ctx.encode(dict(fn_kwargs or {}), "fn_kwargs")
        doc["code"] = {"target": desc["target"]}
    if file_deps:
        doc["file_deps"] = file_dep_ids(file_deps, ctx.snapshot, stat_cache or StatCache(None))
    if data is not None:
        doc["data"] = data
    doc["args"] = args
    if fn is not None:
        doc["code"]["files"] = sorted([f.path, f.id] for f in ctx.files.values())
        if ctx.external:
            doc["code"]["external"] = sorted([m, b] for m, b in ctx.external.items())
        env = env_part(ctx.env, ctx.snapshot.root)
        if env:  # absent when the code reads none, so such keys are unchanged
            doc["env"] = env
        if ctx.module_values:  # module-level values changed at run time (liveness.py)
            doc["code"]["module_values"] = sorted([k, v] for k, v in ctx.module_values.items())
    outside: list[str] = []
    named = _named_paths(doc, ctx, stat_cache or StatCache(None), outside)
    if named:  # absent when no argument names a project file, so such keys are unchanged
        doc["paths"] = named
    doc["packages"] = sorted(ctx.packages | runtime_packages())
    liveness.check_loaded(ctx)  # never file one code's result under another's key
    # Uncommitted data (and a file an argument names) is dirty like uncommitted code (the
    # same warning, strict error and status); git-ignored data is kept out of git on purpose
    # and is not.
    dirty = tuple(
        sorted(
            [
                *(f for f in ctx.files.values() if f.dirty),
                *uncommitted(
                    [*data_file_ids(doc).items(), *argpaths.named_files(doc)], ctx.snapshot
                ),
            ],
            key=lambda f: f.path,
        )
    )
    return Manifest(doc, dirty, tuple(ctx.incomplete), outside=tuple(outside))


def data_file_ids(doc: Mapping[str, Any]) -> dict[str, str]:
    """The data files a manifest document names (a load's `data.files`, a list or one per
    split, and `file_deps`), by name, with their ids."""
    files = (doc.get("data") or {}).get("files") if isinstance(doc.get("data"), Mapping) else None
    pairs = [f for split in files.values() for f in split] if isinstance(files, Mapping) else files
    out: dict[str, str] = {}
    for pair in [*(pairs or ()), *(doc.get("file_deps") or ())]:
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            out[str(pair[0])] = str(pair[1])
    return out


def _named_paths(
    doc: Mapping[str, Any], ctx: Context, cache: StatCache, outside: list[str]
) -> list[list[Any]]:
    """The `paths` part: the project files and directories that strings in the arguments and
    in the module values the closure reads name, with their content (argpaths.py); those
    naming a path outside the project are added to `outside`."""
    trees: list[tuple[str, Any]] = [(argpaths.ARGS, doc["args"])]
    for qual, entry in (doc.get("code") or {}).get("module_values") or []:
        trees.append((f"module value {qual}", entry.get("value")))
    for where, value in sorted(ctx.constants.items()):
        trees.append((where, ctx.encode(value, where)))
    root = ctx.snapshot.root
    return argpaths.paths_part(trees, ctx.snapshot, cache, [default_root(root)], outside)


def strict() -> bool:
    return os.environ.get("HFBUILD_STRICT", "").strip().lower() in {"1", "true", "yes", "on"}


def check_dirty(manifest: Manifest, what: str, *, strict_mode: bool | None = None) -> None:
    """Warn (or, in strict mode, fail) when a manifest includes uncommitted files, code or
    data alike; warn when a dynamic import left the closure incomplete, or an argument names
    a path outside the project."""
    for line in manifest.incomplete:
        warnings.warn(f"{what}: {line}", IncompleteClosureWarning, stacklevel=3)
    for line in manifest.outside:
        warnings.warn(f"{what}: {line}", ObservationWarning, stacklevel=3)
    if not manifest.dirty:
        return
    message = f"{what} {dirty_text(manifest.dirty)}"
    data = any(f.kind == "data" for f in manifest.dirty)
    if strict_mode if strict_mode is not None else strict():
        raise DirtyTreeError(
            f"{message}. Strict mode (HFBUILD_STRICT=1 or --strict) allows only committed "
            f"code{' and data' if data else ''}: commit or stash these files"
            f"{_IGNORE_HINT if data else ''}."
        )
    warnings.warn(
        f"{message}. Their working-tree content is in the fingerprint; commit them for "
        f"results every checkout can reuse{_IGNORE_HINT if data else ''}.",
        DirtyTreeWarning,
        stacklevel=3,
    )


_IGNORE_HINT = " (data kept out of git on purpose belongs in .gitignore)"


def dirty_text(files: Sequence[FileId]) -> str:
    """What is uncommitted in a stage's key, code and data named apart: `is defined by files
    with uncommitted changes: t.py (modified); reads data files that are not committed:
    data/a.parquet (untracked)`."""
    code = [f for f in files if f.kind == "code"]
    data = [f for f in files if f.kind == "data"]
    parts = []
    if code:
        listing = ", ".join(f"{f.path} ({f.status})" for f in code)
        if any(f.status == "norepo" for f in code):
            parts.append(
                f"is not in a git repository, so its files are identified by content: {listing}"
            )
        else:
            parts.append(f"is defined by files with uncommitted changes: {listing}")
    if data:
        listing = ", ".join(f"{f.path} ({f.status})" for f in data)
        if any(f.status == "norepo" for f in data):
            parts.append(f"reads data files outside any git repository: {listing}")
        else:
            parts.append(f"reads data files that are not committed: {listing}")
    return "; ".join(parts)


def snapshot_for(fn: Any) -> Snapshot:
    """The snapshot of the work tree that defines `fn` (or of the current directory)."""
    target = fn
    while True:
        if hasattr(target, "func"):  # functools.partial
            target = target.func
        elif isinstance(target, types.MethodType):
            target = target.__func__
        else:
            break
    code = getattr(target, "__code__", None)
    if code is None:
        code = getattr(type(target).__call__, "__code__", None) if callable(target) else None
    filename = getattr(code, "co_filename", None)
    if filename and os.path.isfile(filename) and find_root(filename) is not None:
        return Snapshot.for_path(filename)
    return Snapshot.for_path(os.getcwd())


def parent_fingerprint(parent: Any) -> Any:
    if parent is None or isinstance(parent, str):
        return parent
    fp = getattr(parent, "_fingerprint", None)
    if isinstance(fp, str):
        return fp
    if isinstance(parent, Mapping):
        return {str(k): parent_fingerprint(v) for k, v in parent.items()}
    raise TypeError(
        f"parent must be a Dataset, a fingerprint string or None, not {type(parent).__name__}"
    )


def fingerprint(
    fn: Callable[..., Any],
    fn_kwargs: Mapping[str, Any] | None = None,
    *,
    parent: Any = None,
    kind: str = "map",
    options: Mapping[str, Any] | None = None,
    file_deps: Sequence[str | os.PathLike[str]] = (),
    return_manifest: bool = False,
    **map_options: Any,
) -> Any:
    """The git-aware fingerprint of applying `fn(**fn_kwargs)` to `parent`.

    `parent` is a `Dataset` (its `_fingerprint` is used), a fingerprint string, or None.
    The `Dataset.map`/`filter` options are given as that call spells them (`batched=True`),
    or as a mapping in `options`; only those that change the output count, so
    `fingerprint(f, kw, parent=ds, batched=True)` is the key `hfbuild.map(ds, f, kw,
    batched=True)` uses. Returns the hex digest, or `(digest, Manifest)` with
    `return_manifest=True`.
    """
    if map_options:
        known = {*_OUTPUT_OPTIONS.get(kind, {}), *NEUTRAL_OPTIONS} - {"sharded"}
        unknown = sorted(set(map_options) - known)
        if unknown:
            raise HfbuildError(
                f"hfbuild.fingerprint: {', '.join(unknown)} is not an option of "
                f"Dataset.{kind} hfbuild knows; pass options={{...}} to key it anyway."
            )
        both = sorted(set(map_options) & set(options or {}))
        if both:
            raise HfbuildError(
                f"hfbuild.fingerprint: {', '.join(both)} given both as a keyword and in "
                f"options=: give it once."
            )
        options = {**(options or {}), **map_options}
    snap = snapshot_for(fn)
    if snap.repo is not None:  # the project's store remembers scans and stat data
        snap.code_cache = caches.for_store(Store(default_root(snap.root)))
    manifest = build_manifest(
        kind=kind,
        ctx=Context(snap),
        fn=fn,
        fn_kwargs=fn_kwargs,
        inputs={"parent": parent_fingerprint(parent)},
        options=options,
        file_deps=file_deps,
    )
    if snap.code_cache is not None:
        snap.code_cache.save()
    check_dirty(manifest, getattr(fn, "__qualname__", None) or type(fn).__qualname__)
    return (manifest.fingerprint, manifest) if return_manifest else manifest.fingerprint
