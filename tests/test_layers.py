"""The house's import rule, read from the source: hfbuild's packages import one way, down the
layers below, and no modules import each other in a loop, lazy imports included.

Every import counts: at module level, inside functions, under `if TYPE_CHECKING:`, relative
ones, and `importlib.import_module`/`__import__` of a literal name. The modules are parsed, never
imported, so a test run cannot hide an import that only a code path would make.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator, Mapping

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "hfbuild"

# Lowest first. A package may import its own modules and those of the layers below it; packages
# that share a layer import neither each other nor anything above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("store",),
    ("source",),
    ("keys",),
    ("pipeline",),
    ("builds",),
    ("frontends", "cli"),
)
ORDER = " < ".join(", ".join(layer) for layer in LAYERS)
# The face (`hfbuild/__init__.py`: the public API; `__main__.py`: `python -m hfbuild`) stands
# above every layer: it may import any module, and no module imports it.
FACE = frozenset({PACKAGE, f"{PACKAGE}.__main__"})


# Third-party modules only some packages import: pygit2 and huggingface_hub are the gateways of
# source/ to git and the Hub; `datasets` (and Arrow with it) is loaded only to read or write
# results (store/) and to build (builds/), so that a key, a check or a no-op never imports it.
GATEWAYS = {
    "pygit2": ("source",),
    "huggingface_hub": ("source",),
    "datasets": ("store", "builds"),
}


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every module of the package under `root`, by dotted name (a package by its own name)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _literal_import(node: ast.Call) -> str | None:
    """The module `importlib.import_module("x")` or `__import__("x")` names, when a literal."""
    f = node.func
    named = (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id in {"import_module", "__import__"}
    )
    if named and node.args and isinstance(node.args[0], ast.Constant):
        value = node.args[0].value
        return value if isinstance(value, str) else None
    return None


def imported(name: str, path: pathlib.Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import in module `name`'s file, wherever it stands; `from
    M import n` yields `M.n`, which names a module when n is one, else an object of M."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: None if is_package else -1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"
        elif isinstance(node, ast.Call) and (literal := _literal_import(node)):
            yield node.lineno, literal


def graph(root: pathlib.Path) -> dict[str, dict[str, int]]:
    """module -> {module of this package it imports: first line}. A name that is no module is
    taken as its longest prefix that is one (an object imported from that module)."""
    mods = modules(root)
    out: dict[str, dict[str, int]] = {m: {} for m in mods}
    for m, path in mods.items():
        for line, name in imported(m, path):
            if name != PACKAGE and not name.startswith(PACKAGE + "."):
                continue
            target = name
            while target not in mods:
                target = target.rpartition(".")[0]
            if target != m:
                out[m].setdefault(target, line)
    return out


def cycles(edges: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def package_of(module: str) -> str | None:
    """The package a module is a room of (`hfbuild.store.layout` -> `store`; a module straight
    under hfbuild/ by its own name, which no layer holds); None for the face."""
    return None if module in FACE else module.split(".")[1]


def layer_of(package: str) -> int:
    for i, layer in enumerate(LAYERS):
        if package in layer:
            return i
    raise KeyError(package)


def violations(root: pathlib.Path) -> list[str]:
    """What breaks the import rule in the tree at `root`, one sentence each."""
    edges = graph(root)
    out = []
    for m in sorted(edges):
        if m in FACE:
            continue
        pkg = package_of(m)
        if pkg is None or not any(pkg in layer for layer in LAYERS):
            out.append(f"{m} is in no package of LAYERS: place it in one")
            continue
        if m == f"{PACKAGE}.{pkg}" and edges[m]:
            out.append(f"{m} (a package's __init__) imports {sorted(edges[m])}: it names, no more")
        for target, line in sorted(edges[m].items()):
            if target in FACE:
                out.append(f"{m}:{line} imports {target}, the public face: import the module")
                continue
            other = package_of(target)
            if other is None or other == pkg or not any(other in layer for layer in LAYERS):
                continue  # its own package; a module in no package is reported on its own
            if layer_of(other) >= layer_of(pkg):
                out.append(f"{m}:{line} imports {target}: {pkg} may not import {other} ({ORDER})")
    for component in cycles(edges):
        out.append(f"these modules import each other in a loop: {', '.join(component)}")
    return out


def gateway_violations(root: pathlib.Path) -> list[str]:
    """Imports of a gateway's module (GATEWAYS) from outside its package."""
    out = []
    for m, path in modules(root).items():
        for line, name in imported(m, path):
            owners = GATEWAYS.get(name.partition(".")[0])
            if owners is not None and package_of(m) not in owners:
                out.append(f"{m}:{line} imports {name}: only {', '.join(owners)} may")
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(root: pathlib.Path) -> list[str]:
    """Private names of one hfbuild module used in another: `from m import _x`, or `m._x`
    where `m` names a module imported into the file."""
    mods = modules(root)
    out = []
    for m, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                for a in node.names:
                    if f"{node.module}.{a.name}" in mods:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                    elif _private(a.name):
                        out.append(f"{m}:{node.lineno} imports {node.module}.{a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
            ):
                out.append(f"{m}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return out


# The size rule (issue #21): a room bigger than this does several jobs; split it by concept.
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250


def _classes(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.ClassDef]]:
    """Every class defined in `node`, nested ones too, by its qualified name."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
            yield f"{prefix}{child.name}", child
            yield from _classes(child, f"{prefix}{child.name}.")
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _classes(child, f"{prefix}{child.name}.<locals>.")
        else:
            yield from _classes(child, prefix)


def oversized(root: pathlib.Path) -> list[str]:
    """Modules over MAX_MODULE_LINES lines and classes over MAX_CLASS_LINES (from the first
    decorator or the `class` line to the class's last line), each named with its size."""
    out = []
    for m, path in modules(root).items():
        text = path.read_text()
        rel = path.relative_to(root).as_posix()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            out.append(f"{rel} has {lines} lines (at most {MAX_MODULE_LINES})")
        for qualname, node in _classes(ast.parse(text, str(path)), ""):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            size = (node.end_lineno or node.lineno) - first + 1
            if size > MAX_CLASS_LINES:
                out.append(
                    f"{m}.{qualname} ({rel}:{node.lineno}) has {size} lines "
                    f"(at most {MAX_CLASS_LINES})"
                )
    return out


# Who may hold the `Pipeline` (issue #21: "a module below never receives the Pipeline
# object"): the module defining it, the one build module that builds a stage for it
# (`builds/stage.py`: the executors and builders below it get a `Place` and the manifests they
# build), and the packages above the builds (frontends, cli) and the face.
PIPELINE_HOLDERS = frozenset({"hfbuild.pipeline.pipeline", "hfbuild.builds.stage"})
PIPELINE_USERS = ("frontends", "cli")


def _annotations(tree: ast.AST) -> Iterator[ast.expr]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                if arg is not None and arg.annotation is not None:
                    yield arg.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


def _names_pipeline(tree: ast.AST) -> Iterator[int]:
    """Lines naming `Pipeline` in code: imported, read, an attribute, or in an annotation
    (quoted ones parsed); docstrings and comments aside."""
    quoted: list[ast.AST] = []
    for ann in _annotations(tree):
        for node in ast.walk(ann):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                try:
                    quoted.append(ast.parse(node.value, mode="eval"))
                except SyntaxError:
                    continue
                for inner in ast.walk(quoted[-1]):
                    if isinstance(inner, ast.expr):
                        inner.lineno = node.lineno
    for part in [tree, *quoted]:
        for node in ast.walk(part):
            if isinstance(node, ast.Name):
                name: str | None = node.id
            elif isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.ClassDef):
                name = node.name
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = {n for a in node.names for n in (a.name.rpartition(".")[2], a.asname)}
                name = "Pipeline" if "Pipeline" in names else None
            else:
                continue
            if name == "Pipeline":
                yield node.lineno


