"""Everything a function object carries is in its key (issue #25 item 1): defaults,
keyword-only defaults, closure cells, a bound method's instance, attributes set on it, and what
it wraps; a function that carries nothing beyond its source keeps the key it had."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.helpers import HFBUILD, Repo, run_python

MODULE = """
import functools
import typing


def mk(k):
    def f(ex, k=k):
        return ex
    return f


def mk_kw(k):
    def f(ex, *, k=k):
        return ex
    return f


LAMBDAS = [lambda ex, i=i: ex for i in range(2)]


def mk_cell(k):
    def f(ex):
        return ex + k
    return f


class Scale:
    def __init__(self, k):
        self.k = k

    def apply(self, ex):
        return ex * self.k


def mk_attr(k):
    def f(ex):
        return ex * f.k
    f.k = k
    return f


def deco(fn):
    @functools.wraps(fn)
    def wrapper(ex):  # reaches what it wraps through __wrapped__, not a closure cell
        return wrapper.__wrapped__(ex)
    return wrapper


def mk_wrapped(k):
    return deco(mk_cell(k))


def mk_cached(k):
    return functools.cache(mk_cell(k))


def closing(fn):
    @functools.wraps(fn)
    def wrapper(ex):
        return fn(ex)
    return wrapper


def named(ex, k=3, *, j=(1, "a"), m=None, limit=-1.5):
    return ex


@closing
def decorated(ex, k=3):
    return ex


def plain(ex):
    return ex


@typing.final  # sets __final__ on it: a marker for tools, not state
def marked(ex):
    return ex
"""

# Pairs of callables that differ only in what they carry: [what, a, b]. Each expression is
# evaluated in a fresh process importing the module above as `t`.
PAIRS = [
    ("default", "t.mk(2)", "t.mk(3)"),
    ("keyword-only default", "t.mk_kw(2)", "t.mk_kw(3)"),
    ("lambda default in a comprehension", "t.LAMBDAS[0]", "t.LAMBDAS[1]"),
    ("closure cell", "t.mk_cell(2)", "t.mk_cell(3)"),
    ("bound instance", "t.Scale(2).apply", "t.Scale(3).apply"),
    ("attribute", "t.mk_attr(2)", "t.mk_attr(3)"),
    ("__wrapped__ chain", "t.mk_wrapped(2)", "t.mk_wrapped(3)"),
    ("functools.cache wrapper", "t.mk_cached(2)", "t.mk_cached(3)"),
]

SCRIPT = """
import json, sys, warnings
warnings.simplefilter("ignore")
import hfbuild
import t
from datasets.fingerprint import Hasher

pairs = json.loads(sys.argv[1])
fp = hfbuild.fingerprint
out = {"pairs": {}}
for what, a, b in pairs:
    fa, fb = eval(a), eval(b)
    try:
        differs = Hasher.hash(fa) != Hasher.hash(fb)
    except RecursionError:  # dill follows a wrapper reaching itself forever
        differs = None
    out["pairs"][what] = {"a": fp(fa), "a_again": fp(eval(a)), "b": fp(fb), "hasher": differs}

def manifest_args(fn):
    return dict(hfbuild.fingerprint(fn, return_manifest=True)[1].doc["args"])

# Functions that carry nothing beyond their source: no part added to their key.
out["named_args"] = manifest_args(t.named)
out["decorated_args"] = manifest_args(t.decorated)
out["plain_args"] = manifest_args(t.plain)
out["marked_args"] = manifest_args(t.marked)
# A module-level function changed from outside: its defaults or an attribute set on it.
base = fp(t.named)
t.named.__defaults__ = (4,)
out["named_reassigned"] = [base, fp(t.named)]
t.named.__defaults__ = (3,)
t.named.__kwdefaults__ = {**t.named.__kwdefaults__, "m": 0}
out["named_kw_reassigned"] = fp(t.named)
t.named.__kwdefaults__ = {"j": (1, "a"), "m": None, "limit": -1.5}
out["named_restored"] = fp(t.named)
out["plain"] = fp(t.plain)
t.plain.k = 1
out["plain_attr"] = [fp(t.plain), manifest_args(t.plain)]
t.plain.k = 2
out["plain_attr2"] = fp(t.plain)
print(json.dumps(out, sort_keys=True))
"""


def _run(repo: Repo, seed: str) -> dict[str, Any]:
    out = run_python(
        SCRIPT, repo.path, env={"PYTHONHASHSEED": seed}, args=[json.dumps(PAIRS)]
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def test_what_a_function_carries_tells_keys_apart(repo: Repo) -> None:
    """Each pair differing only in a default, a keyword-only default, a comprehension
    lambda's default, a closure cell, a bound instance, an attribute or what it wraps gets
    two keys; the same callable made again gets the same key, and two fresh processes with
    other hash seeds agree on every key. datasets' Hasher tells every such pair apart too
    where it can hash it at all (dill recurses forever on a wrapper that reaches itself)."""
    repo.write({"t.py": MODULE}, commit="t")
    one, two = _run(repo, "1"), _run(repo, "2")
    assert one == two
    missed = [w for w, r in one["pairs"].items() if r["a"] == r["b"]]
    assert missed == []
    unstable = [w for w, r in one["pairs"].items() if r["a"] != r["a_again"]]
    assert unstable == []
    assert [w for w, r in one["pairs"].items() if r["hasher"] is False] == []
    unhashed = [w for w, r in one["pairs"].items() if r["hasher"] is None]
    assert sorted(unhashed) == ["__wrapped__ chain", "attribute"]


def test_module_function_changed_from_outside(repo: Repo) -> None:
    """A module-level function's defaults count once they are not its source's (reassigned
    `__defaults__` or `__kwdefaults__`), and the key comes back with the source's values; an
    attribute set on it counts by its value."""
    repo.write({"t.py": MODULE}, commit="t")
    r = _run(repo, "0")
    base, reassigned = r["named_reassigned"]
    assert reassigned != base
    assert r["named_kw_reassigned"] not in (base, reassigned)
    assert r["named_restored"] == base
    with_attr, args = r["plain_attr"]
    assert len({r["plain"], with_attr, r["plain_attr2"]}) == 3
    assert args["attrs"] == {"k": 1}


def test_nothing_carried_adds_nothing(repo: Repo) -> None:
    """A module-level function whose defaults are its source's literals, a decorated
    function whose wrapper holds it in a closure cell (functools.wraps), and one marked by
    `typing.final` get no new part in their key: the key they had before defaults and
    attributes counted."""
    repo.write({"t.py": MODULE}, commit="t")
    r = _run(repo, "0")
    assert r["named_args"] == {"fn_kwargs": {"dict": []}}
    assert r["plain_args"] == {"fn_kwargs": {"dict": []}}
    assert r["marked_args"] == {"fn_kwargs": {"dict": []}}
    decorated = r["decorated_args"]
    assert set(decorated) == {"closure", "fn_kwargs"}
    assert "defaults" not in json.dumps(decorated)


DODO = """
from hfbuild import Pipeline
from pkg.transforms import mk

