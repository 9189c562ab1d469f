"""index: encode the evaluation collection with the student on Ray Data actors, build FAISS shards in
parallel Ray tasks, and merge them into one saved index.

Output: ``index/embeddings.parquet`` (docid, faiss_id, shard, vector), ``index/index.faiss`` and
``index/docids.parquet`` (faiss_id -> docid).
"""
from __future__ import annotations

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
from td_ray.config import PipelineConfig
from td_ray.index.actor import INPUT_COLUMNS, EncoderActor
from td_ray.index.core import build_shard, merge_shards, stored_ids
from td_ray.ray_session import ensure_ray
from td_ray.raydata import actor_map_args, read_table_dataset, write_stream
from td_ray.result import StageResult
from td_ray.sources import ingest
from td_ray.translate.core import ModelError
from td_ray.workspace import (
    DOC_IDS,
    EMBEDDINGS,
    EVAL_DOCS,
    FAISS_INDEX,
    STUDENT_DIR,
    Workspace,
)

logger = logging.getLogger(__name__)

__all__ = ["EncoderActor", "run"]


def vectors_of(column: pa.ChunkedArray) -> np.ndarray:
    """A [rows, dim] float32 array from a vector column (Arrow lists or Ray's tensor extension type)."""
    column = column.combine_chunks()
    if isinstance(column.type, pa.ExtensionType):
        return np.asarray(column.to_numpy(), dtype=np.float32)
    return np.asarray(column.flatten(), dtype=np.float32).reshape(len(column), -1)


def _shard_index_bytes(workspace_uri: str, shard: int) -> np.ndarray:
    """Ray task: build shard `shard`'s FAISS index from the embeddings table; returns it serialized."""
    workspace = Workspace(workspace_uri)
    table = pads.dataset(workspace.path(EMBEDDINGS), filesystem=workspace.fs).to_table(
        columns=["faiss_id", "vector"], filter=pc.field("shard") == shard
    )
    return faiss.serialize_index(build_shard(vectors_of(table["vector"]), table["faiss_id"].to_numpy()))


def student_path(config: PipelineConfig, workspace: Workspace) -> str:
    """The encoder to index and search with: `index.model`, else the student the distill stage saved."""
    if config.index.model:
        return config.index.model
    path = Path(workspace.path(STUDENT_DIR))
    if not path.is_dir():
        raise ModelError(f"no student at {path}; run the distill stage first, or set index.model")
    return str(path)


def run(config: PipelineConfig) -> StageResult:
    """Encode every evaluation document once and save one merged FAISS index."""
    import ray

    started = time.perf_counter()
    options = config.index
    workspace = Workspace(config.workspace)
    with tracking.stage_run(config, "index") as run_id:
        ingest(workspace, config.data.eval_docs, "docs", "eval_docs")
        schemas.require_columns(workspace.read_schema(EVAL_DOCS), INPUT_COLUMNS, EVAL_DOCS)
        model = student_path(config, workspace)
        ensure_ray(config.ray)
        dataset = read_table_dataset(workspace, EVAL_DOCS).map_batches(
            EncoderActor,
            fn_constructor_kwargs={"model": model, "max_length": options.max_length, "batch_size": options.batch_size},
            **actor_map_args(options),
        )
        next_id = 0

        def assign_ids(batch: pa.Table) -> pa.Table:
            nonlocal next_id
            ids = np.arange(next_id, next_id + batch.num_rows, dtype=np.int64)
            next_id += batch.num_rows
            vectors = vectors_of(batch["vector"])
            return pa.table({
                "docid": batch["docid"], "faiss_id": ids, "shard": (ids % options.num_shards).astype(np.int32),
                "vector": pa.array(list(vectors), type=pa.list_(pa.float32())),
            })

        expected = workspace.read_table(EVAL_DOCS, columns=["id"]).rename_columns(["docid"])
        rows = write_stream(dataset, workspace, EMBEDDINGS, schemas.EMBEDDINGS, ["docid"], expected, transform=assign_ids)
        build = ray.remote(num_cpus=0.5)(_shard_index_bytes)
        shards = [faiss.deserialize_index(data) for data in ray.get([build.remote(workspace.uri, shard) for shard in range(options.num_shards)])]
        shard_sizes = [shard.ntotal for shard in shards]
        dim = shards[0].d
        merged = merge_shards(shards, dim)
        ids = stored_ids(merged)
        if merged.ntotal != rows or len(np.unique(ids)) != rows:
            raise RuntimeError(f"merged index holds {merged.ntotal} vectors ({len(np.unique(ids))} ids) for {rows} documents")
        index_path = workspace.local_dir("index") / Path(FAISS_INDEX).name
        temporary = index_path.with_name(index_path.name + ".tmp")
        faiss.write_index(merged, str(temporary))
        os.replace(temporary, index_path)
        workspace.write_table(workspace.read_table(EMBEDDINGS, columns=["faiss_id", "docid"]), DOC_IDS, schemas.DOC_IDS)
        result = StageResult("index", rows, time.perf_counter() - started,
                             {"index": str(index_path), "docids": workspace.path(DOC_IDS)},
                             {"dim": float(dim), "shards": float(options.num_shards)} | {f"shard_{i}_size": float(n) for i, n in enumerate(shard_sizes)},
                             run_id)
        tracking.log_result(result)
    logger.info(result.summary())
    return result
