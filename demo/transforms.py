"""The demo's dataset transforms. They import nothing heavy at module level: doit imports this
module on every run, even when nothing is stale."""

from __future__ import annotations

import functools
from typing import Any

from demo.text import paragraphs


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    from tokenizers import Tokenizer  # imported by a build only

    return Tokenizer.from_file(path)


def split_paragraphs(batch: dict[str, list[Any]], min_chars: int = 40) -> dict[str, list[Any]]:
    """One row per paragraph of each topic's text (a batched map that changes the row count)."""
    topics, paras, index = [], [], []
    for topic, text in zip(batch["topic"], batch["text"], strict=True):
        for i, p in enumerate(paragraphs(text)):
            if len(p) >= min_chars:
                topics.append(topic)
                paras.append(p)
                index.append(i)
    return {"topic": topics, "paragraph": paras, "index": index}


def tokenize(batch: dict[str, list[Any]], tokenizer_path: str, max_tokens: int) -> dict[str, Any]:
    """Token ids of each paragraph with the trained BPE tokenizer, truncated to max_tokens."""
    encodings = _tokenizer(tokenizer_path).encode_batch(batch["paragraph"])
    ids = [e.ids[:max_tokens] for e in encodings]
    return {"input_ids": ids, "n_tokens": [len(e.ids) for e in encodings]}


def long_enough(batch: dict[str, list[Any]], min_tokens: int) -> list[bool]:
    return [n >= min_tokens for n in batch["n_tokens"]]


def train_test(ds: Any, test_size: float, seed: int) -> Any:
    """A seeded train/test split: reproducible, so `hfbuild verify --rebuild` can check it."""
    return ds.train_test_split(test_size=test_size, seed=seed)
