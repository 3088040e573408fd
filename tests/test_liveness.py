"""The code that runs is the code that was hashed, and module values changed at run time count
(issue #9, items 4 and 5): fresh processes on real git repositories."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

from tests.helpers import Repo, fingerprint_in_subprocess, run_python
from tests.pipeline_project import doit, expected, make_project, results

TRANSFORMS = """
    from helpers import shout

    MAX_LEN = 128
    STOP = {"a", "b"}
    TABLE = {f"k{i}": i for i in range(10)}


    def logged(f):  # a decorator that hides the function's code (no __wrapped__)
        def inner(*a):
            return f(*a)

        return inner


    @logged
    def counted(x):
        return x


    def clip(ex):
        return {"t": shout(ex["t"][:MAX_LEN]), "n": len(STOP) + TABLE["k1"]}
    """
HELPERS = """
    def shout(s):
        return s.upper()


    def whisper(s):
        return s.lower()
    """
EDITED = "def clip(ex):\n    return {'t': ex['t'][::-1]}\n"


def project(repo: Repo) -> Repo:
    return repo.write({"transforms.py": TRANSFORMS, "helpers.py": HELPERS}, commit="project")


def age(repo: Repo, *names: str) -> None:
    """Date files an hour back, so that their stat (not only a compile) vouches for them."""
    import os
    import time

    for n in names:
        t = time.time() - 3600
        os.utime(repo.path / n, (t, t))


# A driver run in a fresh interpreter: `steps` is a list of actions; each prints one JSON line.
DRIVER = """
import importlib, json, subprocess, sys, warnings
warnings.simplefilter("ignore")
FIRST = sys.argv[2]
if FIRST == "hfbuild":
    import hfbuild
import transforms
import hfbuild
held = transforms.clip
for step in json.loads(sys.argv[1]):
    kind, arg = step
    if kind == "fp":
        fn = held if arg == "held" else transforms.clip
        try:
            print(json.dumps({"fp": hfbuild.fingerprint(fn)}))
        except hfbuild.StaleModuleError as e:
            print(json.dumps({"refused": str(e)}))
    elif kind == "write":
        name, text = arg
        with open(name, "w") as f:
            f.write(text)
    elif kind == "commit":
        subprocess.run(["git", "commit", "-qam", "edit"], check=True)
    elif kind == "reload":
        importlib.reload(sys.modules[arg])
"""


def drive(repo: Repo, steps: list[Any], first: str = "hfbuild") -> list[dict[str, str]]:
    out = run_python(DRIVER, repo.path, args=[json.dumps(steps), first])
    return [json.loads(line) for line in out.stdout.splitlines()]


def fresh_fp(repo: Repo) -> str:
    return str(fingerprint_in_subprocess(repo.path, "transforms", "clip")["fp"])


def test_edited_module_is_refused_until_it_is_reloaded(repo: Repo) -> None:
    """A module edited and committed after this process loaded it is refused with a message
    naming restart and importlib.reload; after the reload the fingerprint is a fresh
    process's."""
    project(repo)
    age(repo, "transforms.py", "helpers.py")
    before = fresh_fp(repo)
    out = drive(
        repo,
        [
            ["fp", ""],
            ["write", ["transforms.py", EDITED]],
            ["commit", ""],
            ["fp", ""],
            ["reload", "transforms"],
            ["fp", ""],
        ],
    )
    assert out[0] == {"fp": before}
    msg = out[1]["refused"]
    assert "module transforms was loaded before transforms.py was changed" in msg
    assert "Restart the kernel" in msg and "importlib.reload(transforms)" in msg
    assert out[2] == {"fp": fresh_fp(repo)} and out[2]["fp"] != before


def test_edited_helper_module_is_refused(repo: Repo) -> None:
    """An edit to a helper module of the closure (not the transform's own) is refused too."""
    project(repo)
    out = drive(repo, [["write", ["helpers.py", "def shout(s):\n    return s\n"]], ["fp", ""]])
    assert "module helpers was loaded before helpers.py was changed" in out[0]["refused"]


def test_edit_that_keeps_the_code_is_not_refused(repo: Repo) -> None:
    """A comment, blank lines or a touch change the file but not the code that runs: no
    refusal, and the fingerprint is the one a fresh process computes."""
    project(repo)
    age(repo, "transforms.py", "helpers.py")
    text = (repo.path / "transforms.py").read_text()
    commented = "# a comment\n\n" + text.replace("MAX_LEN = 128", "MAX_LEN = 128  # tokens")
    out = drive(repo, [["fp", ""], ["write", ["transforms.py", commented]], ["fp", ""]])
    assert out[1] == {"fp": fresh_fp(repo)} and out[1] != out[0]


