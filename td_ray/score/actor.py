"""The Ray Data callable class that holds one teacher per actor."""
from __future__ import annotations

import numpy as np

from td_ray.config import ScoreConfig
from td_ray.score.core import CrossEncoderTeacher
from td_ray.score.seq2seq import Seq2SeqTeacher

#: Columns the actor reads from each batch.
INPUT_COLUMNS = ("qid", "pid", "query", "passage")


def load_teacher(options: ScoreConfig) -> CrossEncoderTeacher | Seq2SeqTeacher:
    """The configured teacher: a cross-encoder or a monoT5/mT5-style seq2seq reranker."""
    if options.teacher_kind == "seq2seq":
        return Seq2SeqTeacher(options.teacher, max_length=options.max_length, revision=options.teacher_revision,
                              trust_remote_code=options.trust_remote_code, true_word=options.true_word,
                              false_word=options.false_word, template=options.template, dtype=options.dtype)
    return CrossEncoderTeacher(options.teacher, options.max_length, options.teacher_revision, options.trust_remote_code)


class TeacherActor:
    """Scores batches of ``{qid, pid, query, passage}`` into ``{qid, pid, score, teacher}``; loads the model once."""

    def __init__(self, options: ScoreConfig):
        self.teacher = load_teacher(options)
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        queries, passages = [str(q) for q in batch["query"]], [str(p) for p in batch["passage"]]
        if self.options.teacher_kind == "seq2seq":
            scores = self.teacher.score(queries, passages, self.options.max_batch_tokens)
        else:
            scores = self.teacher.score(queries, passages)
        return {
            "qid": batch["qid"],
            "pid": batch["pid"],
            "score": scores,
            "teacher": np.full(len(scores), self.options.teacher, dtype=object),
        }
