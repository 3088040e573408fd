"""The canonical encoding: typed, injective, deterministic, and never a fallback."""

from __future__ import annotations

import copy
import dataclasses
import enum
import pathlib
import typing
from collections import OrderedDict, defaultdict
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hfbuild
from hfbuild.core.canonical import dumps, encode
from tests.helpers import run_python, same


def enc(x: Any) -> str:
    return dumps(encode(x))


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=80)
)
hashables = st.recursive(
    scalars, lambda c: st.tuples(c, c) | st.frozensets(c, max_size=3), max_leaves=6
)
values = st.recursive(
    scalars,
    lambda c: (
        st.lists(c, max_size=4)
        | st.tuples(c, c)
        | st.dictionaries(hashables, c, max_size=4)
        | st.frozensets(hashables, max_size=4)
        | st.sets(hashables, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_equal_values_encode_equal(x: Any) -> None:
    """A value and a deep copy of it encode identically."""
    assert enc(x) == enc(copy.deepcopy(x))


@settings(max_examples=500, deadline=None)
@given(values, values)
def test_encoding_is_injective(a: Any, b: Any) -> None:
    """Two values encode the same if and only if they are the same value of the same type."""
    assert (enc(a) == enc(b)) == same(a, b)


def test_lookalikes_differ() -> None:
    """`1`, `True`, `1.0`, `"1"`, `b"1"`, `[1]`, `(1,)` and `{1}` all encode differently,
    as do 0.0 and -0.0, and a dict and its list of pairs."""
    vals = [
        1,
        True,
        1.0,
        "1",
        b"1",
        [1],
        (1,),
        {1},
        frozenset({1}),
        np.int64(1),
        np.float32(1),
        0.0,
        -0.0,
        {"a": 1},
        [["a", 1]],
        None,
        "None",
        1 + 0j,
    ]
    assert len({enc(v) for v in vals}) == len(vals)


def test_set_and_dict_order_do_not_matter_across_hash_seeds(tmp_path: pathlib.Path) -> None:
    """Sets of strings and dicts built in different orders encode the same in processes with
    different PYTHONHASHSEED."""
    code = (
        "from hfbuild.core.canonical import encode, dumps\n"
        "s = {f'k{i}' for i in range(50)}\n"
        "d = {f'k{i}': i for i in reversed(range(50))}\n"
        "print(dumps(encode([s, frozenset(s), d])))\n"
    )
    outs = {run_python(code, tmp_path, env={"PYTHONHASHSEED": s}).stdout for s in "017"}
    assert len(outs) == 1


class Color(enum.Enum):
    RED = 1
    BLUE = 2


@dataclasses.dataclass(frozen=True)
class Cfg:
    k: int
    name: str = "x"
    cache: dict = dataclasses.field(default_factory=dict, compare=False)  # type: ignore[type-arg]


class Point(typing.NamedTuple):
    x: int
    y: int


def test_structured_types() -> None:
    """Enums, dataclasses (every field, compare=False ones too: the transform can read
    them), NamedTuples, ordered and default dicts, and paths have their own typed encodings."""
    assert enc(Color.RED) != enc(Color.BLUE) != enc(1)
    assert enc(Cfg(1)) == enc(Cfg(1)) != enc(Cfg(2))
    assert enc(Cfg(1)) != enc(Cfg(1, cache={"seen": 1}))
    assert enc(Point(1, 2)) != enc((1, 2))
    assert enc(OrderedDict(a=1, b=2)) != enc(OrderedDict(b=2, a=1))
    assert enc({"a": 1, "b": 2}) == enc({"b": 2, "a": 1})
    assert enc(defaultdict(list, a=[1])) != enc({"a": [1]})
    assert enc(pathlib.PurePosixPath("a/b")) != enc("a/b")


def test_paths_inside_the_project_are_relative(tmp_path: pathlib.Path) -> None:
    """An absolute path under the project root encodes as root-relative, so two clones agree."""
    a = encode(tmp_path / "one" / "data.txt", root=str(tmp_path / "one"))
    b = encode(tmp_path / "two" / "data.txt", root=str(tmp_path / "two"))
    assert a == b == {"path": ["<root>", "data.txt"]}


def test_numpy_arrays_by_dtype_shape_and_bytes() -> None:
    """Arrays encode by dtype, shape and content; a view equals a copy of it."""
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    assert enc(a) == enc(a.copy()) == enc(np.ascontiguousarray(a.T).T.copy())
    assert enc(a) != enc(a.astype(np.int32)) != enc(a.reshape(4, 3))
    assert enc(a[:, ::2]) == enc(a[:, ::2].copy())
    assert enc(np.array(["a", None], dtype=object)) != enc(np.array(["a", "b"], dtype=object))


def test_datasets_features() -> None:
    """datasets.Features encode by schema, with column order significant."""
    from datasets import ClassLabel, Features, Value

    f1 = Features({"text": Value("string"), "label": ClassLabel(names=["a", "b"])})
    f2 = Features({"text": Value("string"), "label": ClassLabel(names=["a", "c"])})
    f3 = Features({"label": ClassLabel(names=["a", "b"]), "text": Value("string")})
    assert enc(f1) == enc(copy.deepcopy(f1))
    assert len({enc(f1), enc(f2), enc(f3)}) == 3


def test_tokenizer_by_saved_content(tmp_path: pathlib.Path) -> None:
    """A tokenizers.Tokenizer encodes by its saved content: using it or reloading it from
    disk changes nothing, training another vocabulary changes the encoding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    def train(words: list[str]) -> Tokenizer:
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(words, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
        return tok

    tok = train(["hello world", "hello there", "world peace"] * 10)
    before = enc(tok)
    tok.encode("hello world peace")
    assert enc(tok) == before
    tok.save(str(tmp_path / "tok.json"))
    assert enc(Tokenizer.from_file(str(tmp_path / "tok.json"))) == before
    assert enc(train(["other words entirely"] * 10)) != before


def test_tokenizer_same_in_fresh_processes(tmp_path: pathlib.Path) -> None:
    """A saved tokenizer with maps in it (special tokens of a template post-processor, added
    tokens) encodes the same in fresh processes and from a file whose keys are reordered, so
    its saved text is canonical as it is."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[BOS]", "[EOS]"]
    tok.train_from_iterator(
        ["hello world foo bar"] * 20, trainers.WordPieceTrainer(special_tokens=specials)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, i) for i, t in enumerate(specials)],
    )
    tok.add_tokens(["zz", "yy", "xx"])
    tok.save(str(tmp_path / "tok.json"))
    doc = json.loads((tmp_path / "tok.json").read_text())

    def reverse(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: reverse(x[k]) for k in reversed(list(x))}
        return [reverse(v) for v in x] if isinstance(x, list) else x

    (tmp_path / "reordered.json").write_text(json.dumps(reverse(doc), indent=1))
    code = """
        import sys
        from tokenizers import Tokenizer
        from hfbuild.core.canonical import dumps, encode
        print(dumps(encode(Tokenizer.from_file(sys.argv[1]))))
    """
    outs = {
        run_python(code, tmp_path, args=[str(tmp_path / name)]).stdout
        for name in ("tok.json", "tok.json", "tok.json", "reordered.json")
    }
    assert outs == {enc(tok) + "\n"}


