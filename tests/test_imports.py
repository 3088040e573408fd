"""The import graph: imports resolve as Python resolves them, and the code cache is checked."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import time

from tests.helpers import Repo, run_python

# Prints the manifest's code files and packages of `fn`, then what Python itself imports.
FINGERPRINT = """
import importlib, json, sys, warnings
import hfbuild
warnings.simplefilter("ignore")
mod = importlib.import_module(sys.argv[1])
loaded_before = sorted(m for m in sys.argv[2:] if m in sys.modules)
_, m = hfbuild.fingerprint(getattr(mod, "f"), return_manifest=True)
real = {}
for name in sys.argv[2:]:
    real[name] = getattr(importlib.import_module(name), "__file__", None)
print(json.dumps({
    "files": sorted(p for p, _ in m.doc["code"]["files"]),
    "ids": dict(m.doc["code"]["files"]),
    "packages": m.doc["packages"],
    "loaded_before": loaded_before,
    "real": real,
    "fingerprint": m.fingerprint,
    "dirty": [[f.path, f.status] for f in m.dirty],
}))
"""


def closure(
    repo: Repo, module: str, *probe: str, pythonpath: list[pathlib.Path] | None = None
) -> dict:  # type: ignore[type-arg]
    """The closure of `module.f` computed in a fresh process, with the files Python itself
    loads for the `probe` modules (imported only after the fingerprint)."""
    env = {}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    out = run_python(FINGERPRINT, repo.path, env=env, args=[module, *probe])
    result: dict = json.loads(out.stdout)  # type: ignore[type-arg]
    return result


def rel(repo: Repo, path: str | None) -> str | None:
    if path is None:
        return None
    p = pathlib.Path(path).resolve()
    root = repo.path.resolve()
    return p.relative_to(root).as_posix() if p.is_relative_to(root) else f"<outside>{p}"


def test_data_folder_named_like_installed_package_does_not_shadow_it(repo: Repo) -> None:
    """A `tokenizers/` data folder (no __init__.py) first on sys.path does not shadow the
    installed tokenizers: its version is recorded and no file of the folder is followed."""
    repo.write(
        {
            "tokenizers/vocab.txt": "a\nb\n",
            "tokenizers/decoders.py": "# a script that lives with the data\n",
            "transforms.py": "def f(x):\n    from tokenizers import decoders\n    return x\n",
        },
        commit="x",
    )
    got = closure(repo, "transforms", "tokenizers.decoders")
    assert got["loaded_before"] == []  # resolved by the path finder, not read off sys.modules
    assert got["files"] == ["transforms.py"]
    version = importlib.metadata.version("tokenizers")
    assert f"tokenizers=={version}" in got["packages"]
    assert rel(repo, got["real"]["tokenizers.decoders"]).startswith("<outside>")  # type: ignore[union-attr]


def test_regular_package_wins_over_an_earlier_namespace_portion(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A regular in-repo package named like a namespace portion that comes earlier on
    sys.path is the one imported, as Python's path finder decides; and a package directory
    wins over a module file of the same name."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "ns").mkdir(parents=True)
    (elsewhere / "ns" / "other.py").write_text("")
    repo.write(
        {
            "ns/__init__.py": "",
            "ns/mod.py": "from helpers import H\n",
            "helpers.py": "H = 'module'\n",
            "helpers/__init__.py": "H = 'package'\n",
            "transforms.py": "def f(x):\n    from ns import mod\n    return x\n",
        },
        commit="x",
    )
    got = closure(repo, "transforms", "ns.mod", "helpers", pythonpath=[elsewhere, repo.path])
    assert got["loaded_before"] == []
    assert rel(repo, got["real"]["ns.mod"]) == "ns/mod.py"
    assert rel(repo, got["real"]["helpers"]) == "helpers/__init__.py"
    assert got["files"] == ["helpers/__init__.py", "ns/__init__.py", "ns/mod.py", "transforms.py"]


def test_relative_imports_and_from_package_import_submodule(repo: Repo) -> None:
    """Relative imports at every level, `from pkg import sub` (a submodule) and `from pkg
    import name` (an attribute) resolve to exactly the files Python loads."""
    repo.write(
        {
            "pkg/__init__.py": "VALUE = 1\n",
            "pkg/a.py": "from . import b\nfrom .sub import c\nfrom .sub.c import C\n",
            "pkg/b.py": "",
            "pkg/sub/__init__.py": "from .. import VALUE\n",
            "pkg/sub/c.py": "from ..b import *\nC = 1\n",
            "pkg/unused.py": "",
            "app.py": "def f(x):\n    from pkg import a, VALUE\n    return x\n",
        },
        commit="x",
    )
    got = closure(repo, "app", "pkg.a")
    assert got["files"] == [
        "app.py",
        "pkg/__init__.py",
        "pkg/a.py",
        "pkg/b.py",
        "pkg/sub/__init__.py",
        "pkg/sub/c.py",
    ]


EDITABLE = """
import importlib.machinery, importlib.util, json, os, sys, warnings
import hfbuild
warnings.simplefilter("ignore")


