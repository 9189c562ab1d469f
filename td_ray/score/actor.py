"""The Ray Data callable class that holds one teacher per actor."""
from __future__ import annotations

import numpy as np

from td_ray.score.core import CrossEncoderTeacher

#: Columns the actor reads from each batch.
INPUT_COLUMNS = ("qid", "pid", "query", "passage")


class CrossEncoderActor:
    """Scores batches of ``{qid, pid, query, passage}`` into ``{qid, pid, score, teacher}``; loads the model once."""

    def __init__(self, model: str, max_length: int, revision: str | None, trust_remote_code: bool, teacher_id: str):
        self.teacher = CrossEncoderTeacher(model, max_length, revision, trust_remote_code)
        self.teacher_id = teacher_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores = self.teacher.score([str(q) for q in batch["query"]], [str(p) for p in batch["passage"]])
        return {
            "qid": batch["qid"],
            "pid": batch["pid"],
            "score": scores,
            "teacher": np.full(len(scores), self.teacher_id, dtype=object),
        }