def test_transformers_tokenizer_by_behaviour(tmp_path: pathlib.Path) -> None:
    """A transformers tokenizer encodes the same after being called with padding and
    truncation, and after a save and reload from another path; another maximum length or
    vocabulary encodes differently."""
    import warnings

    from tokenizers import Tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(pathlib.Path(__file__).parent.parent / "data/tokenizer.json"))

    def make(max_len: int) -> Any:
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", model_max_length=max_len
        )

    tok = make(128)
    before = enc(tok)
    tok("hello world", padding="max_length", truncation=True)
    tok(["a b c", "d"], padding=True)
    assert enc(tok) == before
    tok.save_pretrained(str(tmp_path / "saved"))
    reloaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "saved"))
    assert enc(reloaded) == before
    assert enc(make(64)) != before
    other = Tokenizer.from_str(backend.to_str())
    other.add_tokens(["brand-new-token"])
    assert (
        enc(
            PreTrainedTokenizerFast(
                tokenizer_object=other, unk_token="[UNK]", pad_token="[PAD]", model_max_length=128
            )
        )
        != before
    )


def test_custom_hook_and_registry() -> None:
    """`__hfbuild_fingerprint__` and `register_canonical` make other types hashable."""

    class Model:
        def __init__(self, w: int) -> None:
            self.w = w

        def __hfbuild_fingerprint__(self) -> Any:
            return {"w": self.w}

    class Vocab:
        def __init__(self, words: list[str]) -> None:
            self.words = words

    assert enc(Model(1)) == enc(Model(1)) != enc(Model(2))
    with pytest.raises(hfbuild.UnhashableArgumentError, match=r"args\[0\]: cannot"):
        enc([Vocab(["a"])])
    hfbuild.register_canonical(Vocab, lambda v: v.words)
    assert enc(Vocab(["a"])) == enc(Vocab(["a"])) != enc(Vocab(["b"]))


def test_cycles_and_unknown_objects_refuse() -> None:
    """A container that contains itself, or an object with no encoding, raises
    UnhashableArgumentError; nothing falls back to repr or id."""
    a: list[Any] = [1]
    a.append(a)
    with pytest.raises(hfbuild.UnhashableArgumentError, match="contains itself"):
        encode(a)
    with pytest.raises(hfbuild.UnhashableArgumentError, match=r"cfg\['handle'\]"):
        encode({"handle": object()}, "cfg")


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text(), st.text())
def test_shard_key_is_the_digest_of_its_canonical_document(
    code: str, key: str, before: str
) -> None:
    """A shard's key, whose text `shards.shard_key` writes directly, is the digest of the
    canonical encoding of its document, for any strings (quotes, controls, non-ASCII)."""
    from hfbuild.core.canonical import digest
    from hfbuild.keys import manifest as shards

    doc = {"shard": code, "input": key, "before": before or None}
    want = digest(dumps(doc).encode())
    assert shards.shard_key(code, key, before) == want


@settings(max_examples=200, deadline=None)
@given(st.text(), st.lists(st.tuples(st.text(), st.text(), st.text()), min_size=1, max_size=4))
def test_a_stages_shard_keys_are_each_shards_key(
    code: str, shards_in: list[tuple[str, str, str]]
) -> None:
    """The keys a sharded stage gives its shards (written for the stage at once) are each
    shard's own key (`shard_key`) over its content, else its input, for any strings."""
    from hfbuild.keys import manifest as shards

    ins = tuple(shards.ShardIn("train", i, "label", b, c) for i, b, c in shards_in)
    got = shards.shard_list(shards.Manifest({}, shards=ins, shard_code=code))
    assert [s.key for s in got] == [
        shards.shard_key(code, s.content or s.input, s.before) for s in ins
    ]