class EditableFinder:
    # What an editable install's finder does: map a top-level name to a source tree.
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "mypkg":
            return None
        init = os.path.join(os.getcwd(), "src", "mypkg", "__init__.py")
        return importlib.util.spec_from_file_location(name, init)


sys.meta_path.append(EditableFinder)
import transforms
_, m = hfbuild.fingerprint(transforms.f, return_manifest=True)
print(json.dumps(sorted(p for p, _ in m.doc["code"]["files"])))
"""


def test_modules_of_a_meta_path_finder_are_followed(repo: Repo) -> None:
    """A project package that only an import hook finds (as an editable install's finder
    maps `mypkg` to `src/mypkg`) is followed into its files, after the path search."""
    repo.write(
        {
            "src/mypkg/__init__.py": "from . import core\n",
            "src/mypkg/core.py": "",
            "transforms.py": "def f(x):\n    import mypkg\n    return x\n",
        },
        commit="x",
    )
    out = run_python(EDITABLE, repo.path)
    assert json.loads(out.stdout) == ["src/mypkg/__init__.py", "src/mypkg/core.py", "transforms.py"]


STAGED = """
import json, warnings
warnings.simplefilter("ignore")
import dodo
out = {}
for mode in ("worktree", "index"):
    m = dodo.pipe.manifests(fresh=True, mode=mode)["m"]
    out[mode] = sorted(p for p, _ in m.doc["code"]["files"])
print(json.dumps(out))
"""


def test_staged_mode_resolves_imports_from_the_index(repo: Repo) -> None:
    """`verify --staged` resolves imports against what is staged: a module file deleted
    from the work tree but staged is followed, and an untracked package that shadows a
    staged module in the work tree does not shadow it in the index; a staged namespace
    package is found."""
    repo.write(
        {
            "dodo.py": "from hfbuild import Pipeline\nimport transforms\n"
            "pipe = Pipeline()\nraw = pipe.load('raw', 'json', data_files='d.jsonl')\n"
            "pipe.map('m', raw, transforms.f)\n",
            "d.jsonl": '{"a": 1}\n',
            "transforms.py": "def f(x):\n    import gone, util\n    from ns import mod\n"
            "    return x\n",
            "gone.py": "",
            "util.py": "",
            "ns/mod.py": "",
        },
        commit="x",
    )
    (repo.path / "gone.py").unlink()
    repo.write({"util/__init__.py": ""})  # untracked: shadows util.py in the work tree
    out = json.loads(run_python(STAGED, repo.path).stdout)
    assert out["worktree"] == ["ns/mod.py", "transforms.py", "util/__init__.py"]
    assert out["index"] == ["gone.py", "ns/mod.py", "transforms.py", "util.py"]


CYCLE = """
import json, warnings
warnings.simplefilter("ignore")
import hfbuild
import dodo
manifests = dodo.pipe.manifests()
out = {}
for stage in dodo.pipe.specs[1:]:  # the map stages
    shared = sorted(p for p, _ in manifests[stage.name].doc["code"]["files"])
    _, alone = hfbuild.fingerprint(stage.fn, return_manifest=True)
    out[stage.name] = [shared, sorted(p for p, _ in alone.doc["code"]["files"])]