pipe = Pipeline()
raw = pipe.load("raw", "parquet", data_files="data/*.parquet", split="train")
a = pipe.map("a", raw, mk(2))
b = pipe.map("b", raw, mk(3))
c = pipe.map("c", raw, mk(2))


def task_preprocess():
    yield from pipe.tasks()
"""

TRANSFORMS = """
def mk(k):
    def f(ex, k=k):
        return {"y": ex["x"] * k}
    return f
"""

READ = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
print(json.dumps({s: [dodo.pipe[s].fingerprint, list(dodo.pipe.result(s)["y"])]
                  for s in ("a", "b", "c")}))
"""


def test_two_stages_differing_in_a_default_get_their_own_rows(repo: Repo) -> None:
    """The reported case end to end: `pipe.map("a", raw, mk(2))` and `pipe.map("b", raw,
    mk(3))` with `def f(ex, k=k)` are two stages with two keys, each serving its own rows as
    plain datasets computes them; a third stage equal to the first shares its key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo.write({"pkg/__init__.py": "", "pkg/transforms.py": TRANSFORMS, "dodo.py": DODO})
    (repo.path / "data").mkdir()
    pq.write_table(pa.table({"x": [1, 2, 3]}), repo.path / "data" / "p.parquet")
    repo.commit("project")
    env = {**os.environ, "PYTHONPATH": str(repo.path)}
    run = subprocess.run(
        [sys.executable, "-m", "doit", "run", "preprocess"],
        cwd=repo.path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run_python(READ, repo.path).stdout.strip().splitlines()[-1])
    assert got["a"][1] == [2, 4, 6]
    assert got["b"][1] == [3, 6, 9]
    assert got["c"][1] == [2, 4, 6]
    assert got["a"][0] != got["b"][0]
    assert got["a"][0] == got["c"][0]

    # `explain` names the default that changed, as it names a closure cell.
    repo.write({"dodo.py": DODO.replace("mk(3)", "mk(4)")}, commit="b: k=4")
    out = subprocess.run(
        [HFBUILD, "explain", "b"], cwd=repo.path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 1, out.stderr
    assert "argument defaults.k changed: 3 -> 4" in out.stdout


def test_explain_names_what_a_wrapped_function_carries(repo: Repo) -> None:
    """A change inside what a wrapper wraps, or a lambda's default, is named by its path
    (`wrapped.closure.k`, `defaults.i`), not as a whole function."""
    repo.write({"t.py": MODULE}, commit="t")
    code = """
        import json, warnings
        warnings.simplefilter("ignore")
        import hfbuild, t
        from hfbuild.keys.diff import diff
        def doc(fn):
            return hfbuild.fingerprint(fn, return_manifest=True)[1].doc
        print(json.dumps([c.describe() for a, b in ((t.mk_wrapped(2), t.mk_wrapped(3)),
                          (t.mk_cached(2), t.mk_cached(3)), (t.LAMBDAS[0], t.LAMBDAS[1]),
                          (t.mk_attr(2), t.mk_attr(3)))
                          for c in diff(doc(a), doc(b))]))
        """
    said = json.loads(run_python(code, repo.path).stdout.strip().splitlines()[-1])
    assert said == [
        "argument wrapped.closure.k changed: 2 -> 3",
        "argument wrapped.closure.k changed: 2 -> 3",
        "argument defaults.i changed: 0 -> 1",
        "argument attrs.k changed: 2 -> 3",
    ]