def _calls_manifests(tree: ast.AST) -> Iterator[int]:
    """Lines calling an object's `manifests(...)`: the pipeline's, asked back for keys."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "manifests"
        ):
            yield node.lineno


def pipeline_holders(root: pathlib.Path) -> list[str]:
    """Modules below the top layers that name the `Pipeline` though not a PIPELINE_HOLDER,
    and modules below the pipeline or among the builds (but `builds/stage.py`) that call a
    `manifests()` method back (a builder is handed the manifests it builds)."""
    pipeline_layer = layer_of("pipeline")
    out = []
    for m, path in modules(root).items():
        pkg = package_of(m)
        if pkg is None or pkg in PIPELINE_USERS or not any(pkg in layer for layer in LAYERS):
            continue
        tree = ast.parse(path.read_text(), str(path))
        if m not in PIPELINE_HOLDERS:
            for line in sorted(set(_names_pipeline(tree))):
                out.append(f"{m}:{line} names the Pipeline: give it the values it needs")
        if (layer_of(pkg) < pipeline_layer or pkg == "builds") and m not in PIPELINE_HOLDERS:
            for line in sorted(set(_calls_manifests(tree))):
                out.append(f"{m}:{line} calls manifests() back: hand it the manifests")
    return out


def test_imports_run_one_way_and_never_in_a_loop() -> None:
    """hfbuild's packages import only down the layers, and no modules form a loop."""
    found = violations(ROOT)
    assert not found, "\n".join(found)


