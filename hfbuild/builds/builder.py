"""Running one stage's transform with `datasets`, and writing its result into a build dir.

Owns: calling `load_dataset` / `Dataset.map` / `Dataset.filter` / an apply function with
datasets' cache files pointed into the build directory (so a published store entry is never
written to), and saving the result in the `save_to_disk` layout. When datasets already wrote
the result's Arrow files into the build directory (a map's output, a load's cache), they are
renamed into place instead of written a second time. A result that selects rows of an input
loaded from the store (a filter's) is written as indices over that input's entry
(`indexed.py`).

Must never: be imported by an up-to-date check, or write outside the build directory.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import datasets
from datasets.table import ConcatenationTable, MemoryMappedTable
from datasets.utils.py_utils import asdict  # the one save_to_disk uses (drops `id: None`)

from hfbuild.core.errors import BuildError, HfbuildError
from hfbuild.core.spec import StageSpec
from hfbuild.keys.inputid import form_digest
from hfbuild.source import hubcard, refs
from hfbuild.store import indexed
from hfbuild.store.content import dataset_hash, select_rows, table_hash
from hfbuild.store.paths import disk_full, tree_size

SCRATCH = "scratch"


class SaveInfo(NamedTuple):
    rows: Any  # int, or {split: int}
    content_hash: str
    written_bytes: int  # every byte the build wrote, scratch included
    indices: dict[str, Any] | None = None  # an indices entry's manifest part (indexed.py)
    form: str = ""  # what a consumer sees besides the rows (`form_of`, inputid.py)


def form_of(result: Any) -> str:
    """The digest of what a consumer loading `result` sees besides its rows (which the
    content hash covers, by Arrow type only): each split's features (a `ClassLabel`'s
    names, a `Value`'s dtype), its format, and a DatasetDict's splits in order. With the
    content hash it is the result's identity in its consumers' keys (`inputid.py`)."""

    def one(ds: Any) -> dict[str, Any]:
        return {"features": ds.features.to_dict(), "format": ds.format}

    if isinstance(result, datasets.DatasetDict):
        return form_digest({"dict": [[str(k), one(v)] for k, v in result.items()]})
    return form_digest({"dataset": one(result)})


@contextlib.contextmanager
def _no_global_cache() -> Iterator[None]:
    """Inside an apply function, datasets must not write cache files next to its inputs (they
    live in published store entries): caching goes to a temporary directory instead."""
    was = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if was:
            datasets.enable_caching()


def run_stage(
    spec: StageSpec,
    inputs: Sequence[Any],
    fp: str,
    build_dir: str,
    root: str,
    data_files: Any = None,
    *,
    scratch: str | None = None,
    tag: str = "",
) -> Any:
    """Run one stage; a load stage reads `data_files`, the files its fingerprint names.
    datasets writes its cache files in `scratch` (by default `scratch_dir(build_dir)`); a
    map's or filter's are named after `tag`, so several builds may share one scratch."""
    if scratch is None:
        scratch = scratch_dir(build_dir)
    if not os.path.isdir(scratch):  # a shared scratch is there after the stage's first shard
        os.makedirs(scratch, exist_ok=True)
    try:
        if spec.kind == "load":
            return _load(spec, data_files, scratch)
        if spec.kind in ("map", "filter"):
            return _map_or_filter(spec, inputs[0], fp, scratch, tag)
        with _no_global_cache():
            out = refs.function(spec)(*inputs, **spec.fn_kwargs)  # type: ignore[misc]
    except HfbuildError:
        raise
    except Exception as e:
        if disk_full(e) is not None:
            raise  # the disk, not the transform: the pipeline reports it
        raise BuildError(
            f"stage {spec.name!r} failed: {type(e).__name__}: {e}\n{_user_frames(e, root)}"
            f"Earlier stages stay cached and the store is unchanged; fix the transform and "
            f"run the build again."
        ) from e
    if not isinstance(out, (datasets.Dataset, datasets.DatasetDict)):
        raise BuildError(
            f"apply stage {spec.name!r}: {refs.qualname(spec) or spec.fn} returned "
            f"{type(out).__name__}; an apply function must return a Dataset or DatasetDict."
        )
    return out


def _user_frames(e: BaseException, root: str) -> str:
    """The traceback lines of `e` that are in the project's own files (not in datasets or
    hfbuild): where the user's transform failed."""
    import traceback

    frames = [
        f
        for f in traceback.extract_tb(e.__traceback__)
        if os.path.realpath(f.filename).startswith(os.path.realpath(root) + os.sep)
        and "site-packages" not in f.filename
    ]
    if not frames:
        return ""
    return "".join(traceback.format_list(frames))


