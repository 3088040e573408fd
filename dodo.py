"""The demo pipeline: CPython's pydoc topics -> paragraphs -> BPE tokens -> filter -> split.

`doit run preprocess` builds what is stale; `doit list --all` lists the stages; `hfbuild status`
says what is up to date and why not.

Stages name their functions as `"module:qualname"`: dodo.py imports none of them, so a run with
nothing to build answers from hfbuild's record without importing `demo.transforms` (or the
tokenizer library its `tokenize` uses).
"""

from hfbuild import Pipeline

pipe = Pipeline()

raw = pipe.load("raw", "parquet", data_files="data/pydoc_topics.parquet", split="train")
paras = pipe.map(
    "paragraphs",
    raw,
    "demo.transforms:split_paragraphs",
    {"min_chars": 40},
    batched=True,
    remove_columns=["topic", "text"],
)
tokens = pipe.map(
    "tokens",
    paras,
    "demo.transforms:tokenize",
    # A path argument keys the file's content (the tokenizer is read by Rust, unobserved).
    {"tokenizer_path": "data/tokenizer.json", "max_tokens": 256},
    batched=True,
)
kept = pipe.filter("kept", tokens, "demo.transforms:long_enough", {"min_tokens": 8}, batched=True)
split = pipe.apply("split", kept, "demo.transforms:train_test", {"test_size": 0.1, "seed": 0})


def task_preprocess():
    yield from pipe.tasks()