def test_gateways_are_the_only_importers() -> None:
    """pygit2 and huggingface_hub are imported by the source package alone, and `datasets` by
    the store and builds packages alone, lazily or not."""
    assert gateway_violations(ROOT) == []


def test_no_private_name_is_used_outside_its_module() -> None:
    """No module imports or reads another module's private (`_x`) name."""
    assert private_uses(ROOT) == []


def test_no_module_or_class_is_too_large() -> None:
    """No module of hfbuild has more than 500 lines, and no class more than 250."""
    found = oversized(ROOT)
    assert not found, "\n".join(found)


def test_no_module_below_the_top_holds_the_pipeline() -> None:
    """Only `pipeline/pipeline.py`, `builds/stage.py`, the front ends and the CLI name the
    `Pipeline`; no module below the pipeline, nor a builder, calls its `manifests()` back."""
    found = pipeline_holders(ROOT)
    assert not found, "\n".join(found)


def test_every_layer_is_a_package() -> None:
    """Each package LAYERS names stands under hfbuild/ with an __init__.py that says what it
    owns (a docstring), and every subfolder with modules is such a package or inside one."""
    for layer in LAYERS:
        for pkg in layer:
            init = ROOT / PACKAGE / pkg / "__init__.py"
            assert init.is_file(), init
            assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"
    for folder in (ROOT / PACKAGE).rglob("*"):
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), f"{folder} is not a package"


# The rule's reader, on small trees made to break it: each way of importing is seen.


def tree(tmp_path: pathlib.Path, files: Mapping[str, str]) -> pathlib.Path:
    for name, text in {"hfbuild/__init__.py": "", **files}.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for layer in LAYERS:
        for pkg in layer:
            init = tmp_path / PACKAGE / pkg / "__init__.py"
            if not init.exists():
                init.parent.mkdir(parents=True, exist_ok=True)
                init.write_text(f'"""{pkg}"""\n')
    return tmp_path


def test_a_clean_tree_passes(tmp_path: pathlib.Path) -> None:
    """Imports down the layers and within a package, at any depth, are allowed."""
    root = tree(
        tmp_path,
        {
            "hfbuild/core/errors.py": "",
            "hfbuild/store/layout.py": "from hfbuild.core.errors import X\n",
            "hfbuild/cli/commands/__init__.py": '"""commands"""\n',
            "hfbuild/cli/commands/gc.py": "from hfbuild.store import layout\nfrom .. import rep\n",
            "hfbuild/cli/rep.py": "import hfbuild.core.errors\n",
            "hfbuild/cli/main.py": "def f():\n    from hfbuild.cli.commands import gc\n",
        },
    )
    assert violations(root) == []


