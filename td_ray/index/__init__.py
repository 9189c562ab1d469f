"""index: encode the evaluation collection with the student and build its FAISS index in sharded Ray tasks.

Dense students, after faiss' recipe for indexes that do not fit in RAM (`td_ray.retrieval.faiss_index`):

1. Ray Data streams the documents through encoder actors; each cuts its documents into passages
   (`index.passages`, for MaxP) and encodes them. The driver numbers the passages as they arrive (their faiss
   ids), writes the vectors to the build's vector table, one row group per batch and one shard per row group,
   and the (docid, passage) of each faiss id to the passage map. Each document's first passage must come out
   exactly once.
2. A Ray task trains the index on a sample of the vectors (`index.train_sample`) and saves it empty.
3. One Ray task per shard reads its own row groups, adds them to a copy of the trained index and writes the
   shard file atomically; a retried task rewrites the same file. The shards must hold every passage once.
4. IVF shards are merged on disk (one inverted-list file that search memory-maps); Flat and HNSW shards stay
   and are searched in turn.

The driver never holds the vectors. A build lives in ``index/builds/<key>/``, the key naming the documents, the
student and every setting; an unchanged key reuses the build, a changed one is built beside it and swapped in by
``index/index_meta.json`` (`td_ray.retrieval.layout`).

ColBERT students keep one flat index of every passage token (`td_ray.retrieval.maxsim`), built in shards and
merged in the driver.
"""
from __future__ import annotations

import functools
import logging
import shutil
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from td_ray import schemas, tracking
from td_ray.config import IndexConfig, PipelineConfig
from td_ray.encoders import student_kind
from td_ray.encoders.colbert import ColBERTSpec
from td_ray.errors import ExactlyOnceError
from td_ray.fingerprint import digest, path_fingerprint
from td_ray.index.actor import INPUT_COLUMNS, ColBERTEncoderActor, EncoderActor, merge_task, shard_task, train_task
from td_ray.index.core import PassageNumbering
from td_ray.keys import Digest
from td_ray.ray_session import ensure_ray
from td_ray.raydata import actor_map_args, in_task, read_table_dataset
from td_ray.result import StageResult
from td_ray.retrieval import faiss_index
from td_ray.retrieval.layout import (
    BUILDS,
    EMBEDDINGS_TABLE,
    PASSAGE_MAP,
    TRAINED,
    read_index_meta,
    student_path,
    write_index_meta,
)
from td_ray.retrieval.maxp import write_passage_map
from td_ray.retrieval.maxsim import build_shard, merge_shards, stored_ids
from td_ray.sources import ingest
from td_ray.workspace import (
    DOC_IDS,
    EVAL_DOCS,
    FAISS_INDEX,
    TOKEN_DOCS,
    TOKEN_EMBEDDINGS,
    Workspace,
)

logger = logging.getLogger(__name__)

__all__ = ["ColBERTEncoderActor", "EncoderActor", "dense_dim", "index_key", "run", "vectors_of"]

SHARD_TASK_RETRIES = 3
"""Times Ray runs a shard task again after its worker dies (each retry rewrites the same shard file)."""


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


