"""Property tests: the encoder over every supported type, and random edit/build histories."""

from __future__ import annotations

import copy
import dataclasses
import enum
import importlib
import pathlib
import subprocess
import sys
import tempfile
import typing
import warnings
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hfbuild
from hfbuild.builds.stage import build
from hfbuild.core.canonical import dumps, encode
from tests.helpers import Repo, same


class Mode(enum.Enum):
    FAST = 1
    SLOW = 2


class Size(enum.IntEnum):
    SMALL = 1
    LARGE = 2


@dataclasses.dataclass(frozen=True)
class Cfg:
    k: Any
    name: str


class Pair(typing.NamedTuple):
    a: Any
    b: Any


leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=6)
    | st.binary(max_size=70)
    | st.sampled_from(list(Mode) + list(Size))
    | st.builds(pathlib.PurePosixPath, st.text("ab/", min_size=1, max_size=5))
    | st.integers(-5, 5).map(np.int32)
    | st.floats(width=32, allow_nan=False).map(np.float32)
    | st.lists(st.integers(-3, 3), max_size=6).map(lambda v: np.array(v, dtype=np.int64))
    | st.lists(st.floats(allow_nan=False), max_size=4).map(lambda v: np.array(v, dtype=np.float64))
)
keys = st.none() | st.booleans() | st.integers() | st.text(max_size=4) | st.sampled_from(list(Mode))
values = st.recursive(
    leaves,
    lambda c: (
        st.lists(c, max_size=3)
        | st.tuples(c, c)
        | st.dictionaries(keys, c, max_size=3)
        | st.frozensets(keys, max_size=3)
        | st.builds(Cfg, c, st.text(max_size=3))
        | st.builds(Pair, c, c)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_rich_values_encode_like_their_copies(x: Any) -> None:
    """Every supported type encodes identically to a deep copy of itself."""
    assert dumps(encode(x)) == dumps(encode(copy.deepcopy(x)))


@settings(max_examples=400, deadline=None)
@given(values, values)
def test_rich_values_encode_injectively(a: Any, b: Any) -> None:
    """Nested values of every supported type encode equal iff they are the same value."""
    assert (dumps(encode(a)) == dumps(encode(b))) == same(a, b)


# -- histories of edits, commits, reverts and builds -----------------------------------------

HELPERS = ["K = 1\n", "K = 2\n", "K = 2  # same value, other bytes\n"]
STEP = st.one_of(
    st.tuples(st.just("edit"), st.integers(0, len(HELPERS) - 1)),
    st.tuples(st.just("arg"), st.integers(1, 2)),
    st.tuples(st.just("commit"), st.just(0)),
    st.tuples(st.just("revert"), st.just(0)),
    st.tuples(st.just("build"), st.just(0)),
)


def _project() -> tuple[Repo, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = pathlib.Path(tempfile.mkdtemp(prefix="hfbuild-fuzz-"))
    name = root.name.replace("-", "_")
    repo = Repo.init(root / "repo")
    repo.write(
        {
            f"{name}/__init__.py": "",
            f"{name}/helper.py": HELPERS[0],
            f"{name}/transforms.py": f"from {name}.helper import K\n\n"
            "def f(batch, a=1):\n"
            "    return {'y': [x * a for x in batch['x']]}\n",
        }
    )
    (repo.path / "data").mkdir()
    pq.write_table(pa.table({"x": [1, 2, 3]}), repo.path / "data" / "x.parquet")
    repo.commit("start")
    sys.path.insert(0, str(repo.path))
    importlib.invalidate_caches()
    return repo, importlib.import_module(f"{name}.transforms")


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(STEP, min_size=1, max_size=8))
def test_reuse_iff_inputs_are_byte_identical(steps: list[tuple[str, int]]) -> None:
    """Across any history of edits, commits, reverts and builds, a build reuses the stored
    result exactly when the helper's bytes, the argument and the data are what they were at
    some earlier build, whatever was committed in between. (This process reloads what it
    edits, as a session must: it would otherwise run code its files no longer hold.)"""
    # No bytecode cache: a same-size edit within the second would reload the stale pyc.
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    repo, mod = _project()
    helper = next((repo.path).glob("*/helper.py"))
    committed = HELPERS[0]
    text, arg = HELPERS[0], 1
    built: set[tuple[str, int]] = set()

    def reload() -> Any:
        importlib.reload(sys.modules[mod.__name__.rsplit(".", 1)[0] + ".helper"])
        return importlib.reload(mod)

    try:
        for action, value in [*steps, ("build", 0)]:
            if action == "edit":
                text = HELPERS[value]
                helper.write_text(text)
                mod = reload()
            elif action == "arg":
                arg = value
            elif action == "commit":
                repo.commit("step")
                committed = text
            elif action == "revert":
                subprocess.run(
                    ["git", "checkout", "HEAD", "--", str(helper)], cwd=repo.path, check=True
                )
                text = committed
                mod = reload()
            else:
                pipe = hfbuild.Pipeline(root=repo.path, store=repo.path / ".store")
                raw = pipe.load("raw", "parquet", data_files="data/x.parquet", split="train")
                pipe.map("feat", raw, mod.f, {"a": arg}, batched=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    build(pipe, "raw", record=False)
                    report = build(pipe, "feat", record=False)
                assert (report.action == "up to date") == ((text, arg) in built), (steps, report)
                built.add((text, arg))
    finally:
        sys.dont_write_bytecode = writes_bytecode
        sys.path.remove(str(repo.path))
