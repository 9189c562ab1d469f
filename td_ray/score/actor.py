"""The Ray Data callable class that holds one teacher per actor, looks pair texts up and commits scored blocks."""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from td_ray import schemas
from td_ray.config import ScoreConfig
from td_ray.score.core import CrossEncoderTeacher, write_todo
from td_ray.score.seq2seq import Seq2SeqTeacher
from td_ray.textjoin import open_lookup
from td_ray.workspace import Workspace

#: Columns the actor reads from each batch (the stage's work list).
INPUT_COLUMNS = ("qid", "pid")


def load_teacher(options: ScoreConfig) -> CrossEncoderTeacher | Seq2SeqTeacher:
    """The configured teacher: a cross-encoder or a monoT5/mT5-style seq2seq reranker."""
    if options.teacher_kind == "seq2seq":
        return Seq2SeqTeacher(options.teacher, max_length=options.max_length, revision=options.teacher_revision,
                              trust_remote_code=options.trust_remote_code, true_word=options.true_word,
                              false_word=options.false_word, template=options.template, dtype=options.dtype)
    return CrossEncoderTeacher(options.teacher, options.max_length, options.teacher_revision, options.trust_remote_code)


class TeacherActor:
    """Scores batches of ``{qid, pid}`` pairs and commits each as one block of ``{qid, pid, score, teacher}``.

    Texts are looked up by id in the exported query and passage files (memory-mapped), so the pairs travel
    as ids. Returns one row of counts per block; `missing` names ids without text (nothing is scored then).
    """

    def __init__(self, options: ScoreConfig, teacher: str, queries: str, passages: str, workspace: str,
                 directory: str):
        self.workspace, self.directory = Workspace(workspace), directory
        # `teacher`: the model as shared with the cluster; the table names it as the config does
        self.teacher = load_teacher(options.model_copy(update={"teacher": self.workspace.resolve(teacher)}))
        self.options = options
        self.queries = open_lookup(self.workspace, queries, f"training queries ({options.query_lang})")
        self.passages = open_lookup(self.workspace, passages, f"passages ({options.passage_lang})")

    def __call__(self, batch: pa.Table) -> dict[str, list]:
        started = time.perf_counter()
        qids, pids = batch["qid"].to_pylist(), batch["pid"].to_pylist()
        queries, passages = self.queries.get(qids), self.passages.get(pids)
        lacking = [f"query {qid!r}" for qid, text in zip(qids, queries) if text is None][:3]
        lacking += [f"passage {pid!r}" for pid, text in zip(pids, passages) if text is None][:3]
        if lacking:
            return {"block": [""], "rows": [0], "seconds": [0.0], "missing": [f"no text for {', '.join(lacking)}"]}
        if self.options.teacher_kind == "seq2seq":
            scores = self.teacher.score(queries, passages, self.options.max_batch_tokens)
        else:
            scores = self.teacher.score(queries, passages)
        block = pa.table({"qid": batch["qid"], "pid": batch["pid"], "score": np.asarray(scores, np.float32),
                          "teacher": pa.array([self.options.teacher] * batch.num_rows, pa.string())})
        name = self.workspace.commit_block(self.directory, block, schemas.SCORES, ["qid", "pid"])
        return {"block": [name], "rows": [batch.num_rows], "seconds": [time.perf_counter() - started],
                "missing": [""]}


def plan_task(workspace: Workspace, directory: str, top_k: int) -> int:
    """Ray task: write the work list against the committed blocks (their key hashes, 8 bytes a pair, are held
    here, off the driver); returns the pairs to score."""
    return write_todo(workspace, directory, top_k)
