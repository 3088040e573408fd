"""Write the demo's input data: CPython's pydoc topics as parquet, and a BPE tokenizer.

Run from the repo root: `.venv/bin/python scripts/make_demo_data.py`. Its outputs are committed
(data/pydoc_topics.parquet, data/tokenizer.json), so the demo needs no network. Both are
deterministic: the same Python version writes the same bytes.
"""

from __future__ import annotations

import pathlib
import pydoc_data.topics

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

DATA = pathlib.Path(__file__).resolve().parent.parent / "data"


def main() -> None:
    DATA.mkdir(exist_ok=True)
    topics = sorted(pydoc_data.topics.topics.items())
    table = pa.table({"topic": [t for t, _ in topics], "text": [x for _, x in topics]})
    pq.write_table(table, DATA / "pydoc_topics.parquet", compression="zstd")

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4000, min_frequency=2, special_tokens=["[UNK]", "[PAD]"], show_progress=False
    )
    tok.train_from_iterator((text for _, text in topics), trainer=trainer)
    tok.save(str(DATA / "tokenizer.json"))
    print(f"wrote {len(topics)} topics and a {tok.get_vocab_size()}-token BPE tokenizer to {DATA}")


if __name__ == "__main__":
    main()
