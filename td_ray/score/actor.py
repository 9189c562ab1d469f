"""The score stage's two Ray Data steps, as the batch-inference pattern splits them: a CPU step looks pair texts up
and tokenizes them; a GPU step (the teacher) runs only the forward passes and commits each scored block."""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from td_ray import devices, schemas
from td_ray.config import ScoreConfig
from td_ray.score.core import CrossEncoderPairs, CrossEncoderTeacher, write_todo
from td_ray.score.seq2seq import Seq2SeqPairs, Seq2SeqTeacher
from td_ray.textjoin import open_lookup
from td_ray.workspace import Workspace

#: Columns the tokenizing step reads from each batch (the stage's work list).
INPUT_COLUMNS = ("qid", "pid")
#: Token columns the tokenizing step adds (`token_type_ids` only for models that have them).
TOKEN_COLUMNS = ("input_ids", "token_type_ids")


def tokenizer_map_args(options: ScoreConfig) -> dict:
    """`map_batches` arguments of the CPU step: `tokenizers` actors on `num_cpus_per_tokenizer` CPUs each and no
    GPU, cutting the work list into the teacher's blocks."""
    import ray.data

    return {"compute": ray.data.ActorPoolStrategy(size=options.tokenizers), "num_cpus": options.num_cpus_per_tokenizer,
            "batch_size": options.batch_size}


def load_pairs(options: ScoreConfig) -> CrossEncoderPairs | Seq2SeqPairs:
    """The configured teacher's tokenizer (and template), without its weights."""
    if options.teacher_kind == "seq2seq":
        return Seq2SeqPairs(options.teacher, max_length=options.max_length, revision=options.teacher_revision,
                            trust_remote_code=options.trust_remote_code, true_word=options.true_word,
                            false_word=options.false_word, template=options.template)
    return CrossEncoderPairs(options.teacher, options.max_length, options.teacher_revision, options.trust_remote_code)


def load_teacher(options: ScoreConfig) -> CrossEncoderTeacher | Seq2SeqTeacher:
    """The configured teacher: a cross-encoder or a monoT5/mT5-style seq2seq reranker."""
    if options.teacher_kind == "seq2seq":
        return Seq2SeqTeacher(options.teacher, max_length=options.max_length, revision=options.teacher_revision,
                              trust_remote_code=options.trust_remote_code, true_word=options.true_word,
                              false_word=options.false_word, template=options.template, dtype=options.dtype)
    return CrossEncoderTeacher(options.teacher, options.max_length, options.teacher_revision, options.trust_remote_code)


class PairTokenizer:
    """CPU step: ``{qid, pid}`` to ``{qid, pid, input_ids[, token_type_ids], missing}``.

    Texts are looked up by id in the exported query and passage files (memory-mapped), so pairs travel as ids until
    here. `missing` (every row of the batch) names ids without text; nothing is tokenized then.
    """

    def __init__(self, options: ScoreConfig, teacher: str, queries: str, passages: str, workspace: str):
        devices.use_reserved_threads()
        self.workspace = Workspace(workspace)
        self.pairs = load_pairs(options.model_copy(update={"teacher": self.workspace.resolve(teacher)}))
        self.queries = open_lookup(self.workspace, queries, f"training queries ({options.query_lang})")
        self.passages = open_lookup(self.workspace, passages, f"passages ({options.passage_lang})")

    def __call__(self, batch: pa.Table) -> pa.Table:
        qids, pids = batch["qid"].to_pylist(), batch["pid"].to_pylist()
        queries, passages = self.queries.get(qids), self.passages.get(pids)
        lacking = [f"query {qid!r}" for qid, text in zip(qids, queries) if text is None][:3]
        lacking += [f"passage {pid!r}" for pid, text in zip(pids, passages) if text is None][:3]
        if lacking:
            return batch.select(["qid", "pid"]).append_column(
                "missing", pa.array([f"no text for {', '.join(lacking)}"] * batch.num_rows))
        table = batch.select(["qid", "pid"])
        for name, rows in self.pairs.encode(queries, passages).items():
            table = table.append_column(name, pa.array(rows, pa.list_(pa.int32())))
        return table.append_column("missing", pa.array([""] * batch.num_rows))


class TeacherActor:
    """GPU step: scores tokenized pairs in token-budget batches (longest first) and commits each Ray Data batch as one
    block of ``{qid, pid, score, teacher}``; returns one row of counts per block."""

    def __init__(self, options: ScoreConfig, teacher: str, workspace: str, directory: str, lease: str | None = None):
        self.workspace, self.directory, self.lease = Workspace(workspace), directory, lease
        # `teacher`: the model as shared with the cluster; the table names it as the config does
        self.teacher = load_teacher(options.model_copy(update={"teacher": self.workspace.resolve(teacher)}))
        self.options = options

    def __call__(self, batch: pa.Table) -> dict[str, list]:
        started = time.perf_counter()
        missing = pc.max(batch["missing"]).as_py() if batch.num_rows else ""
        if missing:
            return {"block": [""], "rows": [0], "seconds": [0.0], "finished": [time.time()], "host_seconds": [0.0],
                    "missing": [missing]}
        encoded = {name: batch[name].to_pylist() for name in TOKEN_COLUMNS if name in batch.column_names}
        scores = self.teacher.score_encoded(encoded, self.options.max_batch_tokens)
        block = pa.table({"qid": batch["qid"], "pid": batch["pid"], "score": np.asarray(scores, np.float32),
                          "teacher": pa.array([self.options.teacher] * batch.num_rows, pa.string())})
        name = self.workspace.commit_block(self.directory, block, schemas.SCORES, ["qid", "pid"], self.lease)
        seconds = time.perf_counter() - started
        return {"block": [name], "rows": [batch.num_rows], "seconds": [seconds], "finished": [time.time()],
                "host_seconds": [seconds - self.teacher.model_seconds], "missing": [""]}


def plan_task(workspace: Workspace, directory: str, top_k: int) -> int:
    """Ray task: write the work list against the committed blocks (their key hashes, 8 bytes a pair, are held
    here, off the driver); returns the pairs to score."""
    return write_todo(workspace, directory, top_k)
