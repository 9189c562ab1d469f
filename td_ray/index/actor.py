"""The Ray Data callable classes that hold one student encoder per actor (dense, or ColBERT token vectors)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from td_ray.distill.model import StudentEncoder

#: Columns the actor reads from each batch.
INPUT_COLUMNS = ("id", "text")


def _texts(batch: dict[str, np.ndarray]) -> list[str]:
    return ["" if text is None else str(text) for text in batch["text"]]


class EncoderActor:
    """Encodes batches of ``{id, text}`` into ``{docid, vector}``; loads the model once."""

    def __init__(self, model: str, max_length: int, batch_size: int):
        self.encoder = StudentEncoder(model, max_length=max_length, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, object]:
        vectors = self.encoder.encode(_texts(batch))
        return {"docid": batch["id"], "vector": list(vectors)}


class ColBERTEncoderActor:
    """Encodes batches of ``{id, text}`` into ``{docid, tokens, vectors}``: the ColBERT student's vectors of the
    tokens MaxSim uses, flattened, as an Arrow large_list column (64-bit offsets: a shard's tokens x dim pass
    2^31 values at about 93 k documents)."""

    def __init__(self, model: str, max_length: int, batch_size: int):
        from td_ray.distill.colbert import ColBERTStudentEncoder

        self.encoder = ColBERTStudentEncoder(model, max_length=max_length, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        documents = self.encoder.encode_documents(_texts(batch))
        tokens = np.array([len(vectors) for vectors in documents], dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(tokens.astype(np.int64) * self.encoder.dim)])
        values = np.concatenate([vectors.reshape(-1) for vectors in documents]) if documents else np.zeros(0)
        return pa.table({
            "docid": pa.array(list(batch["id"]), type=pa.string()),
            "tokens": tokens,
            "vectors": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.float32))),
        })
