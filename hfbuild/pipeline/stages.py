"""Defining a pipeline's stages and looking them up.

Owns: `Stage`, a handle on one stage (passed as another stage's input), and `StageTable`, the
part of a `Pipeline` that defines its stages (`load`, `map`, `filter`, `apply`, `define`: a
name checked, inputs defined above it, a function or its `module:qualname` reference checked)
and looks them up by name, in the order they were defined (`stages`, read only).

Must never: compute a key, read the store or build (a `Stage` asks its pipeline for those).
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from hfbuild.core.errors import StageError
from hfbuild.core.spec import LOAD_BUILDERS, StageSpec
from hfbuild.source import hub, hubcard, refs

if TYPE_CHECKING:
    from hfbuild.keys.manifest import Manifest
    from hfbuild.keys.manifests import Manifests

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# datasets' packaged builder per data file extension (`_EXTENSION_TO_MODULE`, those hfbuild
# loads).
_EXTENSIONS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".arrow": "arrow",
}


def _builder_of(data_files: Any) -> str | None:
    """The one builder every pattern's extension names, or None."""
    pats = (
        [p for v in data_files.values() for p in ([v] if isinstance(v, str) else v)]
        if isinstance(data_files, Mapping)
        else [data_files]
        if isinstance(data_files, str)
        else list(data_files)
    )
    found = {_EXTENSIONS.get(os.path.splitext(str(p))[1].lower()) for p in pats}
    return found.pop() if len(found) == 1 else None


class _Keyed(Protocol):
    """What a `Stage` asks of the pipeline it belongs to (`pipeline.Pipeline`)."""

    _specs: dict[str, StageSpec]
    stages: Mapping[str, StageSpec]

    def manifests(self, *, fresh: bool = False) -> Manifests: ...

    def result(self, name: str) -> Any: ...

    def define(self, spec: StageSpec) -> Stage: ...

    def _input(self, x: Stage | str, stage: str) -> str: ...

    def load(
        self,
        name: str,
        builder: str,
        /,
        *,
        doc: str | None = None,
        revision: str | None = None,
        **load_kwargs: Any,
    ) -> Stage: ...

    def _hub_load(
        self, name: str, repo: str, revision: str, doc: str | None, kwargs: dict[str, Any]
    ) -> Stage: ...

    def _transform(
        self: _Keyed,
        kind: str,
        name: str,
        input: Stage | str,
        fn: Callable[..., Any] | str,
        fn_kwargs: Mapping[str, Any] | None,
        file_deps: Sequence[str],
        doc: str | None,
        options: dict[str, Any],
    ) -> Stage: ...


class Stage:
    """A handle on one stage of a pipeline; pass it as another stage's input."""

    def __init__(self, pipeline: _Keyed, name: str) -> None:
        self.pipeline = pipeline
        self.name = name

    @property
    def spec(self) -> StageSpec:
        return self.pipeline.stages[self.name]

    @property
    def fingerprint(self) -> str:
        """The current fingerprint, computed from the work tree; nothing is built."""
        return self.pipeline.manifests(fresh=True)[self.name].fingerprint

    @property
    def manifest(self) -> Manifest:
        return self.pipeline.manifests(fresh=True)[self.name]

    def result(self) -> Any:
        return self.pipeline.result(self.name)

    def __repr__(self) -> str:
        return f"<hfbuild stage {self.name!r} ({self.spec.kind})>"


def _fn_or_ref(fn: Callable[..., Any] | str, stage: str) -> tuple[Any, str | None]:
    """(function, None) for a function, (None, reference) for a `module:qualname` string."""
    if isinstance(fn, str):
        return None, refs.check(fn, stage)
    return fn, None