def _load(spec: StageSpec, files: Any, scratch: str) -> Any:
    opts = dict(spec.options)
    builder = opts.pop("builder")
    opts.pop("data_files")
    opts.pop("sharded", None)
    opts.pop(hubcard.CARD_COMMIT, None)
    if isinstance(opts.get("features"), list):  # a Hub card's YAML, read as datasets reads it
        opts["features"] = datasets.Features._from_yaml_list(opts["features"])
    return datasets.load_dataset(
        builder, data_files=files, cache_dir=os.path.join(scratch, "hf"), **opts
    )


def refusal(spec: StageSpec, root: str, scratch: str) -> BaseException | None:
    """What plain `datasets` raises for load stage `spec` (its data-file patterns taken
    relative to the project root, as datasets takes them relative to the working directory
    the pipeline runs in), run with its cache in `scratch`; None when it loads. For a load
    whose patterns hfbuild resolves to no file: datasets' own error (which depends on the
    builder: a parquet load of no file raises ValueError, a json one StopIteration)."""

    def absolute(p: Any) -> Any:
        if isinstance(p, (str, os.PathLike)):
            text = os.fspath(p)
            return text if os.path.isabs(text) else os.path.join(root, text)
        if isinstance(p, dict):
            return {k: absolute(v) for k, v in p.items()}
        return [absolute(v) for v in p]

    files = absolute(spec.options["data_files"])
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        _load(spec, files, scratch)
    except Exception as e:
        return e
    finally:
        if was:
            datasets.enable_progress_bars()
    return None


def no_data(e: BaseException | None) -> bool:
    """Whether `e` is datasets refusing a split that received no rows."""
    return isinstance(e, ValueError) and "corresponds to no data" in str(e)


def empty(features: Any, split: str) -> Any:
    """A Dataset of no rows with `features`: a load shard of a file of no rows."""
    if isinstance(features, list):  # a Hub card's YAML (hubcard.card_config)
        features = datasets.Features._from_yaml_list(features)
    return datasets.Dataset.from_dict(
        {k: [] for k in features}, features=features, split=datasets.Split(split)
    )


def parquet_rows(path: str) -> int:
    """The rows of a parquet file from its footer (what datasets' parquet builder yields of
    it with no `filters=`), read by Arrow's own file: a Python one's reads call back."""
    from pyarrow import OSFile
    from pyarrow import parquet as pq

    with OSFile(path) as f:
        return int(pq.read_metadata(f).num_rows)


def _map_or_filter(spec: StageSpec, ds: Any, fp: str, scratch: str, tag: str) -> Any:
    options = dict(spec.options)
    options.pop("sharded", None)
    options.setdefault("load_from_cache_file", False)

    def one(d: Any, split: str | None) -> Any:
        suffix = f"-{split}" if split is not None else ""
        op = getattr(d, spec.kind)
        return op(
            refs.function(spec),
            fn_kwargs=dict(spec.fn_kwargs),
            new_fingerprint=(fp + suffix)[:64],
            cache_file_name=os.path.join(scratch, f"{tag}{spec.kind}{suffix}.arrow"),
            **options,
        )

    if isinstance(ds, datasets.DatasetDict):
        return datasets.DatasetDict({s: one(d, s) for s, d in ds.items()})
    return one(ds, None)


