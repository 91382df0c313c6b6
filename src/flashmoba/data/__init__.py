"""Data that works offline: a byte tokenizer, corpora, packed batches and long-context retrieval tasks."""

from flashmoba.data.corpus import TokenCorpus, load_corpus, natural_text
from flashmoba.data.niah import TASKS, RetrievalSample, make_sample
from flashmoba.data.packing import PackedBatch, batch_rng, pack_rows, sample_batch, sample_windows
from flashmoba.data.tokenizer import ByteTokenizer

__all__ = [
    "TASKS",
    "ByteTokenizer",
    "PackedBatch",
    "RetrievalSample",
    "TokenCorpus",
    "batch_rng",
    "load_corpus",
    "make_sample",
    "natural_text",
    "pack_rows",
    "sample_batch",
    "sample_windows",
]