def test_module_imported_before_hfbuild_is_checked(repo: Repo) -> None:
    """A module imported before hfbuild itself (no import record) and edited afterwards is
    still refused, from its loaded functions compared with the file now."""
    project(repo)
    out = drive(repo, [["fp", ""], ["write", ["transforms.py", EDITED]], ["fp", ""]], first="")
    assert "fp" in out[0]
    assert "module transforms was loaded before" in out[1]["refused"]


def test_function_kept_from_before_a_reload_is_refused(repo: Repo) -> None:
    """A function object taken from a module before it was edited and reloaded is refused;
    the reloaded module's function is accepted."""
    project(repo)
    out = drive(
        repo,
        [
            ["write", ["transforms.py", EDITED]],
            ["reload", "transforms"],
            ["fp", "held"],
            ["fp", ""],
        ],
    )
    assert (
        "transforms.clip is a function from before transforms was reloaded" in (out[0]["refused"])
    )
    assert out[1] == {"fp": fresh_fp(repo)}


# -- module values --------------------------------------------------------------------------

VALUES = """
import json, sys, warnings
warnings.simplefilter("ignore")
import hfbuild, transforms, helpers
def fp():
    f, m = hfbuild.fingerprint(transforms.clip, return_manifest=True)
    return {"fp": f, "values": m.doc["code"].get("module_values")}
out = [fp()]
exec(sys.argv[1])
out.append(fp())
print(json.dumps(out))
"""


def values(repo: Repo, code: str) -> list[dict[str, Any]]:
    out = run_python(VALUES, repo.path, args=[code])
    result: list[dict[str, Any]] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_nothing_reassigned_gives_no_module_value(repo: Repo) -> None:
    """Reading literals, a computed table and an imported helper as their source binds them
    adds nothing to the manifest: the same fingerprint as before, in two processes."""
    project(repo)
    first, second = values(repo, "transforms.clip({'t': 'x'})")
    assert first == second and first["values"] is None
    assert first["fp"] == fresh_fp(repo)


def test_assigned_value_enters_the_key(repo: Repo) -> None:
    """`transforms.MAX_LEN = 256` changes the key and names the source's and the new value;
    setting it back restores the fingerprint."""
    project(repo)
    first, second = values(repo, "transforms.MAX_LEN = 256")
    assert second["values"] == [["transforms.MAX_LEN", {"source": 128, "value": 256}]]
    assert second["fp"] != first["fp"]
    again, back = values(repo, "transforms.MAX_LEN = 256; transforms.MAX_LEN = 128")
    assert back == first == again


def test_same_value_of_another_type_counts(repo: Repo) -> None:
    """128.0 or True for a literal 128 is another value to the key (as to the transform)."""
    project(repo)
    _, as_float = values(repo, "transforms.MAX_LEN = 128.0")
    assert as_float["values"] == [
        ["transforms.MAX_LEN", {"source": 128, "value": {"float": "128.0"}}]
    ]


def test_container_mutated_in_place_enters_the_key(repo: Repo) -> None:
    """`transforms.STOP.add("x")` mutates a literal set in place: its content is in the key."""
    project(repo)
    first, second = values(repo, "transforms.STOP.add('x')")
    assert second["values"] == [
        ["transforms.STOP", {"source": {"set": ["a", "b"]}, "value": {"set": ["a", "b", "x"]}}]
    ]
    assert second["fp"] != first["fp"]


def test_helper_rebound_and_name_set_from_outside(repo: Repo) -> None:
    """An imported helper rebound to another function is encoded as that function (rebinding
    it in its own module after the import changes nothing that runs); a name the module's
    source never binds but the code reads (set from outside) is in the key."""
    project(repo)
    first, second = values(repo, "transforms.shout = helpers.whisper")
    ((name, entry),) = second["values"]
    assert name == "transforms.shout" and second["fp"] != first["fp"]
    target = entry["value"]["callable"]["target"]
    assert (target["module"], target["qualname"]) == ("helpers", "whisper")
    assert values(repo, "helpers.shout = helpers.whisper")[1] == first
    repo.write({"transforms.py": "def clip(ex):\n    return {'t': ex['t'] * EXTRA}\n"}, commit="x")
    first, second = values(repo, "transforms.EXTRA = 3")
    assert second["values"] == [["transforms.EXTRA", {"value": 3}]]
    assert first["values"] is None  # not set yet: nothing to encode