def offset_indices(spec: StageSpec, offset: int) -> StageSpec:
    """`spec` for one shard whose rows start at `offset` in the whole split: a
    `with_indices` function sees the indices it would see over the whole dataset."""
    no_fn = spec.fn is None and spec.ref is None
    if not spec.options.get("with_indices") or offset == 0 or no_fn:
        return spec
    fn = refs.function(spec)
    assert fn is not None
    cols = spec.options.get("input_columns")
    at = 1 if cols is None else (1 if isinstance(cols, str) else len(cols))
    batched = bool(spec.options.get("batched"))

    def shifted(*args: Any, **kwargs: Any) -> Any:
        a = list(args)
        a[at] = [i + offset for i in a[at]] if batched else a[at] + offset
        return fn(*a, **kwargs)

    return replace(spec, fn=shifted, ref=None)


# -- saving -------------------------------------------------------------------------------


def save(
    result: Any,
    dest: str,
    build_dir: str,
    sources: Sequence[indexed.Source] = (),
    scratch: str | None = None,
) -> SaveInfo:
    """Write `result` at `dest` and describe it. A selection of one of `sources` (the
    stage's inputs as loaded from the store, see `indexed.sources`) is written as its indices
    only (an indices entry over the input's base); anything else in the `save_to_disk`
    layout, with the content hash taken from what was written: flat, memory-mapped, in
    writer-sized chunks. Arrow files datasets wrote in `build_dir` or in `scratch` (the
    scratch `run_stage` was given, when not the build dir's own) are moved, not copied."""
    owned = [build_dir] + ([scratch] if scratch is not None else [])

    def written() -> int:
        return sum(tree_size(d) for d in owned)

    match = indexed.selection(result, sources) if sources else None
    if match is not None:
        as_dict = isinstance(result, datasets.DatasetDict)
        part = indexed.write(dest, match[0], match[1], as_dict, owned)
        rows_of: Any = {p.dir: len(p.ds) for p in match[1]} if as_dict else len(result)
        return SaveInfo(rows_of, dataset_hash(result), written(), part, form_of(result))
    if isinstance(result, datasets.DatasetDict):
        os.makedirs(dest)
        for split, ds in result.items():
            _save_dataset(ds, os.path.join(dest, split), owned)
        with open(os.path.join(dest, "dataset_dict.json"), "w", encoding="utf-8") as f:
            json.dump({"splits": list(result)}, f)
        rows: Any = {split: len(ds) for split, ds in result.items()}
    else:
        _save_dataset(result, dest, owned)
        rows = len(result)
    content = dataset_hash(_reload(dest))
    return SaveInfo(rows, content, written(), None, form_of(result))


