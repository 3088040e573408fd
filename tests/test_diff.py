"""The words `status` and `explain` use for each kind of change between two manifests."""

from __future__ import annotations

from typing import Any

from hfbuild.core.canonical import encode
from hfbuild.keys.diff import diff, render


def manifest(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "hfbuild": 1,
        "kind": "map",
        "inputs": ["f" * 32],
        "options": {"batched": encode(True), "batch_size": encode(1000)},
        "code": {"target": {"module": "m", "qualname": "f"}, "files": [["m.py", "a" * 40]]},
        "args": {"fn_kwargs": encode({"cfg": {"lr": 0.1, "layers": [1, 2]}, "seed": 0})},
        "packages": ["numpy==2.0.0", "tokenizers==0.20.0"],
    }
    doc.update(over)
    return doc


def texts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [c.describe() for c in diff(old, new)]


def test_package_version_change() -> None:
    """A package upgrade names the package and both versions; a new package is 'added'."""
    new = manifest(packages=["numpy==2.1.0", "regex==1.0", "tokenizers==0.20.0"])
    assert texts(manifest(), new) == [
        "package numpy changed: 2.0.0 -> 2.1.0",
        "package regex added (1.0)",
    ]


def test_nested_argument_and_option_changes() -> None:
    """A nested argument is named by its full path with Python-like values; options too."""
    new = manifest(
        args={"fn_kwargs": encode({"cfg": {"lr": 0.25, "layers": [1, 2, 3]}, "seed": 0})},
        options={"batched": encode(True), "batch_size": encode(64)},
    )
    assert texts(manifest(), new) == [
        "argument fn_kwargs['cfg']['layers'] changed: [1, 2] -> [1, 2, 3]",
        "argument fn_kwargs['cfg']['lr'] changed: 0.1 -> 0.25",
        "option options.batch_size changed: 1000 -> 64",
    ]


def test_callable_and_file_changes() -> None:
    """Another function, and another blob of a file (ids abbreviated to 12 digits)."""
    new = manifest(
        code={
            "target": {"module": "m", "qualname": "g"},
            "files": [["m.py", "b" * 40], ["n.py", "c" * 40]],
        }
    )
    assert texts(manifest(), new) == [
        "callable target changed: m.f -> m.g",
        f"code file m.py changed: {'a' * 12} -> {'b' * 12}",
        f"code file n.py added ({'c' * 12})",
    ]


def test_render_reads_like_python() -> None:
    """Encoded values render back to readable Python."""
    assert (
        render(encode({"a": (1, 2.5), "b": None, "c": frozenset({"x"})}))
        == "{'a': (1, 2.5), 'b': None, 'c': frozenset({'x'})}"
    )


def test_environment_variable_changes() -> None:
    """An env var change shows old and new values, `unset` for an absent one, `not read` for
    one the code did not read before; a secret says only that it changed."""
    old = manifest(env=[["MODE", "a"], ["OPT", None], ["API_TOKEN", {"secret": "scrypt:1"}]])
    new = manifest(
        env=[["MODE", "b"], ["OPT", ""], ["API_TOKEN", {"secret": "scrypt:2"}], ["NEW", "x"]]
    )
    assert texts(old, new) == [
        "env var API_TOKEN changed (a secret: its value is not shown)",
        "env var MODE changed: 'a' -> 'b'",
        "env var NEW changed: not read -> 'x'",
        "env var OPT changed: unset -> ''",
    ]
    assert "scrypt" not in repr(diff(old, new))
    gone = manifest(env=[["API_TOKEN", None]])
    assert texts(old, gone)[0] == "env var API_TOKEN changed: <secret> -> unset"


def test_runtime_versions() -> None:
    """A datasets or pyarrow upgrade is a package change; a new Python names both versions."""
    old = manifest(packages=["datasets==3.1.0", "pyarrow==17.0.0", "python==3.10"])
    new = manifest(packages=["datasets==3.2.0", "pyarrow==17.0.0", "python==3.11"])
    assert texts(old, new) == ["package datasets changed: 3.1.0 -> 3.2.0", "Python 3.10 -> 3.11"]


def test_reduced_objects_render_by_their_arguments() -> None:
    """A C-implemented argument (itemgetter) is shown by its type and arguments."""
    import operator

    old = manifest(args={"fn_kwargs": encode({"key": operator.itemgetter("a")})})
    new = manifest(args={"fn_kwargs": encode({"key": operator.itemgetter("b")})})
    assert texts(old, new) == [
        "argument fn_kwargs['key'] changed: itemgetter('a') -> itemgetter('b')"
    ]


def test_module_value_change() -> None:
    """A module value set at run time reads 'module value m.X: source -> value', back to
    the source the other way; a name set from outside reads 'as its source binds it'."""

    def with_values(*entries: Any) -> dict[str, Any]:
        code = {**manifest()["code"], "module_values": [list(e) for e in entries]}
        return manifest(code=code)

    plain = manifest()
    set_ = with_values(("m.MAX_LEN", {"source": encode(128), "value": encode(256)}))
    assert texts(plain, set_) == ["module value m.MAX_LEN: 128 -> 256"]
    assert texts(set_, plain) == ["module value m.MAX_LEN: 256 -> 128"]
    extra = with_values(("m.EXTRA", {"value": encode((1, 2))}))
    assert texts(plain, extra) == ["module value m.EXTRA: as its source binds it -> (1, 2)"]