def test_attribute_of_an_in_repo_module(repo: Repo) -> None:
    """`config.LIMIT` read through an imported in-repo module follows that module's source."""
    repo.write(
        {
            "config.py": "LIMIT = 5\n",
            "transforms.py": "import config\n\ndef clip(ex):\n    return ex[: config.LIMIT]\n",
            "helpers.py": "",
        },
        commit="project",
    )
    first, second = values(repo, "import config; config.LIMIT = 7")
    assert first["values"] is None
    assert second["values"] == [["config.LIMIT", {"source": 5, "value": 7}]]


def test_value_set_in_dodo_is_built_and_explained(repo: Repo, tmp_path: pathlib.Path) -> None:
    """A pipeline's dodo.py that sets `deep.OFFSET = 5` on a helper module read three calls
    deep: `explain` names the module value, and `doit run` builds with it (the old result is
    not served)."""
    make_project(repo)
    repo.write({".gitignore": ".doit.db*\n"})
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    repo.commit("build and lock")
    dodo = repo.path / "dodo.py"
    dodo.write_text(
        dodo.read_text().replace(
            "pipe = Pipeline()", "from pkg.util import deep\ndeep.OFFSET = 5\npipe = Pipeline()"
        )
    )
    from tests.helpers import run_hfbuild

    out = run_hfbuild(repo, "explain", "feat")
    assert out.returncode == 1
    assert "  module value pkg.util.deep.OFFSET: 0 -> 5" in out.stdout.splitlines()
    assert "module value" not in run_hfbuild(repo, "explain", "lens").stdout
    states = json.loads(run_hfbuild(repo, "status", "--json").stdout)
    feat = next(s for s in states if s["stage"] == "feat")
    assert feat["reason"] == "module value pkg.util.deep.OFFSET: 0 -> 5"
    doit(repo, "run", "preprocess", log=tmp_path / "calls.log")
    assert results(repo)["feat"] == expected(offset=5)["feat"]
    lock = json.loads((repo.path / "hfbuild.lock").read_text())
    assert lock["stages"]["feat"]["manifest"]["code"]["module_values"] == [
        ["pkg.util.deep.OFFSET", {"source": 0, "value": 5}]
    ]


# -- a fingerprint taken, then the code changed before the stage ran ----------------------

BUILD_AFTER_EDIT = """
import importlib, json, os, sys, warnings
warnings.simplefilter("ignore")
import hfbuild
from hfbuild.builds.stage import build
import transforms, helpers
pipe = hfbuild.Pipeline(root=os.getcwd())
raw = pipe.load("raw", "json", data_files="data.jsonl", split="train")
pipe.map("up", raw, transforms.up)
build(pipe, "raw")  # the input is built: nothing makes the build look at the code again
fp = pipe["up"].fingerprint
pipe.manifests()  # taken (and memoized) before the edit, as a kernel's Pipeline does
with open(sys.argv[1], "w") as f:
    f.write("def up(s):\\n    return s + '!'\\n")
if sys.argv[2] == "reload":
    importlib.reload(helpers)
try:
    build(pipe, "up")
    out = {"rows": list(pipe.store.load(fp)["t"])}
except hfbuild.StaleModuleError as e:
    out = {"refused": str(e)}
print(json.dumps(dict(out, stored=pipe.store.has(fp))))
"""

UP_VIA_HELPERS = "import helpers\n\ndef up(ex):\n    return {'t': helpers.up(ex['t'])}\n"

FRESH_BUILD = """
import json, os, warnings
warnings.simplefilter("ignore")
import hfbuild
from hfbuild.builds.stage import build
import transforms
pipe = hfbuild.Pipeline(root=os.getcwd())
raw = pipe.load("raw", "json", data_files="data.jsonl", split="train")
pipe.map("up", raw, transforms.up)
build(pipe, "up")
print(json.dumps(list(pipe.result("up")["t"])))
"""


def test_code_reloaded_or_imported_after_the_fingerprint_is_not_stored(
    repo: Repo, tmp_path: pathlib.Path
) -> None:
    """A helper reloaded after the Pipeline took its fingerprints, or a module first imported
    during the build from a file edited since, ran code the fingerprint did not hash: the
    build is refused and nothing is stored; a fresh process builds the edited code."""
    env = {"HFBUILD_STORE": str(tmp_path / "store")}
    repo.write(
        {
            "transforms.py": UP_VIA_HELPERS,
            "helpers.py": "def up(s):\n    return s.upper()\n",
            "lazy.py": "def up(s):\n    return s.upper()\n",
            "data.jsonl": '{"t": "a"}\n',
        },
        commit="project",
    )
    out = run_python(BUILD_AFTER_EDIT, repo.path, env=env, args=["helpers.py", "reload"])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "ran code loaded after the stage's fingerprint was taken" in result["refused"]
    assert result["stored"] is False
    out = run_python(FRESH_BUILD, repo.path, env=env)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["a!"]

    lazy = "def up(ex):\n    import lazy\n\n    return {'t': lazy.up(ex['t'])}\n"
    repo.write({"transforms.py": lazy, "helpers.py": ""}, commit="lazy")
    out = run_python(BUILD_AFTER_EDIT, repo.path, env=env, args=["lazy.py", "keep"])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "module lazy ran code loaded after" in result["refused"]
    assert result["stored"] is False


