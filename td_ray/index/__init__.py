"""index: encode the evaluation collection with the student on Ray Data actors, build FAISS shards in
parallel Ray tasks, and merge them into one saved index.

Output, dense student: ``index/embeddings.parquet`` (docid, faiss_id, shard, vector), ``index/index.faiss`` and
``index/docids.parquet`` (faiss_id -> docid). A ColBERT student (``td_ray_colbert.json`` in its directory)
indexes every document token instead: ``index/token_embeddings.parquet`` (per document its flattened token
vectors), ``index/index.faiss`` keyed by global token row, ``index/token_docs.parquet`` (each document's token
rows) and ``index/docids.parquet``. Both write ``index/index_meta.json`` (kind, dim, docs, tokens, model), which
tells the evaluate stage how to search.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from td_ray import schemas, tracking
from td_ray.config import IndexConfig, PipelineConfig
from td_ray.distill.colbert import ColBERTSpec, is_colbert
from td_ray.errors import TdRayError
from td_ray.fingerprint import digest, path_fingerprint
from td_ray.keys import KeyBatches
from td_ray.index.actor import INPUT_COLUMNS, ColBERTEncoderActor, EncoderActor
from td_ray.index.core import build_shard, merge_shards, stored_ids
from td_ray.ray_session import ensure_ray
from td_ray.raydata import actor_map_args, read_table_dataset, write_stream
from td_ray.result import StageResult
from td_ray.sources import ingest
from td_ray.errors import ModelError
from td_ray.workspace import (
    DOC_IDS,
    EMBEDDINGS,
    EVAL_DOCS,
    FAISS_INDEX,
    INDEX_META,
    STUDENT_DIR,
    TOKEN_DOCS,
    TOKEN_EMBEDDINGS,
    Workspace,
    atomic_write_text,
)

logger = logging.getLogger(__name__)

__all__ = ["ColBERTEncoderActor", "EncoderActor", "StaleIndexError", "read_index_meta", "run"]


class StaleIndexError(TdRayError):
    """The saved index does not match the student searching it, or its own tables: re-run the index stage."""


def vectors_of(column: pa.ChunkedArray, dim: int | None = None) -> np.ndarray:
    """A [rows, dim] float32 array from a vector column (Arrow lists or Ray's tensor extension type), assembled
    chunk by chunk: the chunks are never concatenated into one Arrow array, whose 32-bit list offsets would
    overflow past 2^31 values. `dim` defaults to the values per row."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if not chunks:
        return np.zeros((0, dim or 0), dtype=np.float32)
    if isinstance(chunks[0].type, pa.ExtensionType):
        parts = [np.asarray(chunk.to_numpy(), dtype=np.float32) for chunk in chunks]
    else:
        parts = [np.asarray(chunk.flatten(), dtype=np.float32) for chunk in chunks]
    flat = np.concatenate([part.reshape(-1) for part in parts])
    return flat.reshape(-1, dim or flat.size // max(len(column), 1))


def _shard_index_bytes(workspace_uri: str, shard: int) -> np.ndarray:
    """Ray task: build shard `shard`'s FAISS index from the embeddings table; returns it serialized."""
    workspace = Workspace(workspace_uri)
    table = pads.dataset(workspace.path(EMBEDDINGS), filesystem=workspace.fs).to_table(
        columns=["faiss_id", "vector"], filter=pc.field("shard") == shard
    )
    return faiss.serialize_index(build_shard(vectors_of(table["vector"]), table["faiss_id"].to_numpy()))


def _token_shard_index_bytes(workspace_uri: str, shard: int, dim: int) -> np.ndarray:
    """Ray task: build shard `shard`'s token index (ids are global token rows) from the token embeddings table."""
    workspace = Workspace(workspace_uri)
    table = pads.dataset(workspace.path(TOKEN_EMBEDDINGS), filesystem=workspace.fs).to_table(
        columns=["first_token", "tokens", "vectors"], filter=pc.field("shard") == shard
    )
    tokens = table["tokens"].to_numpy().astype(np.int64)
    first = table["first_token"].to_numpy()
    ids = np.arange(tokens.sum(), dtype=np.int64) + np.repeat(first - (np.cumsum(tokens) - tokens), tokens)
    vectors = vectors_of(table["vectors"], dim)
    return faiss.serialize_index(build_shard(vectors, ids) if len(ids) else faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))


def read_index_meta(workspace: Workspace) -> dict:
    """What the saved index holds: kind (dense or colbert), dim, docs, tokens (the vectors it holds: docs when dense)
    and model. An index saved before this file existed is dense."""
    path = Path(workspace.path(INDEX_META))
    if not path.is_file():
        return {"kind": "dense"}
    return json.loads(path.read_text(encoding="utf-8"))


def student_path(config: PipelineConfig, workspace: Workspace) -> str:
    """The encoder to index and search with: `index.model`, else the student the distill stage saved."""
    if config.index.model:
        return config.index.model
    path = Path(workspace.path(STUDENT_DIR))
    if not path.is_dir():
        raise ModelError(f"no student at {path}; run the distill stage first, or set index.model")
    return str(path)


def _encoded_docs(workspace: Workspace, actor: type, model: str, options: IndexConfig):
    """The evaluation documents streamed through a pool of `actor` (one encoder each)."""
    return read_table_dataset(workspace, EVAL_DOCS).map_batches(
        actor,
        fn_constructor_kwargs={"model": model, "max_length": options.max_length, "batch_size": options.batch_size},
        **actor_map_args(options),
    )


def _encode_dense(workspace: Workspace, model: str, options: IndexConfig, expected: KeyBatches) -> int:
    """Stream one vector per document into the embeddings table; returns the document count."""
    dataset = _encoded_docs(workspace, EncoderActor, model, options)
    next_id = 0

    def assign_ids(batch: pa.Table) -> pa.Table:
        nonlocal next_id
        ids = np.arange(next_id, next_id + batch.num_rows, dtype=np.int64)
        next_id += batch.num_rows
        vectors = vectors_of(batch["vector"])
        return pa.table({
            "docid": batch["docid"], "faiss_id": ids, "shard": (ids % options.num_shards).astype(np.int32),
            "vector": pa.LargeListArray.from_arrays(np.arange(0, vectors.size + 1, max(vectors.shape[1], 1)),
                                                    vectors.reshape(-1)),
        })

    return write_stream(dataset, workspace, EMBEDDINGS, schemas.EMBEDDINGS, ["docid"], expected, transform=assign_ids)


def _encode_colbert(workspace: Workspace, model: str, options: IndexConfig,
                    expected: KeyBatches) -> tuple[int, int]:
    """Stream each document's token vectors into the token embeddings table; returns (documents, tokens).

    Documents are numbered in arrival order and their tokens take the next global token rows, so each
    document's rows are contiguous and ascend with its number: a token row finds its document by bisection.
    """
    dataset = _encoded_docs(workspace, ColBERTEncoderActor, model, options)
    next_id = next_token = 0

    def assign_ids(batch: pa.Table) -> pa.Table:
        nonlocal next_id, next_token
        ids = np.arange(next_id, next_id + batch.num_rows, dtype=np.int64)
        tokens = batch["tokens"].to_numpy().astype(np.int64)
        first = next_token + np.cumsum(tokens) - tokens
        next_id, next_token = next_id + batch.num_rows, next_token + int(tokens.sum())
        return pa.table({"docid": batch["docid"], "faiss_id": ids, "shard": (ids % options.num_shards).astype(np.int32),
                         "first_token": first, "tokens": batch["tokens"], "vectors": batch["vectors"]})

    rows = write_stream(dataset, workspace, TOKEN_EMBEDDINGS, schemas.TOKEN_EMBEDDINGS, ["docid"], expected,
                        transform=assign_ids)
    return rows, next_token


def _merge_and_save(workspace: Workspace, shards: list[faiss.Index], dim: int, vectors: int) -> Path:
    """Merge the shards, check the merged index holds `vectors` distinct ids, and save it atomically."""
    merged = merge_shards(shards, dim)
    ids = stored_ids(merged)
    if merged.ntotal != vectors or len(np.unique(ids)) != vectors:
        raise RuntimeError(f"merged index holds {merged.ntotal} vectors ({len(np.unique(ids))} ids) for {vectors} expected")
    index_path = workspace.local_dir("index") / Path(FAISS_INDEX).name
    temporary = index_path.with_name(index_path.name + ".tmp")
    faiss.write_index(merged, str(temporary))
    os.replace(temporary, index_path)
    return index_path


def run(config: PipelineConfig) -> StageResult:
    """Encode every evaluation document once and save one merged FAISS index (of documents, or of ColBERT tokens)."""
    import ray

    started = time.perf_counter()
    options = config.index
    workspace = Workspace(config.workspace)
    with tracking.stage_run(config, "index") as run_id:
        workspace.remove_temporaries("inputs", "index")
        ingest(workspace, config.data.eval_docs, "docs", "eval_docs")
        schemas.require_columns(workspace.read_schema(EVAL_DOCS), INPUT_COLUMNS, EVAL_DOCS)
        model = student_path(config, workspace)
        key = digest(workspace.table_identity(EVAL_DOCS), model, path_fingerprint(model),
                     options.model_dump(mode="json", include={"num_shards", "max_length"}))
        meta = read_index_meta(workspace)
        if meta.get("key") == key and Path(workspace.path(FAISS_INDEX)).is_file():
            logger.info("index: unchanged (documents, student and settings), %s reused", workspace.path(FAISS_INDEX))
            result = StageResult("index", int(meta["docs"]), time.perf_counter() - started,
                                 {"index": workspace.path(FAISS_INDEX), "docids": workspace.path(DOC_IDS)},
                                 {"dim": float(meta["dim"]), "unchanged": 1.0}, run_id)
            tracking.log_result(result)
            return result
        ensure_ray(config.ray)
        expected = workspace.key_batches(EVAL_DOCS, ["id"])
        colbert = is_colbert(model)
        if colbert:
            dim = ColBERTSpec.load(model).dim
            rows, tokens = _encode_colbert(workspace, model, options, expected)
            build = ray.remote(num_cpus=0.5)(_token_shard_index_bytes)
            futures = [build.remote(workspace.uri, shard, dim) for shard in range(options.num_shards)]
        else:
            rows = tokens = _encode_dense(workspace, model, options, expected)
            build = ray.remote(num_cpus=0.5)(_shard_index_bytes)
            futures = [build.remote(workspace.uri, shard) for shard in range(options.num_shards)]
        shards = [faiss.deserialize_index(data) for data in ray.get(futures)]
        shard_sizes = [shard.ntotal for shard in shards]
        if not colbert:
            dim = shards[0].d
        index_path = _merge_and_save(workspace, shards, dim, tokens)
        outputs = {"index": str(index_path), "docids": workspace.path(DOC_IDS)}
        metrics = {"dim": float(dim), "shards": float(options.num_shards)}
        if colbert:
            table = workspace.read_table(TOKEN_EMBEDDINGS, columns=["faiss_id", "docid", "first_token", "tokens"])
            table = table.sort_by("faiss_id")
            offsets = np.cumsum(table["tokens"].to_numpy().astype(np.int64)) - table["tokens"].to_numpy()
            if not np.array_equal(table["first_token"].to_numpy(), offsets):
                raise RuntimeError("token rows are not contiguous in document order; the token index cannot map hits back")
            workspace.write_table(table, TOKEN_DOCS, schemas.TOKEN_DOCS)
            outputs["token_docs"] = workspace.path(TOKEN_DOCS)
            metrics |= {"tokens": float(tokens), "tokens_per_doc": tokens / max(rows, 1)}
            source = TOKEN_EMBEDDINGS
        else:
            source = EMBEDDINGS
        workspace.write_table(workspace.read_table(source, columns=["faiss_id", "docid"]), DOC_IDS, schemas.DOC_IDS)
        meta = {"kind": "colbert" if colbert else "dense", "dim": dim, "docs": rows, "tokens": tokens, "model": model,
                "key": key}
        atomic_write_text(Path(workspace.path(INDEX_META)), json.dumps(meta, indent=1) + "\n")
        result = StageResult("index", rows, time.perf_counter() - started, outputs,
                             metrics | {f"shard_{i}_size": float(n) for i, n in enumerate(shard_sizes)}, run_id)
        tracking.log_result(result)
    if colbert:
        logger.info("index: %d documents as %d token vectors (%.1f per document, dim %d) in %d shards %s",
                    rows, tokens, tokens / max(rows, 1), dim, options.num_shards, shard_sizes)
    logger.info(result.summary())
    return result
