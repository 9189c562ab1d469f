"""The index stage's Ray shell: the Data actors that hold one student encoder each (dense passages, or ColBERT
token vectors), and the tasks that train the index, add each shard and merge them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from td_ray.encoders.dense import StudentEncoder
from td_ray.encoders.passages import split_passages
from td_ray.index.core import sample_vectors, shard_batches
from td_ray.keys import Digest
from td_ray.retrieval import faiss_index

#: Columns the actor reads from each batch.
INPUT_COLUMNS = ("id", "text")


def _texts(batch: dict[str, np.ndarray]) -> list[str]:
    return ["" if text is None else str(text) for text in batch["text"]]


class EncoderActor:
    """Encodes batches of documents ``{id, text}`` into passage rows ``{docid, passage, vector}``: each document cut
    into windows of `passages` = (length, stride) student tokens, or kept whole (cut at max_length) when None.
    Loads the model once."""

    def __init__(self, model: str, max_length: int, batch_size: int, passages: tuple[int, int] | None):
        self.encoder = StudentEncoder(model, max_length=max_length, batch_size=batch_size)
        self.passages = passages

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        per_doc = _passages(self.encoder.tokenizer, _texts(batch), self.passages)
        counts = np.array([len(parts) for parts in per_doc], dtype=np.int64)
        vectors = self.encoder.encode([part for parts in per_doc for part in parts])
        return pa.table({
            "docid": pa.array(np.repeat(np.asarray(batch["id"], dtype=object), counts), pa.string()),
            "passage": pa.array(np.concatenate([np.arange(n) for n in counts]) if len(counts) else [], pa.int32()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]),
        })


def _passages(tokenizer, texts: list[str], passages: tuple[int, int] | None) -> list[list[str]]:
    """Each document's passages (windows of student tokens), or the document itself when `passages` is None."""
    return [[text] for text in texts] if passages is None else split_passages(tokenizer, texts, *passages)


class ColBERTEncoderActor:
    """Encodes batches of documents ``{id, text}`` into passage rows ``{docid, passage, tokens, vectors}``: the
    ColBERT student's vectors of the tokens MaxSim uses, flattened, as an Arrow large_list column (64-bit offsets:
    a shard's tokens x dim pass 2^31 values at about 93 k passages)."""

    def __init__(self, model: str, max_length: int, batch_size: int, passages: tuple[int, int] | None):
        from td_ray.encoders.colbert import ColBERTStudentEncoder

        self.encoder = ColBERTStudentEncoder(model, max_length=max_length, batch_size=batch_size)
        self.passages = passages

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        per_doc = _passages(self.encoder.tokenizer.hf, _texts(batch), self.passages)
        counts = np.array([len(parts) for parts in per_doc], dtype=np.int64)
        encoded = self.encoder.encode_documents([part for parts in per_doc for part in parts])
        tokens = np.array([len(vectors) for vectors in encoded], dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(tokens.astype(np.int64) * self.encoder.dim)])
        values = np.concatenate([vectors.reshape(-1) for vectors in encoded]) if encoded else np.zeros(0)
        return pa.table({
            "docid": pa.array(np.repeat(np.asarray(batch["id"], dtype=object), counts), pa.string()),
            "passage": pa.array(np.concatenate([np.arange(n) for n in counts]) if len(counts) else [], pa.int32()),
            "tokens": tokens,
            "vectors": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.float32))),
        })


def train_task(table: str, plan: faiss_index.IndexPlan, sample: int, rows: int, out: str, device: str) -> int:
    """Ray task: train the plan's index on about `sample` vectors drawn evenly from the table, save it empty."""
    vectors = sample_vectors(table, rows, sample, plan.dim)
    faiss_index.write_atomic(faiss_index.train(plan, vectors, device), Path(out))
    return len(vectors)


def shard_task(table: str, shard: int, trained: str, out: str, device: str) -> Digest:
    """Ray task: add the shard's own row groups of the vector table to a copy of the trained index, write it."""
    return faiss_index.add_shard(Path(trained), shard_batches(table, shard), Path(out), device)


def merge_task(trained: str, shards: list[str], index: str, data: str) -> int:
    """Ray task: merge IVF shards into one index whose inverted lists are one on-disk file."""
    return faiss_index.merge_on_disk(Path(trained), [Path(path) for path in shards], Path(index), Path(data))