class StageTable:
    """A pipeline's stages, by name, in the order they were defined."""

    def __init__(self) -> None:
        self._specs: dict[str, StageSpec] = {}
        self.stages: Mapping[str, StageSpec] = types.MappingProxyType(self._specs)

    def define(self: _Keyed, spec: StageSpec) -> Stage:
        """Add a stage as `spec` describes it (what `load`, `map`, `filter` and `apply` make)."""
        if not isinstance(spec.name, str) or not _NAME.match(spec.name):
            raise StageError(
                f"stage name {spec.name!r} is not valid: use letters, digits, '_' and '-', "
                f"starting with a letter or '_' (like a Python identifier)."
            )
        if spec.name in self._specs:
            raise StageError(
                f"stage {spec.name!r} is defined twice in this pipeline: give each stage its "
                f"own name."
            )
        for dep in spec.inputs:
            if dep not in self._specs:
                raise StageError(
                    f"stage {spec.name!r}: input {dep!r} is not a stage defined above it"
                )
        if spec.fn is not None and not callable(spec.fn):
            raise StageError(f"stage {spec.name!r}: {spec.fn!r} is not callable")
        self._specs[spec.name] = spec
        return Stage(self, spec.name)

    def _input(self: _Keyed, x: Stage | str, stage: str) -> str:
        if isinstance(x, Stage):
            if x.pipeline is not self:
                raise StageError(f"stage {stage!r}: input {x.name!r} belongs to another pipeline")
            return x.name
        if isinstance(x, str):
            return x
        raise StageError(f"stage {stage!r}: an input must be a stage or a stage name, not {x!r}")

    def load(
        self: _Keyed,
        name: str,
        builder: str,
        /,
        *,
        doc: str | None = None,
        revision: str | None = None,
        **load_kwargs: Any,
    ) -> Stage:
        """A stage loading data files with a `datasets` packaged builder (parquet, csv, json,
        text, arrow). `data_files` is a path or glob, a list of them, or a split dict; relative
        paths are relative to the git root; `hf://datasets/org/name@revision/...` patterns
        name files of a dataset on the Hugging Face Hub (hub.py). `builder` may instead be a
        Hub dataset, `"org/name"`, with `revision=` (default "main") and `data_files`
        relative to the repository: the builder is then the one its patterns' extension
        names (or `builder=`). The stage's name and the builder are positional, so `name=`
        is datasets' configuration name."""
        if builder not in LOAD_BUILDERS and builder.count("/") == 1:
            return self._hub_load(name, builder, revision or "main", doc, load_kwargs)
        if revision is not None:
            raise StageError(
                f"load stage {name!r}: revision= is for a Hub dataset (`pipe.load(name, "
                f"'org/name', revision=...)`); in hf:// paths write it as org/name@revision."
            )
        if builder not in LOAD_BUILDERS:
            raise StageError(
                f"load stage {name!r}: builder {builder!r} is not one of "
                f"{', '.join(sorted(LOAD_BUILDERS))}. Use an apply stage for anything else."
            )
        if "data_files" not in load_kwargs:
            raise StageError(f"load stage {name!r}: data_files= is required")
        return self.define(
            StageSpec(name, "load", options={"builder": builder, **load_kwargs}, doc=doc)
        )

    def _hub_load(
        self: _Keyed, name: str, repo: str, revision: str, doc: str | None, kwargs: dict[str, Any]
    ) -> Stage:
        """`pipe.load(name, "org/name", ...)`: a load of `hf://` patterns in that dataset,
        with the configuration of its dataset card that `datasets.load_dataset(repo, name,
        revision=...)` uses (hubcard.card_config): its data files (unless data_files= replaces
        them), builder keyword arguments and features, under the user's own arguments. The
        card is read at the commit the revision resolves to now; the key checks it still
        does (hubcard.CARD_COMMIT)."""
        config = kwargs.pop("name", None)
        given = kwargs.get("data_files")
        commit, card = hubcard.card_config(
            repo, revision, config, given is not None, f"load stage {name!r}"
        )
        if card is not None:
            if given is None:
                kwargs["data_files"] = card.data_files
            if card.features is not None:
                kwargs.setdefault("features", card.features)
            kwargs = {**card.kwargs, **kwargs, hubcard.CARD_COMMIT: commit}
            if "builder" not in kwargs:
                kwargs["builder"] = _builder_of(
                    hub.repo_pattern(repo, revision, given if given is not None else card.first)
                )
        if kwargs.get("data_files") is None:
            raise StageError(
                f"load stage {name!r}: data_files= is required for a Hub dataset whose card "
                f"declares no configs (patterns relative to the repository, e.g. "
                f"'data/*.parquet')."
            )
        data_files = hub.repo_pattern(repo, revision, kwargs.pop("data_files"))
        builder = kwargs.pop("builder", None) or _builder_of(data_files)
        if builder is None:
            raise StageError(
                f"load stage {name!r}: no builder follows from the data_files' extensions; "
                f"pass builder= (one of {', '.join(sorted(LOAD_BUILDERS))})."
            )
        return self.load(name, builder, doc=doc, data_files=data_files, **kwargs)

    def map(
        self: _Keyed,
        name: str,
        input: Stage | str,
        fn: Callable[..., Any] | str,
        fn_kwargs: Mapping[str, Any] | None = None,
        *,
        file_deps: Sequence[str] = (),
        doc: str | None = None,
        **options: Any,
    ) -> Stage:
        """`Dataset.map(fn, fn_kwargs=..., **options)` as a stage. `fn` is the function, or a
        `"module:qualname"` reference to it, imported only when the stage is fingerprinted
        afresh or built (so an up-to-date check can skip the module's import)."""
        return self._transform("map", name, input, fn, fn_kwargs, file_deps, doc, options)

    def filter(
        self: _Keyed,
        name: str,
        input: Stage | str,
        fn: Callable[..., Any] | str,
        fn_kwargs: Mapping[str, Any] | None = None,
        *,
        file_deps: Sequence[str] = (),
        doc: str | None = None,
        **options: Any,
    ) -> Stage:
        """`Dataset.filter(fn, fn_kwargs=..., **options)` as a stage; `fn` as for `map`."""
        return self._transform("filter", name, input, fn, fn_kwargs, file_deps, doc, options)

    def apply(
        self: _Keyed,
        name: str,
        inputs: Stage | str | Sequence[Stage | str],
        fn: Callable[..., Any] | str,
        fn_kwargs: Mapping[str, Any] | None = None,
        *,
        file_deps: Sequence[str] = (),
        doc: str | None = None,
    ) -> Stage:
        """`fn(*input_datasets, **fn_kwargs) -> Dataset | DatasetDict` as a stage: splits,
        shuffles, concatenations, joins, anything. `fn` may be a `"module:qualname"` reference,
        as for `map`."""
        many = [inputs] if isinstance(inputs, (Stage, str)) else list(inputs)
        deps = tuple(self._input(x, name) for x in many)
        fn_, ref = _fn_or_ref(fn, name)
        return self.define(
            StageSpec(
                name, "apply", deps, fn_, dict(fn_kwargs or {}), {}, tuple(file_deps), doc, ref
            )
        )

    def _transform(
        self: _Keyed,
        kind: str,
        name: str,
        input: Stage | str,
        fn: Callable[..., Any] | str,
        fn_kwargs: Mapping[str, Any] | None,
        file_deps: Sequence[str],
        doc: str | None,
        options: dict[str, Any],
    ) -> Stage:
        for bad in ("new_fingerprint", "cache_file_name", "function", "fn_kwargs"):
            if bad in options:
                raise StageError(f"{kind} stage {name!r}: hfbuild sets {bad} itself; drop it.")
        fn_, ref = _fn_or_ref(fn, name)
        spec = StageSpec(
            name,
            kind,
            (self._input(input, name),),
            fn_,
            dict(fn_kwargs or {}),
            options,
            tuple(file_deps),
            doc,
            ref,
        )
        return self.define(spec)

    def __getitem__(self: _Keyed, name: str) -> Stage:
        if name not in self._specs:
            known = ", ".join(self._specs) or "none"
            raise StageError(f"no stage named {name!r} (stages: {known})")
        return Stage(self, name)

    def __iter__(self: _Keyed) -> Iterator[Stage]:
        return (Stage(self, n) for n in self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def specs(self) -> list[StageSpec]:
        return list(self._specs.values())
