"""Environment variables the code reads by name are in its stage's key; secrets only hashed."""

from __future__ import annotations

import hashlib
import json
import pathlib
import subprocess

import pytest
import xxhash

from tests.helpers import Repo, fingerprint_in_subprocess, run_hfbuild, run_python
from tests.pipeline_project import doit

MODULES = {
    "app/__init__.py": "",
    "app/settings.py": """
        import os as o
        from os import environ as E, getenv

        MODE = o.environ.get("MODE")          # read at import, module level

        def level():
            return getenv("LEVEL", "1") + E["REGION"] if "REGION" in E else getenv("LEVEL")
        """,
    "app/t.py": """
        import os
        from app.settings import MODE, level

        def f(batch):
            return {"y": [f"{MODE}-{level()}-{os.environ.get('API_TOKEN', '')[:0]}"
                          for _ in batch["x"]]}
        """,
}


def fp(repo: Repo, **env: str) -> str:
    out = fingerprint_in_subprocess(repo.path, "app.t", "f", env=env)
    return str(out["fp"])


@pytest.fixture
def app(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> Repo:
    for name in ("MODE", "LEVEL", "REGION", "API_TOKEN", "UNRELATED", "HFBUILD_SECRET_SALT"):
        monkeypatch.delenv(name, raising=False)
    return repo.write(MODULES, commit="app")


def test_values_read_by_name_are_in_the_key(app: Repo) -> None:
    """Each variable read through os.environ[...], .get, `in`, getenv, under aliases, at module
    level or in a helper changes the key; unset and empty differ; an unrelated one does not."""
    base = fp(app)
    assert fp(app, UNRELATED="x") == base
    seen = {base}
    for env in ({"MODE": "a"}, {"MODE": "b"}, {"MODE": ""}, {"LEVEL": "2"}, {"REGION": "eu"}):
        seen.add(fp(app, **env))
    assert len(seen) == 6


def test_manifest_lists_values_sorted_with_unset_as_null(app: Repo) -> None:
    """The manifest's env part names every variable read, sorted, with None for unset ones."""
    code = """
        import json, warnings
        warnings.simplefilter("ignore")
        import hfbuild, app.t
        _, m = hfbuild.fingerprint(app.t.f, return_manifest=True)
        print(json.dumps(m.doc["env"]))
        """
    out = run_python(code, app.path, env={"MODE": "", "LEVEL": "3"})
    assert json.loads(out.stdout) == [
        ["API_TOKEN", None],
        ["LEVEL", "3"],
        ["MODE", ""],
        ["REGION", None],
    ]


def test_secret_is_only_a_salted_hash_equal_across_clones(
    app: Repo, tmp_path: pathlib.Path
) -> None:
    """A secret-looking variable enters the manifest as a salted scrypt hash (never in clear,
    not a plain digest), different values give different keys, and a clone elsewhere agrees."""
    code = """
        import json, warnings
        warnings.simplefilter("ignore")
        import hfbuild, app.t
        fp, m = hfbuild.fingerprint(app.t.f, return_manifest=True)
        print(json.dumps({"fp": fp, "doc": m.to_json()}))
        """
    secret = "hunter2-token-value"
    one = json.loads(run_python(code, app.path, env={"API_TOKEN": secret}).stdout)
    clone = app.clone(tmp_path / "elsewhere" / "clone")
    two = json.loads(run_python(code, clone.path, env={"API_TOKEN": secret}).stdout)
    other = json.loads(run_python(code, app.path, env={"API_TOKEN": secret + "x"}).stdout)
    assert one["fp"] == two["fp"] != other["fp"]
    assert secret not in one["doc"]
    value = dict(json.loads(one["doc"])["env"])["API_TOKEN"]["secret"]
    assert value.startswith("scrypt:")
    plain = {
        hashlib.sha256(secret.encode()).hexdigest(),
        xxhash.xxh3_128_hexdigest(secret.encode()),
    }
    assert value.split(":", 1)[1] not in plain
    # The project's salt is part of it: another salt, another hash.
    salted = json.loads(
        run_python(code, app.path, env={"API_TOKEN": secret, "HFBUILD_SECRET_SALT": "s"}).stdout
    )
    assert salted["fp"] != one["fp"]


def test_untracked_env_stays_out_of_the_key(app: Repo) -> None:
    """A variable named in [tool.hfbuild] untracked-env does not change the key."""
    app.write({"pyproject.toml": '[tool.hfbuild]\nuntracked-env = ["MODE"]\n'}, commit="cfg")
    assert fp(app, MODE="a") == fp(app, MODE="b") != fp(app, LEVEL="2")


PIPELINE = {
    "data.csv": "x\n1\n2\n3\n",
    "dodo.py": """
        from hfbuild import Pipeline
        from app import t

        pipe = Pipeline()
        raw = pipe.load("raw", "csv", data_files="data.csv", split="train")
        out = pipe.map("out", raw, t.f, batched=True)

        def task_preprocess():
            yield from pipe.tasks()
        """,
}


def status_json(repo: Repo) -> list[dict[str, object]]:
    out = run_hfbuild(repo, "status", "--json")
    doc: list[dict[str, object]] = json.loads(out.stdout)
    return doc


def test_explain_and_status_name_the_variable(
    app: Repo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a build with MODE=a, MODE=b makes the map stale and explain and status --json
    say `env var MODE changed: 'a' -> 'b'`; an unrelated variable keeps it up to date."""
    app.write(PIPELINE, commit="pipeline")
    monkeypatch.setenv("MODE", "a")
    doit(app, "run", "preprocess", log=tmp_path / "log")
    monkeypatch.setenv("UNRELATED", "1")
    assert run_hfbuild(app, "status").returncode == 0
    monkeypatch.setenv("MODE", "b")
    out = run_hfbuild(app, "explain", "out")
    assert out.returncode == 1
    assert "env var MODE changed: 'a' -> 'b'" in out.stdout
    states = {s["stage"]: s for s in status_json(app)}
    assert states["raw"]["state"] == "up to date"
    assert states["out"]["reason"] == "env var MODE changed: 'a' -> 'b'"
    monkeypatch.delenv("MODE")
    out = run_hfbuild(app, "explain", "out", "--json")
    changes = json.loads(out.stdout)["changes"]
    assert [(c["part"], c["path"], c["old"], c["new"]) for c in changes] == [
        ("env", "MODE", "'a'", "unset")
    ]


def test_secret_change_is_reported_without_its_value(
    app: Repo, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A changed secret makes the stage stale; explain, status --json, the lock and the stored
    manifest never contain its value, and explain says only that it changed."""
    app.write(PIPELINE, commit="pipeline")
    old, new = "old-secret-0123", "new-secret-4567"
    monkeypatch.setenv("API_TOKEN", old)
    doit(app, "run", "preprocess", log=tmp_path / "log")
    monkeypatch.setenv("API_TOKEN", new)
    out = run_hfbuild(app, "explain", "out")
    assert "env var API_TOKEN changed (a secret: its value is not shown)" in out.stdout
    shown = out.stdout + out.stderr + run_hfbuild(app, "explain", "out", "--json").stdout
    shown += json.dumps(status_json(app))
    stored = subprocess.run(
        ["grep", "-r", "-l", "-e", old, "-e", new, str(app.path)], capture_output=True, text=True
    )
    for text in (shown, stored.stdout):
        assert old not in text and new not in text
    assert "scrypt:" not in shown  # not even the hash is shown
    lock = (app.path / "hfbuild.lock").read_text()
    assert '"secret": "scrypt:' in lock


@pytest.mark.parametrize(
    ("source", "names"),
    [
        ("import os\nos.environ['A']; os.environ.get('B'); os.getenv('C')", ["A", "B", "C"]),
        ("import os.path\nos.environ.setdefault('A', '1')\n'B' not in os.environ", ["A", "B"]),
        ("import os.path as osp\nosp.environ['A']", []),
        ("from os import environ as E, getenv as g\nE['A']; g('B')", ["A", "B"]),
        ("import os\nos.environ['A'] = '1'\ndel os.environ['B']", []),
        ("import os\nname = 'A'\nos.environ[name]; os.getenv(name)", []),
        ("environ = {}\nenviron['A']", []),
        ("def f():\n    import os\n    return os.environ['A']", ["A"]),
    ],
)
def test_scan_finds_reads_by_literal_name(source: str, names: list[str]) -> None:
    """The scan finds reads by literal name through every alias of os, environ and getenv;
    writes, deletions, computed names and other objects called `environ` are not reads."""
    import ast

    from hfbuild.source.importscan import scan_tree

    assert list(scan_tree(ast.parse(source)).env) == names
