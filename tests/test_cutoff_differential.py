"""Early cutoff is never wrong (issue #19): over random edit sequences on a 4-stage pipeline
(load -> map -> filter -> map), every state's served results equal a build from scratch.

Each Hypothesis example is a real git repository with the three transforms in modules of
their own (`pkg/a.py`, `pkg/b.py`, `pkg/c.py`), each written from a small library of
variants: some compute the same output with other code (a refactor), some another output
(a real change); 1 to 3 parquet files (several files: a sharded chain when the stages are
row-local). An edit is a comment added to a module, a refactor, a real change, a data edit
whose first map's output is the same (a value moved by 7: the map keys it modulo 7) or not,
or a file appended. Every state is committed, built incrementally in one store (where
earlier states' entries and cutoffs are), built cold in a fresh store, and both are read
back with `pipe.result()`: for every stage the kind, splits, features and rows must be equal.
Each build and read is a process of its own, forked from a server that imported `datasets`
and `hfbuild` once (tests/forkserver.py, as tests/test_differential.py does).

Switches: `HFBUILD_CUTOFF_EXAMPLES` (default 6, what `make test` runs) and
`HFBUILD_FUZZ_SEED` (default 19: `make test` never depends on the draw).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st

from tests.helpers import Repo, offline_env, same
from tests.test_differential import Server

SEED = int(os.environ.get("HFBUILD_FUZZ_SEED") or 19)
EXAMPLES = int(os.environ.get("HFBUILD_CUTOFF_EXAMPLES", "6"))

# module -> variants: (function body over a value `v`, the output it stands for). Variants
# with the same output are refactors of each other; others are real changes.
VARIANTS: dict[str, list[tuple[str, str]]] = {
    "a": [("(v % 7) * 2", "mod7x2"), ("(v % 7) + (v % 7)", "mod7x2"), ("(v % 7) * 3", "mod7x3")],
    "b": [("v % 3 != 0", "not3"), ("not (v % 3 == 0)", "not3"), ("v % 4 != 0", "not4")],
    "c": [("v // 5", "div5"), ("(v - v % 5) // 5", "div5"), ("v // 4", "div4")],
}
KIND = {"a": ("map", "x", "y"), "b": ("filter", "y", None), "c": ("map", "y", "z")}


@dataclasses.dataclass(frozen=True)
class State:
    variants: tuple[int, int, int]  # per module a, b, c
    comments: tuple[int, int, int]  # comment lines at the top of each module
    files: tuple[tuple[int, ...], ...]  # each data file's x values


def module(name: str, variant: int, comments: int, batched: bool) -> str:
    body = VARIANTS[name][variant][0]
    kind, col, out = KIND[name]
    head = "".join(f"# comment {i}: it changes nothing\n" for i in range(comments))
    if kind == "map":
        expr = (
            f"[{body} for v in batch[{col!r}]]" if batched else body.replace("v", f"row[{col!r}]")
        )
        arg = "batch" if batched else "row"
        return f"{head}def fn({arg}):\n    return {{{out!r}: {expr}}}\n"
    if batched:
        return f"{head}def fn(batch):\n    return [{body} for v in batch[{col!r}]]\n"
    return f"{head}def fn(row):\n    v = row[{col!r}]\n    return {body}\n"


def dodo(batched: tuple[bool, bool, bool]) -> str:
    lines = [
        "from hfbuild import Pipeline",
        "from pkg import a, b, c",
        "",
        "pipe = Pipeline()",
        "raw = pipe.load('raw', 'parquet', data_files='data/*.parquet', split='train')",
        f"sa = pipe.map('sa', raw, a.fn, batched={batched[0]}, remove_columns=['x'])",
        f"sb = pipe.filter('sb', sa, b.fn, batched={batched[1]})",
        f"sc = pipe.map('sc', sb, c.fn, batched={batched[2]})",
        "",
        "",
        "def task_preprocess():",
        "    yield from pipe.tasks()",
        "",
    ]
    return "\n".join(lines)


values = st.integers(0, 60)
file_rows = st.lists(values, min_size=1, max_size=8).map(tuple)


@st.composite
def edit(draw: st.DrawFn, s: State) -> tuple[str, State]:
    what = draw(st.sampled_from(["comment", "refactor", "real", "data same", "data", "append"]))
    i = draw(st.integers(0, 2))
    name = "abc"[i]
    if what in ("comment", "refactor", "real"):
        variants, comments = list(s.variants), list(s.comments)
        if what == "comment":
            comments[i] += 1
        else:
            same_out = VARIANTS[name][s.variants[i]][1]
            choices = [
                j
                for j, (_, out) in enumerate(VARIANTS[name])
                if j != s.variants[i] and (out == same_out) == (what == "refactor")
            ]
            if not choices:
                return f"{what} {name}: nothing to do", s
            variants[i] = draw(st.sampled_from(choices))
        return f"{what} {name}.py", dataclasses.replace(
            s,
            variants=(variants[0], variants[1], variants[2]),
            comments=tuple(comments),  # type: ignore[arg-type]
        )
    files = [list(f) for f in s.files]
    if what == "append":
        files.append(list(draw(file_rows)))
        return "append a file", dataclasses.replace(s, files=tuple(tuple(f) for f in files))
    f = draw(st.integers(0, len(files) - 1))
    r = draw(st.integers(0, len(files[f]) - 1))
    files[f][r] += 7 if what == "data same" else 1  # a's output is the same after +7
    desc = f"{what}: file {f} row {r}"
    return desc, dataclasses.replace(s, files=tuple(tuple(x) for x in files))


@st.composite
def histories(draw: st.DrawFn) -> tuple[tuple[bool, bool, bool], list[tuple[str, State]]]:
    batched = (draw(st.booleans()), draw(st.booleans()), draw(st.booleans()))
    files = tuple(draw(st.lists(file_rows, min_size=1, max_size=3)))
    states = [("initial", State((0, 0, 0), (0, 0, 0), files))]
    for _ in range(draw(st.integers(1, 4))):
        states.append(draw(edit(states[-1][1])))
    return batched, states


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("cutoffhome")
    outside = {k: v for k, v in os.environ.items() if not k.startswith(("HFBUILD_", "HF_"))}
    env = {**outside, **offline_env(home), "HFBUILD_NO_REMOTE": "1"}
    env.pop("PYTHONHASHSEED", None)
    hf = Server(env, plain=False)
    yield hf
    hf.close()


def write_state(repo: Repo, s: State, batched: tuple[bool, bool, bool]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i, name in enumerate("abc"):
        text = module(name, s.variants[i], s.comments[i], batched[i])
        (repo.path / "pkg" / f"{name}.py").write_text(text)
    for n, xs in enumerate(s.files):
        path = repo.path / "data" / f"part-{n}.parquet"
        pq.write_table(pa.table({"x": pa.array(xs, pa.int64())}), path)


def built(server: Server, repo: Repo, store: pathlib.Path, out: pathlib.Path) -> Any:
    env = {"HFBUILD_STORE": str(store)}
    rc, _ = server.run("build", repo.path, out.with_suffix(".build"), env=env)
    log = server.log(out.with_suffix(".build"))
    assert rc == 0, f"hfbuild build failed:\n{log}"
    rc, got = server.run(
        "results", repo.path, out, env=env, arg={"stages": ["raw", "sa", "sb", "sc"]}
    )
    assert rc == 0 and got is not None, f"reading results failed:\n{server.log(out)}"
    return got, log


@seed(SEED)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
@given(histories())
def test_every_state_serves_what_a_build_from_scratch_serves(
    server: Server, history: tuple[tuple[bool, bool, bool], list[tuple[str, State]]]
) -> None:
    """State after state of comments, refactors, real changes and data edits, what the
    incremental store serves (with its cutoffs) equals what a cold build in a fresh store
    serves, stage by stage."""
    batched, states = history
    note(f"batched: {batched}; replay with HFBUILD_FUZZ_SEED={SEED}")
    work = pathlib.Path(tempfile.mkdtemp(prefix="cutofftest-"))
    try:
        repo = Repo.init(work / "repo")
        repo.write({"pkg/__init__.py": "", "dodo.py": dodo(batched)})
        (repo.path / "data").mkdir()
        for step, (desc, s) in enumerate(states):
            note(f"state {step}: {desc}: {s}")
            write_state(repo, s, batched)
            repo.commit(desc)
            got, log = built(server, repo, work / "store", work / f"inc-{step}.pkl")
            note(f"incremental build:\n{log}")
            want, _ = built(server, repo, work / f"cold-{step}", work / f"cold-{step}.pkl")
            for stage in ("raw", "sa", "sb", "sc"):
                assert "error" not in got[stage], got[stage]
                for part in ("kind", "splits", "features"):
                    assert want[stage][part] == got[stage][part], (stage, part)
                assert same(want[stage]["rows"], got[stage]["rows"]), (
                    f"state {step} ({desc}), stage {stage}: the incremental store serves "
                    f"{got[stage]['rows']}, a build from scratch {want[stage]['rows']}"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
