"""The demo pipeline: CPython's pydoc topics -> paragraphs -> BPE tokens -> filter -> split.

`doit run preprocess` builds what is stale; `doit list --all` lists the stages; `hfbuild status`
says what is up to date and why not.
"""

# hfbuild first: it observes what the project's modules read while they are imported.
from hfbuild import Pipeline  # isort: skip

from tokenizers import Tokenizer

from demo import transforms

pipe = Pipeline()
tokenizer = Tokenizer.from_file("data/tokenizer.json")

raw = pipe.load("raw", "parquet", data_files="data/pydoc_topics.parquet", split="train")
paras = pipe.map(
    "paragraphs",
    raw,
    transforms.split_paragraphs,
    {"min_chars": 40},
    batched=True,
    remove_columns=["topic", "text"],
)
tokens = pipe.map(
    "tokens",
    paras,
    transforms.tokenize,
    {"tokenizer": tokenizer, "max_tokens": 256},
    batched=True,
)
kept = pipe.filter("kept", tokens, transforms.long_enough, {"min_tokens": 8}, batched=True)
split = pipe.apply("split", kept, transforms.train_test, {"test_size": 0.1, "seed": 0})


def task_preprocess():
    yield from pipe.tasks()