@pytest.mark.parametrize(
    ("text", "seen"),
    [
        ("from hfbuild.pipeline.stages import Pipeline\n", "hfbuild.pipeline.stages"),
        ("def f():\n    from hfbuild.pipeline import stages\n", "hfbuild.pipeline.stages"),
        ("if TYPE_CHECKING:\n    import hfbuild.pipeline.stages\n", "hfbuild.pipeline.stages"),
        ("from ..pipeline import stages\n", "hfbuild.pipeline.stages"),
        (
            "import importlib\nimportlib.import_module('hfbuild.pipeline.stages')\n",
            "hfbuild.pipeline.stages",
        ),
        ("def f():\n    __import__('hfbuild.pipeline.stages')\n", "hfbuild.pipeline.stages"),
    ],
)
def test_an_import_up_the_layers_is_found_however_made(
    tmp_path: pathlib.Path, text: str, seen: str
) -> None:
    """A keys module importing from the pipeline package breaks the rule, whether the import
    is at the top, inside a function, for type checking only, relative, or by importlib."""
    root = tree(tmp_path, {"hfbuild/pipeline/stages.py": "", "hfbuild/keys/fullkey.py": text})
    (found,) = violations(root)
    assert found.startswith(f"hfbuild.keys.fullkey:{text.count(chr(10))} imports {seen}: ")
    assert "keys may not import pipeline" in found


def test_packages_of_one_layer_do_not_import_each_other(tmp_path: pathlib.Path) -> None:
    """frontends and cli share the top layer: neither imports the other."""
    root = tree(
        tmp_path,
        {"hfbuild/frontends/tasks.py": "", "hfbuild/cli/main.py": "import hfbuild.frontends.tasks"},
    )
    assert violations(root) == [
        "hfbuild.cli.main:1 imports hfbuild.frontends.tasks: "
        f"cli may not import frontends ({ORDER})"
    ]


def test_a_loop_inside_a_package_is_found(tmp_path: pathlib.Path) -> None:
    """Two modules of one package that import each other, one of them lazily, are a loop."""
    root = tree(
        tmp_path,
        {
            "hfbuild/builds/stage.py": "from hfbuild.builds import executor\n",
            "hfbuild/builds/executor.py": "def f():\n    from hfbuild.builds.stage import g\n",
        },
    )
    assert violations(root) == [
        "these modules import each other in a loop: hfbuild.builds.executor, hfbuild.builds.stage"
    ]


def test_the_face_and_loose_modules_are_refused(tmp_path: pathlib.Path) -> None:
    """A module that imports `hfbuild` itself (the public API, which imports every layer), a
    module outside every package, and a package __init__ that imports are each reported."""
    root = tree(
        tmp_path,
        {
            "hfbuild/core/version.py": "",
            "hfbuild/keys/fullkey.py": "def f():\n    from hfbuild import __version__\n",
            "hfbuild/loose.py": "",
            "hfbuild/store/__init__.py": '"""store"""\nfrom hfbuild.core import version\n',
        },
    )
    assert violations(root) == [
        "hfbuild.keys.fullkey:2 imports hfbuild, the public face: import the module",
        "hfbuild.loose is in no package of LAYERS: place it in one",
        "hfbuild.store (a package's __init__) imports ['hfbuild.core.version']: it names, no more",
    ]


def test_a_gateway_import_elsewhere_is_found(tmp_path: pathlib.Path) -> None:
    """A keys module importing pygit2 or `datasets` inside a function breaks a gateway;
    source may import pygit2, and builds `datasets`."""
    root = tree(
        tmp_path,
        {
            "hfbuild/source/gitrepo.py": "import pygit2\n",
            "hfbuild/builds/builder.py": "import datasets\n",
            "hfbuild/keys/fullkey.py": "def f():\n    import pygit2\n    import datasets\n",
        },
    )
    assert gateway_violations(root) == [
        "hfbuild.keys.fullkey:2 imports pygit2: only source may",
        "hfbuild.keys.fullkey:3 imports datasets: only store, builds may",
    ]


