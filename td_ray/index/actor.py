"""The Ray Data callable class that holds one student encoder per actor."""
from __future__ import annotations

import numpy as np

from td_ray.distill.model import StudentEncoder

#: Columns the actor reads from each batch.
INPUT_COLUMNS = ("id", "text")


class EncoderActor:
    """Encodes batches of ``{id, text}`` into ``{docid, vector}``; loads the model once."""

    def __init__(self, model: str, max_length: int, batch_size: int):
        self.encoder = StudentEncoder(model, max_length=max_length, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, object]:
        vectors = self.encoder.encode(["" if text is None else str(text) for text in batch["text"]])
        return {"docid": batch["id"], "vector": list(vectors)}
