"""evaluate: encode the topics, search the merged index, write a TREC run and score it with ir_measures.

A ColBERT index (``index/index_meta.json`` says kind colbert) is the compressed token index, searched in PLAID's
stages (`td_ray.retrieval.plaid.TokenIndex`): each query token probes `ncells` centroids for candidate passages,
the candidates are scored by their tokens' centroids (pruned by `centroid_score_threshold`), and the best `ndocs`
are decoded and ranked by MaxSim; passages go to documents by MaxP. Only the candidates' tokens are read.

An index built from other documents, another student or other index settings than the config's is refused.

With `bm25_reference`, BM25 (bm25s) also ranks the topics over the ingested evaluation documents, as a lexical
reference logged as `bm25_<measure>`.

Output: ``evaluate/run.parquet``, ``evaluate/run.trec`` and ``evaluate/per_query.parquet``; the aggregate
metrics go to MLflow (``nDCG@20`` is stored as ``nDCG_20``) and the run file as an artifact.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from td_ray import schemas, tracking
from td_ray.config import EvaluateConfig, PipelineConfig
from td_ray.devices import use_reserved_threads
from td_ray.encoders import student_kind
from td_ray.encoders.colbert import ColBERTStudentEncoder
from td_ray.encoders.dense import StudentEncoder
from td_ray.errors import StaleIndexError
from td_ray.evaluate.core import document_run, evaluate_run, parse_measures, write_trec_run
from td_ray.fingerprint import digest, path_fingerprint
from td_ray.ray_session import ensure_ray
from td_ray.result import StageResult
from td_ray.retrieval.bm25 import bm25_rankings
from td_ray.retrieval.faiss_index import Searcher
from td_ray.retrieval.layout import (
    DELETED,
    build_path,
    check_current,
    passage_map_paths,
    read_index_meta,
    student_path,
)
from td_ray.retrieval.maxp import PassageMap, rank_documents
from td_ray.retrieval.plaid import SearchSettings, TokenIndex
from td_ray.sources import ingest
from td_ray.usage import mark_first_row
from td_ray.workspace import (
    EVAL_DOCS,
    EVAL_QRELS,
    EVAL_TOPICS,
    INDEX_META,
    PER_QUERY,
    RUN,
    RUN_TREC,
    Workspace,
)

logger = logging.getLogger(__name__)

__all__ = ["evaluate_run", "run"]


def _rank_dense(workspace: Workspace, meta: dict, model: str, topics, options: EvaluateConfig):
    """The dense run: topics encoded and searched in batches, passages aggregated to documents by MaxP."""
    deleted = build_path(workspace, meta, DELETED)
    searcher = Searcher([build_path(workspace, meta, name) for name in meta["files"]],
                        options.search_params or meta.get("search_params"),
                        np.load(deleted) if deleted.is_file() else None)
    if searcher.ntotal != meta["passages"]:
        raise StaleIndexError(f"the index in {build_path(workspace, meta)} holds {searcher.ntotal} vectors but "
                              f"{INDEX_META} says {meta['passages']}; re-run the index stage")
    passages = PassageMap(passage_map_paths(workspace, meta))
    encoder = StudentEncoder(model, max_length=options.query_maxlen, batch_size=options.batch_size)
    texts, qids = topics["text"].to_pylist(), topics["id"].to_pylist()
    runs = []
    for start in range(0, len(texts), options.batch_size):
        vectors = encoder.encode(texts[start:start + options.batch_size])
        runs += rank_documents(searcher, passages, vectors, options.depth, options.passage_depth)
        mark_first_row()
    logger.info("evaluate: %d topics searched over %d passages of %d documents (%s, %s)", len(qids), searcher.ntotal,
                meta["docs"], meta["factory"], options.search_params or meta.get("search_params") or "exact")
    return document_run(qids, runs)


def search_colbert_topics(workspace_uri: str, meta: dict, model: str, texts: list[str],
                          options: EvaluateConfig) -> list[list[tuple[str, float]]]:
    """One share of the topics, as the student encodes them (padded or cut to its query_maxlen; evaluate.query_maxlen
    does not apply), searched in the compressed token index on the device and threads this process holds, passages
    aggregated to documents by MaxP. Run in the stage's process or as a Ray task: either maps the index once."""
    threads = use_reserved_threads()
    workspace = Workspace(workspace_uri)
    settings = SearchSettings.for_depth(options.passage_depth, options.ncells, options.centroid_score_threshold,
                                        options.ndocs)
    encoder = ColBERTStudentEncoder(model, batch_size=options.batch_size)
    searcher = TokenIndex(build_path(workspace, meta), meta, settings, device=encoder.device)
    passages = PassageMap(passage_map_paths(workspace, meta))
    runs = []
    for start in range(0, len(texts), options.batch_size):
        queries = encoder.encode_queries(texts[start:start + options.batch_size])
        runs += rank_documents(searcher, passages, queries, options.depth, options.passage_depth)
        mark_first_row()
    logger.info("evaluate: ColBERT search of %d topics over %d passages of %d documents (%d tokens, %d-bit, ncells "
                "%d, threshold %s, ndocs %d) on %s with %d threads", len(texts), meta["passages"], meta["docs"],
                meta["tokens"], meta["nbits"], settings.ncells, settings.centroid_score_threshold, settings.ndocs,
                encoder.device, threads)
    return runs