def dense_dim(model: str) -> int:
    """The dimension of a dense student's vectors (its hidden size)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model).hidden_size)


def index_key(config: PipelineConfig, workspace: Workspace, model: str) -> str:
    """What a build is made from: the documents, the student's files and every index setting but the pool's."""
    options = config.index
    return digest(workspace.table_identity(EVAL_DOCS), model, path_fingerprint(model),
                  options.model_dump(mode="json", exclude={"batch_size", "num_actors", "max_actors",
                                                           "num_cpus_per_actor", "num_gpus_per_actor", "device"}))


def run(config: PipelineConfig) -> StageResult:
    """Encode every evaluation document once and build its index (of passages, or of ColBERT tokens)."""
    started = time.perf_counter()
    options = config.index
    workspace = Workspace(config.workspace)
    with tracking.stage_run(config, "index") as run_id:
        workspace.remove_temporaries("inputs", "index")
        ingest(workspace, config.data.eval_docs, "docs", "eval_docs")
        schemas.require_columns(workspace.read_schema(EVAL_DOCS), INPUT_COLUMNS, EVAL_DOCS)
        model = student_path(options.model, workspace)
        key = index_key(config, workspace, model)
        meta = read_index_meta(workspace)
        if meta.get("key") == key and _complete(workspace, meta):
            logger.info("index: unchanged (documents, student and settings), the index in %s is reused",
                        workspace.path(meta.get("build", "index")))
            result = StageResult("index", int(meta["docs"]), time.perf_counter() - started, _outputs(workspace, meta),
                                 {"dim": float(meta["dim"]), "unchanged": 1.0}, run_id)
            tracking.log_result(result)
            return result
        if student_kind(model) == "colbert":
            meta, metrics = _build_colbert(config, workspace, model, key)
        else:
            meta, metrics = _build_dense(config, workspace, model, key)
        write_index_meta(workspace, meta)
        _remove_other_builds(workspace, meta.get("build"))
        result = StageResult("index", int(meta["docs"]), time.perf_counter() - started, _outputs(workspace, meta),
                             metrics, run_id)
        tracking.log_result(result)
    logger.info(result.summary())
    return result


def _complete(workspace: Workspace, meta: dict) -> bool:
    if "build" not in meta:
        return Path(workspace.path(FAISS_INDEX)).is_file()
    return all((Path(workspace.path(meta["build"])) / name).is_file() for name in meta["files"] + [PASSAGE_MAP])


def _outputs(workspace: Workspace, meta: dict) -> dict[str, str]:
    if "build" in meta:
        build = Path(workspace.path(meta["build"]))
        return {"index": str(build / meta["files"][0]), "passages": str(build / PASSAGE_MAP)}
    return {"index": workspace.path(FAISS_INDEX), "docids": workspace.path(DOC_IDS)}


def _remove_other_builds(workspace: Workspace, keep: str | None) -> None:
    """Once a new build is in use, the builds it replaced are deleted."""
    builds = Path(workspace.path(BUILDS))
    for path in builds.iterdir() if builds.is_dir() else []:
        if f"{BUILDS}/{path.name}" != keep:
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ dense
def _build_dense(config: PipelineConfig, workspace: Workspace, model: str, key: str) -> tuple[dict, dict]:
    options = config.index
    plan = faiss_index.plan_index(options.factory, dense_dim(model))
    docs = workspace.row_count(EVAL_DOCS)
    if options.passages is None:  # one vector per document: the training points are known before encoding
        faiss_index.check_training_points(plan, docs, options.train_sample, f"{EVAL_DOCS} ({docs} documents)")
    relative = f"{BUILDS}/{key}"
    build = Path(workspace.path(relative))
    shutil.rmtree(build, ignore_errors=True)  # an interrupted build of the same key
    build.mkdir(parents=True)
    ensure_ray(config.ray)
    passages = _encode_passages(workspace, build, model, options)
    faiss_index.check_training_points(plan, passages, options.train_sample, f"the {passages} passages")
    files, digests, trained_on = build_from_table(build, plan, passages, options.num_shards, options.train_sample,
                                                  options.device)
    if not options.keep_vectors:
        (build / EMBEDDINGS_TABLE).unlink()
    size = sum((build / name).stat().st_size for name in files + (["index.ivfdata"] if plan.merges_on_disk else []))
    meta = {"kind": "dense", "dim": plan.dim, "docs": docs, "passages": passages, "tokens": passages, "model": model,
            "key": key, "build": relative, "factory": plan.factory, "files": files,
            "search_params": faiss_index.default_search_params(plan), "bytes": size,
            "passage_split": options.passages.model_dump() if options.passages else None}
    logger.info("index: %d documents as %d passages, %s at dim %d, %.1f MB in %s (trained on %d vectors)", docs,
                passages, plan.factory, plan.dim, size / 2**20, build, trained_on)
    metrics = {"dim": float(plan.dim), "shards": float(options.num_shards), "passages": float(passages),
               "passages_per_doc": passages / max(docs, 1), "index_bytes": float(size),
               "bytes_per_vector": size / max(passages, 1)}
    return meta, metrics | {f"shard_{i}_size": float(s.rows) for i, s in enumerate(digests)}


def build_from_table(build: Path, plan: faiss_index.IndexPlan, vectors: int, shards: int, train_sample: int,
                     device: str = "auto") -> tuple[list[str], list[Digest], int]:
    """Build the index of the vector table in `build` (steps 2-4 above, each in Ray tasks); returns its files, each
    shard's digest of the ids it added and the vectors trained on. Checks that the shards hold every one of the
    `vectors` once."""
    import ray

    table, trained = build / EMBEDDINGS_TABLE, build / TRAINED
    trained_on = in_task(train_task, str(table), plan, train_sample, vectors, str(trained), device, num_cpus=1)
    shard_paths = [build / f"shard-{shard:03d}.faiss" for shard in range(shards)]
    build_shard_file = ray.remote(num_cpus=0.5, max_retries=SHARD_TASK_RETRIES)(shard_task)
    digests = ray.get([build_shard_file.remote(str(table), shard, str(trained), str(path), device)
                         for shard, path in enumerate(shard_paths)])
    total = functools.reduce(Digest.merge, digests, Digest())
    if total != Digest.of_range(vectors):
        raise ExactlyOnceError(f"index: the shards hold {total.rows} vectors for {vectors} passages, or some twice; "
                               "nothing was committed: run the stage again")
    if not plan.merges_on_disk:
        return [path.name for path in shard_paths], digests, trained_on
    in_task(merge_task, str(trained), [str(path) for path in shard_paths], str(build / "index.faiss"),
            str(build / "index.ivfdata"), num_cpus=1)
    for path in shard_paths:
        path.unlink()
    return ["index.faiss"], digests, trained_on


def _encode_passages(workspace: Workspace, build: Path, model: str, options: IndexConfig) -> int:
    """Stream every document's passage vectors into the build's vector table and passage map; returns passages.

    Checked before anything is committed: every document gave exactly one first passage, and nothing else.
    """
    split = (options.passages.length, options.passages.stride) if options.passages else None
    dataset = read_table_dataset(workspace, EVAL_DOCS, rows_per_block=options.batch_size).map_batches(
        EncoderActor, batch_format="numpy",
        fn_constructor_kwargs={"model": model, "max_length": options.max_length, "batch_size": options.batch_size,
                               "passages": split},
        **actor_map_args(options),
    )
    numbering = PassageNumbering(options.num_shards)
    first_passages = workspace.key_batches(EVAL_DOCS, ["id"])
    with pa.OSFile(str(build / f".{PASSAGE_MAP}.rows"), "wb") as sink, \
            pa.ipc.new_file(sink, pa.schema([("docid", pa.string()), ("passage", pa.int32())])) as passage_rows, \
            workspace.exactly_once_writer(f"{build.relative_to(workspace.root)}/{EMBEDDINGS_TABLE}",
                                          schemas.EMBEDDINGS, ["docid"], expected=first_passages,
                                          select=lambda table: table.filter(pc.equal(table["passage"], 0))) as writer:
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            for part in numbering(batch):  # one row group a shard
                writer.write(part)
                passage_rows.write_table(part.select(["docid", "passage"]))
    write_passage_map(_read_ipc(build / f".{PASSAGE_MAP}.rows"), build / PASSAGE_MAP)
    (build / f".{PASSAGE_MAP}.rows").unlink()
    return numbering.next_id


def _read_ipc(path: Path):
    reader = pa.ipc.open_file(pa.memory_map(str(path)))
    for i in range(reader.num_record_batches):
        yield reader.get_batch(i)


# ------------------------------------------------------------------------------------------------ ColBERT
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


def _encode_colbert(workspace: Workspace, model: str, options: IndexConfig) -> tuple[int, int]:
    """Stream each passage's token vectors into the token embeddings table; returns (passages, tokens).

    Passages are numbered in arrival order and their tokens take the next global token rows, so each passage's
    rows are contiguous and ascend with its number: a token row finds its passage by bisection. Each document's
    first passage must come out exactly once.
    """
    split = (options.passages.length, options.passages.stride) if options.passages else None
    dataset = read_table_dataset(workspace, EVAL_DOCS, rows_per_block=options.batch_size).map_batches(
        ColBERTEncoderActor, batch_format="numpy",
        fn_constructor_kwargs={"model": model, "max_length": options.max_length, "batch_size": options.batch_size,
                               "passages": split},
        **actor_map_args(options),
    )
    next_id = next_token = 0
    with workspace.exactly_once_writer(TOKEN_EMBEDDINGS, schemas.TOKEN_EMBEDDINGS, ["docid"],
                                       expected=workspace.key_batches(EVAL_DOCS, ["id"]),
                                       select=lambda table: table.filter(pc.equal(table["passage"], 0))) as writer:
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            ids = np.arange(next_id, next_id + batch.num_rows, dtype=np.int64)
            tokens = batch["tokens"].to_numpy().astype(np.int64)
            first = next_token + np.cumsum(tokens) - tokens
            next_id, next_token = next_id + batch.num_rows, next_token + int(tokens.sum())
            writer.write(pa.table({"docid": batch["docid"], "passage": batch["passage"], "faiss_id": ids,
                                   "shard": (ids % options.num_shards).astype(np.int32), "first_token": first,
                                   "tokens": batch["tokens"], "vectors": batch["vectors"]}))
    return next_id, next_token


def _build_colbert(config: PipelineConfig, workspace: Workspace, model: str, key: str) -> tuple[dict, dict]:
    import ray

    options = config.index
    ensure_ray(config.ray)
    dim = ColBERTSpec.load(model).dim
    passages, tokens = _encode_colbert(workspace, model, options)
    build = ray.remote(num_cpus=0.5)(_token_shard_index_bytes)
    shards = [faiss.deserialize_index(data) for data in
              ray.get([build.remote(workspace.uri, shard, dim) for shard in range(options.num_shards)])]
    shard_sizes = [shard.ntotal for shard in shards]
    merged = merge_shards(shards, dim)
    ids = stored_ids(merged)
    if merged.ntotal != tokens or len(np.unique(ids)) != tokens:
        raise ExactlyOnceError(f"merged index holds {merged.ntotal} vectors ({len(np.unique(ids))} ids) for {tokens}")
    index_path = workspace.local_dir("index") / Path(FAISS_INDEX).name
    faiss_index.write_atomic(merged, index_path)
    table = workspace.read_table(TOKEN_EMBEDDINGS, columns=["faiss_id", "docid", "passage", "first_token", "tokens"])
    table = table.sort_by("faiss_id")
    offsets = np.cumsum(table["tokens"].to_numpy().astype(np.int64)) - table["tokens"].to_numpy()
    if not np.array_equal(table["first_token"].to_numpy(), offsets):
        raise RuntimeError("token rows are not contiguous in document order; the token index cannot map hits back")
    workspace.write_table(table, TOKEN_DOCS, schemas.TOKEN_DOCS)
    workspace.write_table(table.select(["faiss_id", "docid"]), DOC_IDS, schemas.DOC_IDS)
    docs = workspace.row_count(EVAL_DOCS)
    logger.info("index: %d documents as %d passages and %d token vectors (%.1f per passage, dim %d) in %d shards %s",
                docs, passages, tokens, tokens / max(passages, 1), dim, options.num_shards, shard_sizes)
    meta = {"kind": "colbert", "dim": dim, "docs": docs, "passages": passages, "tokens": tokens, "model": model,
            "key": key}
    metrics = {"dim": float(dim), "shards": float(options.num_shards), "passages": float(passages),
               "tokens": float(tokens), "tokens_per_passage": tokens / max(passages, 1)}
    return meta, metrics | {f"shard_{i}_size": float(n) for i, n in enumerate(shard_sizes)}