SAME_SECOND = """
import importlib, os, sys, time
while time.time() % 1 > 0.3:  # start early in a second: both writes must share it
    time.sleep(0.05)
with open("helper.py", "w") as f:
    f.write("K = 1\\n")
import helper  # compiles helper.py and writes its bytecode cache
with open("helper.py", "w") as f:
    f.write("K = 2\\n")  # same size, same second: the cache still validates
print(int(os.stat("helper.py").st_mtime) == int(os.stat(helper.__cached__).st_mtime))
"""

STALE_PYC = """
import json, warnings
warnings.simplefilter("ignore")
import hfbuild
import transforms
try:
    out = {"ran": transforms.f({}), "fp": hfbuild.fingerprint(transforms.f)}
except hfbuild.StaleModuleError as e:
    out = {"ran": transforms.f({}), "refused": str(e)}
print(json.dumps(out))
"""


def test_bytecode_cache_older_than_its_source_is_caught(repo: Repo) -> None:
    """A same-size rewrite within the second of the last import leaves a bytecode cache that
    Python keeps loading (old code, new file) in every later process, long after the edit;
    hfbuild compares that code with the file and refuses, naming __pycache__."""
    repo.write({"transforms.py": "import helper\n\ndef f(ex):\n    return helper.K\n"})
    env = {"PYTHONDONTWRITEBYTECODE": ""}
    for _ in range(5):
        if run_python(SAME_SECOND, repo.path, env=env).stdout.strip() == "True":
            break
    else:
        raise AssertionError("could not write twice within one second")
    repo.commit("project")
    time.sleep(2.2)  # past the racy window of the load itself
    out = json.loads(run_python(STALE_PYC, repo.path, env=env).stdout.strip().splitlines()[-1])
    assert out["ran"] == 1 and (repo.path / "helper.py").read_text() == "K = 2\n"
    assert "module helper was loaded before helper.py was changed" in out["refused"]
    assert "delete that __pycache__ first" in out["refused"]


LOADED_AFTER_IDENTIFIED = """
import os, time
from hfbuild.source import liveness
from hfbuild.source.closure import Context
from hfbuild.core.errors import StaleModuleError
from hfbuild.source.gitstate import Snapshot

ctx = Context(Snapshot("."))
ctx.add_file("helpers.py")  # identified as committed, before the module is loaded
with open("helpers.py", "w") as f:
    f.write("def shout(s):\\n    return s.lower()  # edited\\n")
t = time.time() - 3600  # old enough for its stat to vouch for the load
os.utime("helpers.py", (t, t))
import helpers
try:
    liveness.check_loaded(ctx)
    print("passed")
except StaleModuleError as e:
    print("refused:", e)
"""


def test_module_loaded_after_its_file_was_identified_is_compared_with_that_file(
    repo: Repo,
) -> None:
    """A module loaded from a file edited after the snapshot identified the file is refused:
    its load is checked against the state whose blob id the closure holds, not the file now."""
    project(repo)
    out = run_python(LOADED_AFTER_IDENTIFIED, repo.path)
    assert out.stdout.startswith("refused:"), out.stdout + out.stderr
    assert "helpers" in out.stdout


SOURCE_AFTER_IDENTIFIED = """
import json
import transforms
from hfbuild.source import modvalues
from hfbuild.source.closure import Context
from hfbuild.source.gitstate import Snapshot

ctx = Context(Snapshot("."))
ctx.add_file("transforms.py")  # identified as committed, MAX_LEN = 128 as loaded
with open("transforms.py") as f:
    text = f.read()
with open("transforms.py", "w") as f:
    f.write(text.replace("MAX_LEN = 128", "MAX_LEN = 64"))
modvalues.follow_globals(transforms.clip, ctx)
print(json.dumps(sorted(ctx.module_values)))
"""


def test_module_values_are_compared_with_the_identified_source(repo: Repo) -> None:
    """Module values are compared with the source of the blob id the closure holds: an edit
    after the file was identified is no module value of that key."""
    project(repo)
    out = run_python(SOURCE_AFTER_IDENTIFIED, repo.path)
    assert json.loads(out.stdout) == []
