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

import logging

import numpy as np

from td_ray import schemas
from td_ray.config import EvaluateConfig, PipelineConfig
from td_ray.devices import use_reserved_threads
from td_ray.encoders import student_kind
from td_ray.encoders.colbert import ColBERTStudentEncoder
from td_ray.encoders.dense import StudentEncoder
from td_ray.errors import StaleIndexError
from td_ray.evaluate.core import document_run, evaluate_run, parse_measures, trec_run_text
from td_ray.fingerprint import digest, path_fingerprint
from td_ray.result import StageResult
from td_ray.retrieval.bm25 import bm25_rankings
from td_ray.retrieval.faiss_index import MERGED_LISTS, Searcher
from td_ray.retrieval.layout import (
    DELETED,
    build_folder,
    build_path,
    check_current,
    passage_map_paths,
    read_index_meta,
    student_path,
)
from td_ray.retrieval.maxp import PassageMap, rank_documents
from td_ray.retrieval.plaid import SearchSettings, TokenIndex
from td_ray.stage import Outcome, Source, Stage, StageContext, run_stage
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

__all__ = ["STAGE", "evaluate_run", "run"]


def _rank_dense(workspace: Workspace, meta: dict, model: str, topics, options: EvaluateConfig):
    """The dense run: topics encoded and searched in batches, passages aggregated to documents by MaxP."""
    deleted = build_path(workspace, meta, DELETED)
    build_path(workspace, meta, MERGED_LISTS)  # beside a merged IVF index (copied to this node with it)
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
    aggregated to documents by MaxP. Run in the stage's process or as a Ray task: either maps the index once (copied to
    its node first when the workspace is an object store). `model` may be a `Workspace.share` reference."""
    threads = use_reserved_threads()
    workspace = Workspace(workspace_uri)
    settings = SearchSettings.for_depth(options.passage_depth, options.ncells, options.centroid_score_threshold,
                                        options.ndocs)
    encoder = ColBERTStudentEncoder(workspace.resolve(model), batch_size=options.batch_size)
    searcher = TokenIndex(build_folder(workspace, meta), meta, settings, device=encoder.device)
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


def _rank_colbert(context: StageContext, meta: dict, model: str, topics):
    """The ColBERT run, its topics searched in `evaluate.search_tasks` Ray tasks (or here, for one)."""
    options, workspace = context.options, context.workspace
    texts, qids = topics["text"].to_pylist(), topics["id"].to_pylist()
    tasks = min(options.search_tasks, max(1, len(texts)))
    if tasks == 1:
        return document_run(qids, search_colbert_topics(workspace.uri, meta, model, texts, options))
    import ray

    context.ray()
    search = ray.remote(num_cpus=options.search_cpus, num_gpus=options.search_gpus)(search_colbert_topics)
    bounds = np.linspace(0, len(texts), tasks + 1).astype(int)
    shared = workspace.share(model)
    pending = {search.remote(workspace.uri, meta, shared, texts[a:b], options): share
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


class EvaluateStage(Stage):
    """Search every topic in the index and score the run against the qrels."""

    name = "evaluate"
    sections = ("index",)
    temporaries = ("inputs", "evaluate")
    artifacts = ("run",)

    def check(self, options: EvaluateConfig) -> None:
        parse_measures(options.measures)

    def sources(self, config: PipelineConfig) -> list[Source]:
        return [Source(config.data.eval_topics, "queries", "eval_topics"),
                Source(config.data.eval_qrels, "qrels", "eval_qrels")]

    def reads(self, context: StageContext) -> list[tuple[str, tuple[str, ...]]]:
        return [(EVAL_TOPICS, ("id", "text")), (EVAL_QRELS, ("qid", "docid", "relevance"))]

    def key(self, context: StageContext) -> str:
        """The index in use (refused when it is not the config's), the student, topics, qrels and settings."""
        workspace, index = context.workspace, context.section("index")
        model = student_path(index.model, workspace)
        meta = read_index_meta(workspace)
        if not meta:
            raise FileNotFoundError(f"no index in {workspace.location('index')}; run the index stage first")
        if meta["kind"] != student_kind(model):
            raise StaleIndexError(f"the saved index is {meta['kind']} but {model} is a {student_kind(model)} "
                                  "student; re-run the index stage")
        check_current(workspace, meta, model, index.model_dump(mode="json"))
        return digest(meta.get("key"), path_fingerprint(model), workspace.table_identity(EVAL_TOPICS),
                      workspace.table_identity(EVAL_QRELS), context.options.model_dump(mode="json"))

    def work(self, context: StageContext, key: str) -> Outcome:
        options, workspace = context.options, context.workspace
        model = student_path(context.section("index").model, workspace)
        meta = read_index_meta(workspace)
        topics = workspace.read_table(EVAL_TOPICS)
        if meta["kind"] == "colbert":
            ranked = _rank_colbert(context, meta, model, topics)
        else:
            ranked = _rank_dense(workspace, meta, model, topics, options)
        workspace.write_text(RUN_TREC, trec_run_text(ranked, options.run_tag))
        qrels = workspace.read_table(EVAL_QRELS)
        metrics, per_query = evaluate_run(ranked, qrels, options.measures)
        if options.bm25_reference:
            metrics |= _bm25_metrics(workspace, topics, qrels, options)
        workspace.write_table(per_query, PER_QUERY)
        workspace.write_table(ranked, RUN, schemas.RUN)
        return Outcome(topics.num_rows, {"run": RUN_TREC, "per_query": PER_QUERY, "table": RUN}, metrics)


STAGE = EvaluateStage()


def run(config: PipelineConfig) -> StageResult:
    """Run the evaluate stage (`EvaluateStage`) on `config`."""
    return run_stage(STAGE, config)