def test_a_private_name_used_elsewhere_is_found(tmp_path: pathlib.Path) -> None:
    """Importing another module's `_name`, or reading it through the module, is found; a
    module's own private names and dunders are not."""
    root = tree(
        tmp_path,
        {
            "hfbuild/source/closure.py": "_code_digest = 1\n__all__ = []\n",
            "hfbuild/source/liveness.py": "from hfbuild.source.closure import _code_digest\n",
            "hfbuild/source/modvalues.py": (
                "from hfbuild.source import closure\n_own = closure.__all__\n"
                "def f():\n    return closure._code_digest\n"
            ),
        },
    )
    assert private_uses(root) == [
        "hfbuild.source.liveness:1 imports hfbuild.source.closure._code_digest",
        "hfbuild.source.modvalues:4 uses hfbuild.source.closure._code_digest",
    ]


def test_a_large_module_or_class_is_named_with_its_size(tmp_path: pathlib.Path) -> None:
    """A module over 500 lines and a class over 250, a nested and a decorated one too, are each
    named with their size; a class of exactly 250 lines and a module of 500 pass."""
    body = "    x = 1\n"
    root = tree(
        tmp_path,
        {
            "hfbuild/core/big.py": "class Small:\n" + body * 249 + "\n" * 250,
            "hfbuild/keys/many.py": (
                "import dataclasses\n\n\n@dataclasses.dataclass\nclass Outer:\n"
                "    class Inner:\n" + "        x = 1\n" * 255 + body * 5 + "\n" * 235
            ),
        },
    )
    assert oversized(root) == [
        "hfbuild/keys/many.py has 501 lines (at most 500)",
        "hfbuild.keys.many.Outer (hfbuild/keys/many.py:5) has 263 lines (at most 250)",
        "hfbuild.keys.many.Outer.Inner (hfbuild/keys/many.py:6) has 256 lines (at most 250)",
    ]


@pytest.mark.parametrize(
    ("path", "text", "line"),
    [
        (
            "hfbuild/keys/fullkey.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from hfbuild.pipeline.pipeline import Pipeline\n",
            3,
        ),
        ("hfbuild/store/publish.py", "def f(pipe: 'Pipeline') -> None:\n    pass\n", 1),
        ("hfbuild/source/observe.py", "def f(p):\n    return p.Pipeline\n", 2),
        ("hfbuild/builds/local.py", "x: list[Pipeline] = []\n", 1),
        ("hfbuild/pipeline/ledger.py", "class Ledger:\n    pipe: 'Pipeline'\n", 2),
    ],
)
def test_the_pipeline_named_below_it_is_found(
    tmp_path: pathlib.Path, path: str, text: str, line: int
) -> None:
    """A module below the top layers naming `Pipeline` (imported for type checking, in a
    quoted annotation, as an attribute, in a variable's annotation) is reported, builds and
    the pipeline package included; `pipeline/pipeline.py`, `builds/stage.py` and the CLI may."""
    allowed = "from hfbuild.pipeline.pipeline import Pipeline\ndef f(p: Pipeline) -> None: ...\n"
    root = tree(
        tmp_path,
        {
            "hfbuild/pipeline/pipeline.py": "class Pipeline:\n    pass\n",
            "hfbuild/builds/stage.py": allowed,
            "hfbuild/cli/report.py": allowed,
            path: text,
        },
    )
    module = path.removesuffix(".py").replace("/", ".")
    assert pipeline_holders(root) == [
        f"{module}:{line} names the Pipeline: give it the values it needs"
    ]


def test_a_builder_calling_the_pipeline_back_is_found(tmp_path: pathlib.Path) -> None:
    """A builder (or a module below the pipeline) asking `manifests(fresh=True)` mid-build is
    reported; `builds/stage.py`, which builds a stage for the pipeline, may ask."""
    call = "def f(pipe, name):\n    return pipe.manifests(fresh=True)[name]\n"
    root = tree(
        tmp_path,
        {
            "hfbuild/builds/stage.py": call,
            "hfbuild/builds/shardbuild.py": call,
            "hfbuild/keys/fullkey.py": call,
            "hfbuild/pipeline/relock.py": call,
        },
    )
    assert pipeline_holders(root) == [
        "hfbuild.builds.shardbuild:2 calls manifests() back: hand it the manifests",
        "hfbuild.keys.fullkey:2 calls manifests() back: hand it the manifests",
    ]
