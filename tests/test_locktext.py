"""hfbuild.lock's text (issue #24: a rebuild records its stages one at a time, and each
record rewrites the lock): each stage's entry is encoded once per process and reused while
it is the same, and the text is exactly the sorted, one-space indented JSON it always was,
whatever its values (an entry is indented by hfbuild, its plain values by json's C encoder)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hfbuild.store import lockfile


def _reference(stages: dict[str, Any]) -> str:
    doc = {"hfbuild": lockfile.SCHEMA, "stages": stages}
    return json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def _entry(i: int) -> dict[str, Any]:
    return {
        "fingerprint": f"{i:032x}",
        "inputs": {"raw": f"{i + 1:032x}"} if i else {},
        "manifest": {"args": {"scale": 1.5, "name": 'é\n"x"', "keep": [], "opts": {}}},
        "rows": i * 10,
        "content_hash": None,
        "shard_hashes": {f"{k:032x}": f"{k * 7:032x}" for k in range(50)},
        "dirty": ["data/a b.parquet"],
        "manifest_files": [[f'data/p,{k}\n"].parquet', f"{k:040x}"] for k in range(30)],
    }


@pytest.mark.parametrize(
    "stages",
    [
        {},
        {"raw": _entry(0)},
        {"raw": _entry(0), "feat": _entry(1), "kept": _entry(2), "Ω": {"x": [[], [1, [2]]]}},
    ],
)
def test_the_lock_text_is_the_indented_sorted_json(stages: dict[str, Any]) -> None:
    assert lockfile.dumps(stages) == _reference(stages)
    assert lockfile.dumps(stages) == _reference(stages)  # its entries' texts reused
    assert lockfile.loads(lockfile.dumps(stages)) == stages


@pytest.mark.parametrize("was, now", [(1, True), (1, 1.0), (0, False), ("1", 1), ([1], (1,))])
def test_an_entry_equal_in_python_but_not_in_json_is_encoded_again(was: Any, now: Any) -> None:
    """1 == True == 1.0 in Python, not in the lock: a stage's text is reused only for the
    same JSON."""
    first = {"raw": {**_entry(0), "rows": was}}
    second = {"raw": {**_entry(0), "rows": now}}
    assert lockfile.dumps(first) == _reference(first)
    assert lockfile.dumps(second) == _reference(second)


# Strings that look like JSON's own punctuation, escapes and line breaks.
_TEXT = st.text(st.sampled_from([*'a,:"\\[]{} \n\t\x00\x1f', "é", "\u2028", "😀"]), max_size=6)
_PLAIN = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    _TEXT,
)
_VALUES = st.recursive(
    _PLAIN,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(st.lists(_PLAIN, max_size=3), max_size=4),  # a load's files, ragged too
        st.tuples(inner, inner),
        st.dictionaries(_TEXT, inner, max_size=4),
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(entry=st.dictionaries(_TEXT, _VALUES, max_size=5))
def test_any_entry_is_written_as_json_indents_it(entry: dict[str, Any]) -> None:
    """An entry of any plain values, nested lists (of lists), tuples and dicts: the text
    json's indenting encoder writes, byte for byte."""
    stages = {"s": entry}
    assert lockfile.dumps(stages) == _reference(stages)
