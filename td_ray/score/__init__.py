"""score: a teacher cross-encoder scores each training query's top-K candidates, as Ray Data actors.

The teacher sees English queries with English passages (`passage_lang: en`), with translated passages
(a target language: the CLIR teacher), or translated queries with translated passages (`query_lang`).
Output: ``score/scores.parquet`` (qid, pid, score, teacher), ids and scores only, so one English score table
serves every translated language in the distill stage.
"""
from __future__ import annotations

import json
import logging
import time

from td_ray import schemas, tracking
from td_ray.config import PipelineConfig, ScoreConfig
from td_ray.ray_session import ensure_ray
from td_ray.raydata import actor_map_args, write_stream
from td_ray.result import StageResult
from td_ray.score.actor import TeacherActor
from td_ray.score.core import CrossEncoderTeacher, build_pairs, check_teacher
from td_ray.score.importers import import_score_file
from td_ray.score.seq2seq import Seq2SeqTeacher, check_seq2seq_teacher
from td_ray.sources import ingest
from td_ray.workspace import CANDIDATES, SCORES, Workspace, translated

logger = logging.getLogger(__name__)

__all__ = ["CrossEncoderTeacher", "Seq2SeqTeacher", "TeacherActor", "run"]

_BLOCK_ROWS = 2048


def run(config: PipelineConfig) -> StageResult:
    """Score every (query, candidate) pair once with the configured teacher."""
    import ray.data

    started = time.perf_counter()
    options = config.score
    workspace = Workspace(config.workspace)
    if options.import_scores is not None:
        return _import(config, workspace, started)
    if options.teacher_kind == "seq2seq":  # before any work
        check_seq2seq_teacher(options.teacher, revision=options.teacher_revision,
                              trust_remote_code=options.trust_remote_code, true_word=options.true_word,
                              false_word=options.false_word)
    else:
        check_teacher(options.teacher, options.teacher_revision, options.trust_remote_code)
    with tracking.stage_run(config, "score") as run_id:
        ingest(workspace, config.data.passages, "docs", "passages")
        ingest(workspace, config.data.train_queries, "queries", "train_queries")
        ingest(workspace, config.data.candidates, "candidates", "candidates")
        passages_table = translated("passages", options.passage_lang)
        queries_table = translated("queries", options.query_lang)
        for table, columns in ((CANDIDATES, ("qid", "pid", "rank")), (queries_table, ("id", "text")),
                               (passages_table, ("id", "text"))):
            schemas.require_columns(workspace.read_schema(table), columns, table)
        pairs = build_pairs(workspace.read_table(CANDIDATES), workspace.read_table(queries_table),
                            workspace.read_table(passages_table), options.top_k)
        ensure_ray(config.ray)
        blocks = [pairs.slice(start, _BLOCK_ROWS) for start in range(0, pairs.num_rows, _BLOCK_ROWS)]
        dataset = ray.data.from_arrow(blocks).map_batches(
            TeacherActor,
            fn_constructor_kwargs={"options": options},
            **actor_map_args(options),
        )
        rows = write_stream(dataset, workspace, SCORES, schemas.SCORES, ["qid", "pid"], pairs.select(["qid", "pid"]),
                            metadata={"td_ray_provenance": json.dumps(provenance(options))})
        result = StageResult("score", rows, time.perf_counter() - started, {"scores": workspace.path(SCORES)},
                             {"queries": float(len(set(pairs["qid"].to_pylist())))}, run_id)
        tracking.log_result(result)
    logger.info(result.summary())
    return result


def provenance(options: ScoreConfig) -> dict:
    """How the scores were made, stored with the table (and beside an exported score file)."""
    made = {"source": "model", "teacher": options.teacher, "teacher_revision": options.teacher_revision,
            "teacher_kind": options.teacher_kind, "query_lang": options.query_lang, "passage_lang": options.passage_lang,
            "max_length": options.max_length, "top_k": options.top_k}
    if options.teacher_kind == "seq2seq":
        made |= {"template": options.template, "true_word": options.true_word, "false_word": options.false_word,
                 "score": "log_softmax([false, true])[true] at the first decoding step"}
    else:
        made["score"] = "relevance logit"
    return made


def _import(config: PipelineConfig, workspace: Workspace, started: float) -> StageResult:
    """Import `score.import_scores` as the score table: validated line by line, short lists per distill's policy."""
    source = config.score.import_scores
    with tracking.stage_run(config, "score") as run_id:
        summary = import_score_file(workspace, SCORES, source.path, source.format, teacher=config.score.provenance,
                                    nway=config.distill.nway, short_list=config.distill.short_list_policy)
        result = StageResult("score", summary.rows, time.perf_counter() - started, {"scores": workspace.path(SCORES)},
                             {"queries": float(summary.queries), "skipped_queries": float(len(summary.skipped))},
                             run_id)
        tracking.log_result(result)
    logger.info(result.summary())
    return result