def _rank_colbert(config: PipelineConfig, workspace: Workspace, meta: dict, model: str, topics):
    """The ColBERT run, its topics searched in `evaluate.search_tasks` Ray tasks (or here, for one)."""
    options = config.evaluate
    texts, qids = topics["text"].to_pylist(), topics["id"].to_pylist()
    tasks = min(options.search_tasks, max(1, len(texts)))
    if tasks == 1:
        return document_run(qids, search_colbert_topics(workspace.uri, meta, model, texts, options))
    import ray

    ensure_ray(config.ray)
    search = ray.remote(num_cpus=options.search_cpus, num_gpus=options.search_gpus)(search_colbert_topics)
    bounds = np.linspace(0, len(texts), tasks + 1).astype(int)
    pending = {search.remote(workspace.uri, meta, model, texts[a:b], options): share
               for share, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))}
    shares: dict[int, list] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        shares[pending.pop(done[0])] = ray.get(done[0])
        mark_first_row()
        logger.info("evaluate: %d of %d search tasks done", len(shares), tasks)
    return document_run(qids, [run for share in range(tasks) for run in shares[share]])


def _bm25_metrics(workspace: Workspace, topics, qrels, options: EvaluateConfig) -> dict[str, float]:
    """The measures of BM25 over the ingested evaluation documents, named `bm25_<measure>`."""
    docs = ((docid, text) for batch in workspace.iter_batches(EVAL_DOCS, ["id", "text"])
            for docid, text in zip(batch.column("id").to_pylist(), batch.column("text").to_pylist()))
    rankings = bm25_rankings(docs, workspace.row_count(EVAL_DOCS), topics["text"].to_pylist(), options.depth)
    metrics, _ = evaluate_run(document_run(topics["id"].to_pylist(), rankings), qrels, options.measures)
    logger.info("evaluate: BM25 reference over %s: %s", EVAL_DOCS, metrics)
    return {f"bm25_{name}": value for name, value in metrics.items()}


def run(config: PipelineConfig) -> StageResult:
    """Search every topic and score the run against the qrels."""
    import mlflow

    started = time.perf_counter()
    options = config.evaluate
    parse_measures(options.measures)
    workspace = Workspace(config.workspace)
    with tracking.stage_run(config, "evaluate") as run_id:
        workspace.remove_temporaries("inputs", "evaluate")
        ingest(workspace, config.data.eval_topics, "queries", "eval_topics")
        ingest(workspace, config.data.eval_qrels, "qrels", "eval_qrels")
        for table, columns in ((EVAL_TOPICS, ("id", "text")), (EVAL_QRELS, ("qid", "docid", "relevance"))):
            schemas.require_columns(workspace.read_schema(table), columns, table)
        model = student_path(config.index.model, workspace)
        meta = read_index_meta(workspace)
        if not meta:
            raise FileNotFoundError(f"no index in {workspace.path('index')}; run the index stage first")
        if meta["kind"] != student_kind(model):
            raise StaleIndexError(f"the saved index is {meta['kind']} but {model} is a {student_kind(model)} student; "
                                  "re-run the index stage")
        check_current(workspace, meta, model, config.index.model_dump(mode="json"))
        key = digest(meta.get("key"), model, path_fingerprint(model), workspace.table_identity(EVAL_TOPICS),
                     workspace.table_identity(EVAL_QRELS), options.model_dump(mode="json"))
        trec_path = workspace.local_dir("evaluate") / Path(RUN_TREC).name
        outputs = {"run": str(trec_path), "per_query": workspace.path(PER_QUERY)}
        if workspace.exists(RUN) and workspace.file_metadata(RUN).get("td_ray_inputs") == key and trec_path.is_file():
            metrics = json.loads(workspace.file_metadata(RUN)["td_ray_metrics"])
            logger.info("evaluate: unchanged (index, topics, qrels and settings), run reused from %s: %s",
                        trec_path, metrics)
            mlflow.log_artifact(str(trec_path))
            result = StageResult("evaluate", workspace.row_count(EVAL_TOPICS), time.perf_counter() - started,
                                 outputs, metrics, run_id)
            tracking.log_result(result)
            return result
        topics = workspace.read_table(EVAL_TOPICS)
        if meta["kind"] == "colbert":
            ranked = _rank_colbert(config, workspace, meta, model, topics)
        else:
            ranked = _rank_dense(workspace, meta, model, topics, options)
        write_trec_run(ranked, trec_path, options.run_tag)
        qrels = workspace.read_table(EVAL_QRELS)
        metrics, per_query = evaluate_run(ranked, qrels, options.measures)
        if options.bm25_reference:
            metrics |= _bm25_metrics(workspace, topics, qrels, options)
        workspace.write_table(per_query, PER_QUERY)
        workspace.write_table(ranked, RUN, schemas.RUN,
                              metadata={"td_ray_inputs": key, "td_ray_metrics": json.dumps(metrics)})
        mlflow.log_artifact(str(trec_path))
        result = StageResult("evaluate", topics.num_rows, time.perf_counter() - started, outputs, metrics, run_id)
        tracking.log_result(result)
    logger.info(result.summary())
    return result
