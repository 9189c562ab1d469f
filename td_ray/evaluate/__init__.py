"""evaluate: encode the topics, search the merged index, write a TREC run and score it with ir_measures.

Output: ``evaluate/run.parquet``, ``evaluate/run.trec`` and ``evaluate/per_query.parquet``; the aggregate
metrics go to MLflow (``nDCG@20`` is stored as ``nDCG_20``) and the run file as an artifact.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import faiss

from td_ray import schemas, tracking
from td_ray.config import PipelineConfig
from td_ray.distill.model import StudentEncoder
from td_ray.evaluate.core import evaluate_run, parse_measures, rank, write_trec_run
from td_ray.index import student_path
from td_ray.index.core import searchable
from td_ray.result import StageResult
from td_ray.sources import ingest
from td_ray.workspace import (
    DOC_IDS,
    EVAL_QRELS,
    EVAL_TOPICS,
    FAISS_INDEX,
    PER_QUERY,
    RUN,
    RUN_TREC,
    Workspace,
)

logger = logging.getLogger(__name__)

__all__ = ["evaluate_run", "run"]


def run(config: PipelineConfig) -> StageResult:
    """Search every topic and score the run against the qrels."""
    import mlflow

    started = time.perf_counter()
    options = config.evaluate
    parse_measures(options.measures)
    workspace = Workspace(config.workspace)
    with tracking.stage_run(config, "evaluate") as run_id:
        ingest(workspace, config.data.eval_topics, "queries", "eval_topics")
        ingest(workspace, config.data.eval_qrels, "qrels", "eval_qrels")
        for table, columns in ((EVAL_TOPICS, ("id", "text")), (EVAL_QRELS, ("qid", "docid", "relevance")), (DOC_IDS, ("faiss_id", "docid"))):
            schemas.require_columns(workspace.read_schema(table), columns, table)
        index_path = Path(workspace.path(FAISS_INDEX))
        if not index_path.is_file():
            raise FileNotFoundError(f"no index at {index_path}; run the index stage first")
        index = searchable(faiss.read_index(str(index_path)))
        mapping = workspace.read_table(DOC_IDS)
        docids = dict(zip(mapping["faiss_id"].to_pylist(), mapping["docid"].to_pylist()))
        topics = workspace.read_table(EVAL_TOPICS)
        encoder = StudentEncoder(student_path(config, workspace), max_length=options.query_maxlen)
        ranked = rank(index, docids, topics["id"].to_pylist(), encoder.encode(topics["text"].to_pylist()), options.depth)
        workspace.write_table(ranked, RUN, schemas.RUN)
        trec_path = workspace.local_dir("evaluate") / Path(RUN_TREC).name
        write_trec_run(ranked, trec_path, options.run_tag)
        metrics, per_query = evaluate_run(ranked, workspace.read_table(EVAL_QRELS), options.measures)
        workspace.write_table(per_query, PER_QUERY)
        mlflow.log_artifact(str(trec_path))
        result = StageResult("evaluate", topics.num_rows, time.perf_counter() - started,
                             {"run": str(trec_path), "per_query": workspace.path(PER_QUERY)}, metrics, run_id)
        tracking.log_result(result)
    logger.info(result.summary())
    return result