print(json.dumps(out))
"""


def test_closures_shared_across_stages_match_closures_computed_alone(repo: Repo) -> None:
    """Stages whose closures overlap through an import cycle, walked in one snapshot (each
    file's closure computed once), get exactly the files each gets when computed alone."""
    fn = "def {name}(x):\n    return x\n"
    repo.write(
        {
            "dodo.py": "from hfbuild import Pipeline\nimport a, b, d, e\npipe = Pipeline()\n"
            "raw = pipe.load('raw', 'json', data_files='x.jsonl')\n"
            "for name, f in [('d', d.g), ('a', a.f), ('e', e.h), ('b', b.k)]:\n"
            "    pipe.map(name, raw, f)\n",
            "x.jsonl": '{"a": 1}\n',
            "a.py": "import b\n" + fn.format(name="f"),
            "b.py": "import a\nimport c\n" + fn.format(name="k"),
            "c.py": "",
            "d.py": "import b\n" + fn.format(name="g"),
            "e.py": "import d\nimport c\n" + fn.format(name="h"),
        },
        commit="x",
    )
    out = json.loads(run_python(CYCLE, repo.path).stdout)
    expected = {
        "d": ["a.py", "b.py", "c.py", "d.py"],
        "a": ["a.py", "b.py", "c.py"],
        "e": ["a.py", "b.py", "c.py", "d.py", "e.py"],
        "b": ["a.py", "b.py", "c.py"],
    }
    assert out == {name: [files, files] for name, files in expected.items()}


# -- the code cache --------------------------------------------------------------------------


def _cache(repo: Repo) -> pathlib.Path:
    return repo.path / ".hfbuild" / "cache" / "code.json"


def _rewrite(path: pathlib.Path, edit: object, *, fix_checksum: bool) -> None:
    head, body = path.read_text().split("\n")[:2]
    data = json.loads(body)
    edit(data)  # type: ignore[operator]
    new_body = json.dumps(data, sort_keys=True, separators=(",", ":"))
    doc = json.loads(head)
    if fix_checksum:
        doc["checksum"] = hashlib.sha256(new_body.encode()).hexdigest()
    path.write_text(json.dumps(doc, sort_keys=True) + "\n" + new_body + "\n")


def _stat_paths(repo: Repo) -> set[str]:
    """The paths whose work-tree blob ids the code cache remembers."""
    body = _cache(repo).read_text().split("\n")[1]
    return {k.rsplit("|", 4)[0] for k in json.loads(body)["stats"]}


def test_damaged_code_cache_is_ignored(repo: Repo) -> None:
    """A code cache whose body no longer matches its checksum, or that is truncated, is
    ignored whole: the closure is computed from the files. (Control: the same edit with a
    valid checksum is read, which shows the check is what protects the result.)"""
    repo.write(
        {"transforms.py": "import helper\ndef f(x):\n    return x\n", "helper.py": ""},
        commit="x",
    )
    first = closure(repo, "transforms")
    assert first["files"] == ["helper.py", "transforms.py"]
    cache = _cache(repo)
    blob = first["ids"]["transforms.py"]

    def forget_imports(data: dict) -> None:  # type: ignore[type-arg]
        assert blob in data["scans"]
        data["scans"][blob] = [[], [], None, []]
        data["resolutions"] = {}  # resolved imports are remembered too: forget them

    _rewrite(cache, forget_imports, fix_checksum=False)
    assert closure(repo, "transforms")["fingerprint"] == first["fingerprint"]

    cache.write_text(cache.read_text()[:200])
    assert closure(repo, "transforms")["fingerprint"] == first["fingerprint"]

    # The files above rewrote the cache; a forged entry with a valid checksum is trusted,
    # as git trusts its index: the checksum is the guard against damage.
    _rewrite(cache, forget_imports, fix_checksum=True)
    assert closure(repo, "transforms")["files"] == ["transforms.py"]


def test_code_cache_never_serves_a_stale_blob_id(repo: Repo) -> None:
    """A remembered work-tree blob id is used only while size, mtime, ctime and inode all
    match: a same-size edit with the mtime put back is seen, files changed within the last
    2 s are not remembered at all, and a file's outdated entry is dropped."""
    repo.write(
        {"transforms.py": "import helper\ndef f(x):\n    return x\n", "helper.py": "A = 1\n"},
        commit="x",
    )
    helper = repo.path / "helper.py"
    before = closure(repo, "transforms")
    # Written just now: racy, so not remembered.
    assert str(helper.resolve()) not in _stat_paths(repo)
    time.sleep(2.2)
    again = closure(repo, "transforms")
    assert again["fingerprint"] == before["fingerprint"]
    assert str(helper.resolve()) in _stat_paths(repo)  # now remembered

    st = helper.stat()
    helper.write_text("A = 2\n")  # same size
    os.utime(helper, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert helper.stat().st_mtime_ns == st.st_mtime_ns
    after = closure(repo, "transforms")
    assert after["ids"]["helper.py"] != before["ids"]["helper.py"]
    assert after["dirty"] == [["helper.py", "modified"]]
    # The old entry is dropped; the new one is racy, so not written yet.
    assert str(helper.resolve()) not in _stat_paths(repo)


def _trees(repo: Repo) -> dict:  # type: ignore[type-arg]
    body = _cache(repo).read_text().split("\n")[1]
    trees: dict = json.loads(body)["trees"]  # type: ignore[type-arg]
    return trees


def test_recorded_index_and_head_ids_follow_the_index_and_head(repo: Repo) -> None:
    """A file's status comes from index and HEAD ids remembered for one tree state (index
    stat data and HEAD's commit): staging, committing, and moving HEAD back without touching
    the index each give the status git gives; an index younger than 2 s is not remembered."""
    repo.write(
        {"transforms.py": "import helper\ndef f(x):\n    return x\n", "helper.py": "A = 1\n"},
        commit="x",
    )
    first = repo.git("rev-parse", "HEAD").strip()
    assert closure(repo, "transforms")["dirty"] == []
    assert _trees(repo) == {}  # the index was written just now: racy, nothing remembered
    time.sleep(2.2)
    assert closure(repo, "transforms")["dirty"] == []
    (recorded,) = _trees(repo).values()
    assert sorted(recorded["ids"]) == ["helper.py", "transforms.py"]
    assert recorded["state"].endswith(first)

    (repo.path / "helper.py").write_text("A = 22\n")
    repo.git("add", "helper.py")
    time.sleep(2.2)
    assert closure(repo, "transforms")["dirty"] == [["helper.py", "staged"]]
    assert closure(repo, "transforms")["dirty"] == [["helper.py", "staged"]]  # from the cache
    repo.git("commit", "-qm", "y")
    time.sleep(2.2)
    assert closure(repo, "transforms")["dirty"] == []
    assert closure(repo, "transforms")["dirty"] == []
    repo.git("reset", "-q", "--soft", first)  # HEAD moves, the index stays
    assert closure(repo, "transforms")["dirty"] == [["helper.py", "staged"]]
    (state,) = (v["state"] for v in _trees(repo).values())
    assert state.endswith(first)


def test_malformed_recorded_ids_are_ignored(repo: Repo) -> None:
    """Recorded index/HEAD ids of the wrong shape (a forged entry with a valid checksum) are
    not used: the status is read from the index again."""
    repo.write(
        {"transforms.py": "import helper\ndef f(x):\n    return x\n", "helper.py": "A = 1\n"},
        commit="x",
    )
    time.sleep(2.2)
    before = closure(repo, "transforms")
    assert _trees(repo)

    def damage(data: dict) -> None:  # type: ignore[type-arg]
        for t in data["trees"].values():
            t["ids"]["helper.py"] = ["not an id", None]
            t["ids"]["transforms.py"] = "x"

    _rewrite(_cache(repo), damage, fix_checksum=True)
    after = closure(repo, "transforms")
    assert after["dirty"] == [] and after["fingerprint"] == before["fingerprint"]
    (t,) = _trees(repo).values()
    assert t["ids"]["helper.py"] == [before["ids"]["helper.py"], before["ids"]["helper.py"]]


def _resolutions(repo: Repo) -> dict:  # type: ignore[type-arg]
    body = _cache(repo).read_text().split("\n")[1]
    found: dict = json.loads(body)["resolutions"]  # type: ignore[type-arg]
    return found


def _resolution_of(repo: Repo, rel: str) -> dict | None:  # type: ignore[type-arg]
    full = str((repo.path / rel).resolve())
    hits = [v for k, v in _resolutions(repo).items() if k.split("|")[0] == full]
    return hits[0] if hits else None


def test_stored_resolutions_are_checked_against_the_directories_they_read(repo: Repo) -> None:
    """A file's remembered resolution is used only while the directories it was resolved in
    are unchanged: a package added next to a module of the same name (which wins, as in
    Python), and a module created where a lazily imported name was searched for, are seen at
    once and after the racy window alike; the unchanged importing files keep their blob ids."""
    repo.write(
        {
            "pkg/__init__.py": "",
            "pkg/transforms.py": "from . import helper\n"
            "def f(x):\n    import lazy_mod\n    return x\n",
            "pkg/helper.py": "A = 1\n",
        },
        commit="x",
    )
    closure(repo, "pkg.transforms")  # writes __pycache__/ and the store: racy directories
    time.sleep(2.2)
    first = closure(repo, "pkg.transforms")
    assert first["files"] == ["pkg/__init__.py", "pkg/helper.py", "pkg/transforms.py"]
    assert _resolution_of(repo, "pkg/transforms.py") is not None  # remembered
    assert closure(repo, "pkg.transforms")["fingerprint"] == first["fingerprint"]  # and used

    # A package `helper/` now shadows helper.py.
    repo.write({"pkg/helper/__init__.py": "B = 2\n"})
    files = ["pkg/__init__.py", "pkg/helper/__init__.py", "pkg/transforms.py"]
    assert closure(repo, "pkg.transforms")["files"] == files  # the directory is racily new
    time.sleep(2.2)
    assert closure(repo, "pkg.transforms")["files"] == files  # its listing changed
    assert closure(repo, "pkg.transforms")["files"] == files  # remembered again

    # `lazy_mod` was searched for on sys.path and the project root, and found nowhere.
    repo.write({"lazy_mod.py": "C = 3\n"})
    assert closure(repo, "pkg.transforms")["files"] == sorted([*files, "lazy_mod.py"])
    time.sleep(2.2)
    assert "lazy_mod.py" in closure(repo, "pkg.transforms")["files"]


def test_stored_resolutions_are_checked_against_loaded_modules(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A resolution that rested on a loaded module is used only while the module is loaded
    from the same file: the same code run with another PYTHONPATH, where an outside `util`
    shadows the project's, follows the outside file, and back again the project's."""
    repo.write(
        {"transforms.py": "import util\ndef f(x):\n    return x\n", "src/util.py": "A = 1\n"},
        commit="x",
    )
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "util.py").write_text("A = 2\n")
    time.sleep(2.2)
    mine = closure(repo, "transforms", pythonpath=[repo.path / "src"])
    assert mine["files"] == ["src/util.py", "transforms.py"]
    assert closure(repo, "transforms", pythonpath=[repo.path / "src"]) == mine
    shadowed = closure(repo, "transforms", pythonpath=[outside, repo.path / "src"])
    assert shadowed["files"] == ["transforms.py"]
    assert shadowed["fingerprint"] != mine["fingerprint"]  # the outside util, by content
    assert closure(repo, "transforms", pythonpath=[repo.path / "src"]) == mine


def test_malformed_stored_resolution_is_ignored(repo: Repo) -> None:
    """A remembered resolution of the wrong shape, or whose facts are not what the reader
    computes, is not used (a forged entry with a valid checksum): the imports are resolved
    from the files."""
    repo.write(
        {"transforms.py": "import helper\ndef f(x):\n    return x\n", "helper.py": ""},
        commit="x",
    )
    time.sleep(2.2)
    first = closure(repo, "transforms")
    key = str((repo.path / "transforms.py").resolve())

    def forge(edges: object, facts: object) -> None:
        def edit(data: dict) -> None:  # type: ignore[type-arg]
            (k,) = (k for k in data["resolutions"] if k.startswith(key + "|"))
            data["resolutions"][k] = {"facts": facts, "edges": edges}

        _rewrite(_cache(repo), edit, fix_checksum=True)

    stored = _resolution_of(repo, "transforms.py")
    assert stored is not None and stored["edges"][0] == ["helper.py"]
    forge([["nope.py"], [], [], []], stored["facts"])  # one field short
    assert closure(repo, "transforms")["files"] == first["files"]
    forge([[1], [], [], [], []], stored["facts"])  # not a path
    assert closure(repo, "transforms")["files"] == first["files"]
    forge([[], [], [], [], []], {**stored["facts"], "m:helper": "0" * 16})  # a wrong fact
    assert closure(repo, "transforms")["files"] == first["files"]
    forge([[], [], [], [], []], {**stored["facts"], "q:": "?"})  # an unknown kind of fact
    assert closure(repo, "transforms")["files"] == first["files"]
    # Control: the same forged edges with the true facts are trusted, as git trusts its
    # index: the checksum guards against damage, the facts against staleness.
    forge([[], [], [], [], []], stored["facts"])
    assert closure(repo, "transforms")["files"] == ["transforms.py"]