class PartWriter:
    """Rows of one load's result (a Dataset without an indices mapping), a range at a time,
    each written in the `save_to_disk` layout as one Arrow stream with the result's schema
    (its features in its metadata, as datasets writes them), in record batches of datasets'
    batch size (a load's chunks, a file's rows each, joined: ~200 bytes a chunk), and
    described. Its `dataset_info.json` holds what describes any part of the load, not the
    whole load's splits, sizes and checksums (`save_to_disk` of a `select` copies them)."""

    NAME = "data-00000-of-00001.arrow"

    def __init__(self, ds: Any) -> None:
        if ds._indices is not None:
            raise ValueError("PartWriter: a dataset with an indices mapping")
        self._table = ds.data.table
        info = ds.info
        shard_info = asdict(
            datasets.DatasetInfo(
                features=info.features,
                builder_name=info.builder_name,
                dataset_name=info.dataset_name,
                config_name=info.config_name,
                version=info.version,
            )
        )
        self._info = json.dumps({k: shard_info[k] for k in sorted(shard_info)}, indent=2)
        self._split = str(ds.split) if ds.split is not None else None
        self._form = form_of(ds)  # a part's features and format are the whole result's

    def write(self, start: int, rows: int, dest: str, fingerprint: str) -> SaveInfo:
        """Rows `start` to `start + rows` written at `dest`, with the state `fingerprint`."""
        import pyarrow as pa

        part, step = self._table.slice(start, rows), datasets.config.DEFAULT_MAX_BATCH_SIZE
        os.makedirs(dest)
        path = os.path.join(dest, self.NAME)
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
            for at in range(0, rows, step):
                writer.write_table(part.slice(at, step).combine_chunks())
        state: dict[str, Any] = {
            "_fingerprint": fingerprint,
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": self._split,
            "_data_files": [{"filename": self.NAME}],
        }
        with open(os.path.join(dest, "state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        with open(os.path.join(dest, "dataset_info.json"), "w", encoding="utf-8") as f:
            f.write(self._info)
        # The hash of what was written, as `save` takes it, read as datasets maps it.
        with pa.memory_map(path) as source:
            written = pa.ipc.open_stream(source).read_all()
        return SaveInfo(rows, table_hash(written), tree_size(dest), None, self._form)


def _reload(dest: str) -> Any:
    """What was written at `dest`, memory-mapped. A Dataset's Arrow files are mapped
    directly, as `load_from_disk` maps them (its thread pool costs more than the mapping
    for a small shard); a DatasetDict goes through `load_from_disk`."""
    state = os.path.join(dest, "state.json")
    if not os.path.exists(state):
        return datasets.load_from_disk(dest, keep_in_memory=False)
    with open(state, encoding="utf-8") as f:
        doc = json.load(f)
    names = [d["filename"] for d in doc["_data_files"]]
    tables = [MemoryMappedTable.from_file(os.path.join(dest, n)) for n in names]
    table = datasets.table.concat_tables(tables) if len(tables) > 1 else tables[0]
    # With the state's fingerprint, as `load_from_disk` gives it: without one, datasets
    # would hash the table's whole state to make one, the dearest part for a small shard.
    return datasets.Dataset(table, fingerprint=doc.get("_fingerprint"))


def _in_place_files(ds: Any, owned: Sequence[str]) -> list[str] | None:
    """The Arrow files holding exactly `ds`'s rows, when they are all in the `owned`
    directories (the build's) and nothing (an indices mapping, a pending cast or rename)
    separates them from `ds`."""
    if ds._indices is not None:
        return None
    table = ds._data
    if isinstance(table, ConcatenationTable):
        if any(len(row) != 1 for row in table.blocks):
            return None
        blocks = [row[0] for row in table.blocks]
    else:
        blocks = [table]
    paths = []
    prefixes = tuple(os.path.realpath(d) + os.sep for d in owned)
    for b in blocks:
        # Replacing schema metadata is the one pending operation that leaves the data as the
        # file has it (the features are written to dataset_info.json anyway).
        if not isinstance(b, MemoryMappedTable) or any(
            op[0] != "replace_schema_metadata" for op in b.replays
        ):
            return None
        p = os.path.realpath(b.path)
        if not p.startswith(prefixes) or p in paths:
            return None
        paths.append(p)
    if sum(b.num_rows for b in blocks) != len(ds) or ds.data.schema != blocks[0].schema:
        return None
    return paths


def _save_dataset(ds: Any, dest: str, owned: Sequence[str]) -> None:
    if ds._indices is not None:
        _save_selected(ds, dest)
        return
    files = _in_place_files(ds, owned)
    if files is None and len(ds) == 0:
        _save_empty(ds, dest)
        return
    if files is None:
        ds.save_to_disk(dest)
        return
    os.makedirs(dest)
    n = len(files)
    names = [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
    for src, name in zip(files, names, strict=True):
        os.rename(src, os.path.join(dest, name))
    _write_state(ds, dest, names)


def _save_empty(ds: Any, dest: str) -> None:
    """A dataset without rows, as one Arrow stream holding only its schema (its features in
    the schema's metadata, as datasets writes them). `save_to_disk` writes no data file at
    all for a table without record batches (a `map` over a filter that kept nothing returns
    such a slice of its input), and `load_from_disk` then fails on it. Not datasets'
    `ArrowWriter`: it refuses a schema without columns (all of them removed)."""
    import pyarrow as pa

    os.makedirs(dest)
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(os.path.join(dest, name), "wb") as sink:
        pa.ipc.new_stream(sink, ds.features.arrow_schema).close()
    _write_state(ds, dest, [name])


# Rows selected from the input table at a time: bounds the memory a selection's write needs.
# Any smaller one too: save_to_disk's lookups cost more (8,600 rows: 16 ms, ours 1.4 ms).
_TAKE_ROWS = 65_536


def _save_selected(ds: Any, dest: str) -> None:
    """`ds.save_to_disk(dest)` for a dataset behind an indices mapping (a filter's, select's,
    shuffle's or split's result): the same shards, record batches, schema, embedded files and
    JSON files (only buffer padding may differ), but with a few large Arrow `take`s instead of
    one indices lookup per writer batch, which is what makes save_to_disk slow there."""
    from datasets import config
    from datasets.arrow_writer import ArrowWriter, get_writer_batch_size_from_data_size
    from datasets.utils.py_utils import convert_file_size_to_int

    n_rows = len(ds)
    if n_rows == 0:
        _save_empty(ds, dest)  # nothing to select
        return
    nbytes = ds._estimate_nbytes()
    # Dataset.save_to_disk's shard count and batch size, for the same layout.
    num_shards = int(nbytes / convert_file_size_to_int(config.MAX_SHARD_SIZE)) + 1
    num_shards = min(len(ds.data), num_shards)
    batch = config.DEFAULT_MAX_BATCH_SIZE
    if nbytes > 0:
        batch = min(batch, get_writer_batch_size_from_data_size(n_rows, nbytes))
    # Whole record batches per selection, so batches start where save_to_disk's start.
    step = batch * max(1, _TAKE_ROWS // batch)
    table = ds._data.table
    indices = ds._indices.column(0)
    os.makedirs(dest)
    names = [f"data-{i:05d}-of-{num_shards:05d}.arrow" for i in range(num_shards)]
    div, mod = divmod(n_rows, num_shards)
    start = 0
    for i, name in enumerate(names):
        end = start + div + (1 if i < mod else 0)  # Dataset.shard(contiguous=True)'s bounds
        writer = ArrowWriter(
            features=ds.features, path=os.path.join(dest, name), embed_local_files=True
        )
        try:
            for lo in range(start, end, step):
                part = select_rows(table, indices.slice(lo, min(step, end - lo)).to_numpy())
                writer.write_table(part, batch)
            writer.finalize()
        finally:
            writer.close()
        start = end
    _write_state(ds, dest, names)


def _write_state(ds: Any, dest: str, names: list[str]) -> None:
    """The two JSON files exactly as Dataset.save_to_disk writes them."""
    state = {
        key: ds.__dict__[key]
        for key in [
            "_fingerprint",
            "_format_columns",
            "_format_kwargs",
            "_format_type",
            "_output_all_columns",
        ]
    }
    state["_split"] = str(ds.split) if ds.split is not None else None
    state["_data_files"] = [{"filename": name} for name in names]
    with open(os.path.join(dest, "state.json"), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    info = asdict(ds._info)
    with open(os.path.join(dest, "dataset_info.json"), "w", encoding="utf-8") as f:
        json.dump({k: info[k] for k in sorted(info)}, f, indent=2)


def scratch_dir(build_dir: str) -> str:
    """Where `run_stage` lets datasets write its cache files in `build_dir`: what is left
    there once the result is saved is not part of the entry."""
    return os.path.join(build_dir, SCRATCH)
