"""Which files, packages and bound values define a callable."""

from __future__ import annotations

import functools
import importlib
import json
import pathlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import hfbuild
from tests.helpers import Repo, run_python


@pytest.fixture
def imported(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Import modules of `repo` in this process, and forget them afterwards."""
    monkeypatch.syspath_prepend(str(repo.path))
    monkeypatch.chdir(repo.path)
    before = set(sys.modules)

    def load(name: str) -> Any:
        importlib.invalidate_caches()
        return importlib.import_module(name)

    yield load
    root = str(repo.path.resolve())
    for name in set(sys.modules) - before:
        f = getattr(sys.modules[name], "__file__", None) or ""
        if str(pathlib.Path(f).resolve()).startswith(root):
            del sys.modules[name]


def runtime() -> list[str]:
    """What runs every stage, read from the installed packages themselves."""
    import importlib.metadata

    import pyarrow

    return [
        f"datasets=={importlib.metadata.version('datasets')}",
        f"pyarrow=={pyarrow.__version__}",
        f"python=={sys.version_info[0]}.{sys.version_info[1]}",
    ]


def manifest(fn: Any, kwargs: Any = None) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, m = hfbuild.fingerprint(fn, kwargs, return_manifest=True)
    return dict(m.doc)


def files(fn: Any) -> set[str]:
    return {p for p, _ in manifest(fn)["code"]["files"]}


def test_closure_follows_in_repo_imports_transitively(repo: Repo, imported: Any) -> None:
    """Absolute, relative, `from pkg import submodule` and literal import_module imports are
    followed through the repository; files nobody imports are not included."""
    repo.write(
        {
            "app/__init__.py": "",
            "app/a.py": "from . import b\nfrom .sub.c import C\nimport app.d\n"
            "import importlib\nE = importlib.import_module('app.e')\n"
            "def f(x):\n    return b.B + C\n",
            "app/b.py": "B = 1\n",
            "app/sub/__init__.py": "",
            "app/sub/c.py": "from ..f import F\nC = 2\n",
            "app/d.py": "",
            "app/e.py": "",
            "app/f.py": "F = 1\n",
            "app/unused.py": "",
        },
        commit="x",
    )
    fn = imported("app.a").f
    assert files(fn) == {
        "app/__init__.py",
        "app/a.py",
        "app/b.py",
        "app/sub/__init__.py",
        "app/sub/c.py",
        "app/d.py",
        "app/e.py",
        "app/f.py",
    }


def test_third_party_imports_become_package_versions(repo: Repo, imported: Any) -> None:
    """numpy becomes `numpy==<version>` next to the runtime (datasets, pyarrow, Python);
    the standard library does not appear; nothing from site-packages is a closure file."""
    import numpy

    repo.write(
        {
            "t.py": "import os, json\nimport numpy as np\nimport datasets\n"
            "def f(x):\n    return np.log(x)\n"
        },
        commit="x",
    )
    m = manifest(imported("t").f)
    assert m["packages"] == sorted([f"numpy=={numpy.__version__}", *runtime()])
    assert [p for p, _ in m["code"]["files"]] == ["t.py"]


def test_virtualenv_inside_repo_is_not_followed(repo: Repo, imported: Any) -> None:
    """A module found in a virtualenv kept inside the repository is not a closure file."""
    repo.write(
        {
            "env/pyvenv.cfg": "home = /usr\n",
            "env/lib/vendored_mod.py": "X = 1\n",
            "t.py": "import vendored_mod\ndef f(x):\n    return x\n",
        },
        commit="x",
    )
    sys.path.insert(0, str(repo.path / "env" / "lib"))
    try:
        assert files(imported("t").f) == {"t.py"}
    finally:
        sys.path.remove(str(repo.path / "env" / "lib"))


def test_unresolvable_dynamic_import_warns_with_line(repo: Repo, imported: Any) -> None:
    """`importlib.import_module(name)` with a computed name warns that the closure is
    incomplete, naming the file and line."""
    repo.write(
        {
            "t.py": "import importlib\n\ndef f(x, name='json'):\n"
            "    return importlib.import_module(name)\n"
        },
        commit="x",
    )
    fn = imported("t").f
    with pytest.warns(hfbuild.IncompleteClosureWarning, match=r"t\.py:4: a dynamic import"):
        hfbuild.fingerprint(fn)


def test_two_lambdas_in_one_file_differ(repo: Repo, imported: Any) -> None:
    """Lambdas share a qualname; two different lambdas, even on one line, fingerprint apart,
    and the same lambda fingerprints the same each time."""
    repo.write(
        {"t.py": "A, B = (lambda x: x + 1), (lambda x: x * 2)\nC = lambda x: x + 1\n"}, commit="x"
    )
    mod = imported("t")
    fa, fb, fc = (hfbuild.fingerprint(f) for f in (mod.A, mod.B, mod.C))
    assert len({fa, fb, fc}) == 3
    assert hfbuild.fingerprint(mod.A) == fa


def test_closure_cells_count_as_arguments(repo: Repo, imported: Any) -> None:
    """A nested function's captured values are arguments: another value, another print."""
    repo.write(
        {"t.py": "def make(k):\n    def inner(x):\n        return x + k\n    return inner\n"},
        commit="x",
    )
    mod = imported("t")
    a, b, a2 = mod.make(1), mod.make(2), mod.make(1)
    assert hfbuild.fingerprint(a) == hfbuild.fingerprint(a2) != hfbuild.fingerprint(b)
    assert manifest(a)["args"]["closure"] == {"k": 1}


def test_partial_bound_arguments_count(repo: Repo, imported: Any) -> None:
    """functools.partial's bound arguments count like fn_kwargs, but stay distinguishable."""
    repo.write({"t.py": "def f(x, k=0):\n    return x + k\n"}, commit="x")
    f = imported("t").f
    p1, p2 = functools.partial(f, k=1), functools.partial(f, k=2)
    assert len({hfbuild.fingerprint(f), hfbuild.fingerprint(p1), hfbuild.fingerprint(p2)}) == 3
    assert hfbuild.fingerprint(p1) == hfbuild.fingerprint(functools.partial(f, k=1))


def test_bound_methods_and_callable_instances_carry_state(repo: Repo, imported: Any) -> None:
    """The instance behind a bound method or a callable object is part of the arguments."""
    repo.write(
        {
            "t.py": "class Scaler:\n    def __init__(self, k):\n        self.k = k\n"
            "    def __call__(self, x):\n        return x * self.k\n"
            "    def apply(self, x):\n        return x * self.k\n"
        },
        commit="x",
    )
    S = imported("t").Scaler
    assert hfbuild.fingerprint(S(2)) == hfbuild.fingerprint(S(2)) != hfbuild.fingerprint(S(3))
    assert hfbuild.fingerprint(S(2).apply) != hfbuild.fingerprint(S(3).apply)
    assert hfbuild.fingerprint(S(2).apply) != hfbuild.fingerprint(S(2))
    assert manifest(S(2))["args"]["self"] == {"object": ["t:Scaler", [["k", 2]]]}


def test_function_in_main_script(repo: Repo) -> None:
    """A function defined in a script run as __main__ is identified by the script's blob;
    the fingerprint is stable across runs and changes with the script."""
    script = (
        "import hfbuild, warnings\nwarnings.simplefilter('error')\n"
        "def f(x):\n    return x + 1\nprint(hfbuild.fingerprint(f))\n"
    )
    repo.write({"run.py": script}, commit="x")
    runs = {run_python("exec(open('run.py').read())", repo.path).stdout for _ in range(2)}
    import subprocess

    outs = {
        subprocess.run(
            [sys.executable, "run.py"], cwd=repo.path, capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    }
    assert len(outs) == 1
    repo.write({"run.py": script.replace("x + 1", "x + 2")}, commit="y")
    again = subprocess.run(
        [sys.executable, "run.py"], cwd=repo.path, capture_output=True, text=True, check=True
    ).stdout
    assert again not in outs
    # The exec'd variant (source known only to the process) fingerprints too, and stably.
    assert len(runs) == 1 and len(next(iter(runs)).strip()) == 32


CMD = """
import hfbuild, warnings, json
warnings.simplefilter("ignore")
SCALE = {scale}
def helper(x):
    return x * SCALE
def f(x):
    return helper(x) + 1
print(hfbuild.fingerprint(f))
"""


def test_python_c_functions_use_code_and_globals(tmp_path: pathlib.Path, repo: Repo) -> None:
    """A function from `python -c` has no file: its code identifies it, and the helpers and
    constants it reads through globals count; the result is stable across processes."""

    def run(scale: int, seed: str) -> str:
        return run_python(
            CMD.format(scale=scale), repo.path, env={"PYTHONHASHSEED": seed}
        ).stdout.strip()

    a1, a2, b = run(2, "1"), run(2, "2"), run(3, "1")
    assert a1 == a2 != b


def test_notebook_cell_source_counts(repo: Repo) -> None:
    """A function from a notebook cell (source known to linecache, file not on disk) is
    identified by its source text."""
    code = """
import linecache, hfbuild, warnings
warnings.simplefilter("ignore")
src = "def f(x):\\n    return x + {n}\\n"
name = "/tmp/ipykernel_1/cell{n}.py"
linecache.cache[name] = (len(src), None, src.splitlines(True), name)
ns = {{"__name__": "__main__"}}
exec(compile(src, name, "exec"), ns)
print(hfbuild.fingerprint(ns["f"]))
"""
    out1 = run_python(code.format(n=1), repo.path).stdout
    out1b = run_python(code.format(n=1), repo.path).stdout
    out2 = run_python(code.format(n=2), repo.path).stdout
    assert out1 == out1b != out2


def test_builtin_and_library_callables_by_name(repo: Repo, imported: Any) -> None:
    """Builtins and installed-library callables are identified by name (and version)."""
    import numpy

    m = manifest(numpy.log)
    assert m["code"]["target"] == {"module": "numpy", "qualname": "log"}
    assert m["packages"] == sorted([f"numpy=={numpy.__version__}", *runtime()])
    assert manifest(len)["code"]["target"] == {"module": "builtins", "qualname": "len"}


def test_callable_arguments_are_fingerprinted_by_code(repo: Repo, imported: Any) -> None:
    """A callable passed in fn_kwargs is encoded by its own code identity, and its files
    join the closure."""
    repo.write(
        {
            "t.py": "def f(x, post):\n    return post(x)\n",
            "post.py": "def inc(x):\n    return x + 1\ndef dec(x):\n    return x - 1\n",
        },
        commit="x",
    )
    f, post = imported("t").f, imported("post")
    m = manifest(f, {"post": post.inc})
    assert "post.py" in {p for p, _ in m["code"]["files"]}
    assert hfbuild.fingerprint(f, {"post": post.inc}) != hfbuild.fingerprint(f, {"post": post.dec})
    enc = json.dumps(m["args"]["fn_kwargs"])
    assert '"qualname": "inc"' in enc


def test_unhashable_argument_names_its_path(repo: Repo, imported: Any) -> None:
    """An argument hfbuild cannot encode raises UnhashableArgumentError naming its path and
    both fixes."""
    repo.write({"t.py": "def f(x, cfg):\n    return x\nclass Opaque:\n    pass\n"}, commit="x")
    mod = imported("t")
    with pytest.raises(hfbuild.UnhashableArgumentError) as e:
        hfbuild.fingerprint(mod.f, {"cfg": {"model": [1, mod.Opaque()]}})
    msg = str(e.value)
    assert "fn_kwargs['cfg']['model'][1]" in msg
    assert "__hfbuild_fingerprint__" in msg and "hfbuild.register_canonical" in msg
