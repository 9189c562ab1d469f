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

ColBERT students get a compressed token index (`td_ray.retrieval.plaid`, after PLAID) in the same steps: a task
trains the codec (centroids and residual quantiser) on a sample of documents; the encoder actors compress each
passage's tokens, which the driver numbers into the codes table and passage map; one Ray task per shard fills its
contiguous range of passages into the pre-allocated token arrays and writes its inverted lists; a task merges the
lists on disk. Neither the driver nor any task holds the collection's tokens.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from td_ray import schemas
from td_ray.config import IndexConfig, PipelineConfig
from td_ray.encoders import student_kind
from td_ray.encoders.spec import ColBERTSpec
from td_ray.errors import ExactlyOnceError
from td_ray.index.actor import (
    INPUT_COLUMNS,
    changes_task,
    fingerprints_task,
    ColBERTEncoderActor,
    EncoderActor,
    merge_lists_task,
    merge_task,
    shard_task,
    token_shard_task,
    train_codec_task,
    train_task,
)
from td_ray.index.core import PassageNumbering, TokenNumbering
from td_ray.keys import Digest
from td_ray.raydata import actor_map_args, in_task, read_table_dataset, steady_pace
from td_ray.result import StageResult
from td_ray.retrieval import faiss_index, plaid
from td_ray.retrieval.layout import (
    BUILDS,
    CODES_TABLE,
    DOCUMENTS,
    EMBEDDINGS_TABLE,
    PASSAGE_MAP,
    TRAINED,
    add_deleted,
    build_path,
    index_key,
    read_index_meta,
    settings_key,
    student_path,
    write_index_meta,
)
from td_ray.retrieval.maxp import write_passage_map
from td_ray.stage import Outcome, Source, Stage, StageContext, run_stage
from td_ray.workspace import EVAL_DOCS, INDEX_META, Mirror, Workspace

logger = logging.getLogger(__name__)

__all__ = ["STAGE", "ColBERTEncoderActor", "EncoderActor", "build_from_table", "build_token_index", "dense_dim", "run"]

SHARD_TASK_RETRIES = 3
"""Times Ray runs a shard task again after its worker dies (each retry rewrites the same shard file)."""


def dense_dim(model: str) -> int:
    """The dimension of a dense student's vectors (its hidden size)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model).hidden_size)


class IndexStage(Stage):
    """Encode every evaluation document once and build its index (of passages, or of ColBERT tokens); documents
    added or changed since the last build are appended to it when its student and settings are the same."""

    name = "index"
    temporaries = ("inputs", "index")

    def sources(self, config: PipelineConfig) -> list[Source]:
        return [Source(config.data.eval_docs, "docs", "eval_docs")]

    def reads(self, context: StageContext) -> list[tuple[str, tuple[str, ...]]]:
        return [(EVAL_DOCS, INPUT_COLUMNS)]

    def key(self, context: StageContext) -> str:
        model = student_path(context.options.model, context.workspace)
        return index_key(context.workspace, model, context.options.model_dump(mode="json"))

    def reusable(self, context: StageContext, record: dict) -> bool:
        meta = read_index_meta(context.workspace)
        return meta.get("key") == record["key"] and _complete(context.workspace, meta)

    def work(self, context: StageContext, key: str) -> Outcome:
        options, workspace = context.options, context.workspace
        model = student_path(options.model, workspace)
        meta = read_index_meta(workspace)
        settings = settings_key(model, options.model_dump(mode="json"))
        appended = _append(context, model, key, meta) if _appendable(workspace, meta, settings, options) else None
        if appended is not None:
            meta, metrics = appended
        elif student_kind(model) == "colbert":
            meta, metrics = _build_colbert(context, model, key)
        else:
            meta, metrics = _build_dense(context, model, key)
        if appended is None:
            in_task(fingerprints_task, workspace.uri, meta["build"], num_cpus=options.task_cpus)
        meta["settings_key"] = settings
        write_index_meta(workspace, meta)
        _remove_other_builds(workspace, meta.get("build"))
        return Outcome(int(meta["docs"]), _outputs(meta), metrics)


STAGE = IndexStage()


def run(config: PipelineConfig) -> StageResult:
    """Run the index stage (`IndexStage`) on `config`."""
    return run_stage(STAGE, config)


def _complete(workspace: Workspace, meta: dict) -> bool:
    return "build" in meta and all(workspace.exists(f"{meta['build']}/{name}")
                                   for name in meta["files"] + meta.get("passage_maps", [PASSAGE_MAP]))


def _outputs(meta: dict) -> dict[str, str]:
    """The build's index (its folder, for ColBERT; its first file, for dense) and passage map, workspace-relative."""
    build = meta["build"]
    return {"index": build if meta["kind"] == "colbert" else f"{build}/{meta['files'][0]}",
            "passages": f"{build}/{PASSAGE_MAP}"}


# ------------------------------------------------------------------------------------------------ append
def _appendable(workspace: Workspace, meta: dict, settings: str, options: IndexConfig) -> bool:
    """Whether the built index can take the changed documents: same student and settings, complete, with the
    fingerprints of what it holds, and (ColBERT) its arrays at the sizes its metadata commits."""
    if not (options.incremental and meta.get("settings_key") == settings and _complete(workspace, meta)
            and build_path(workspace, meta, DOCUMENTS).is_file()):
        return False
    if not workspace.is_local:
        logger.info("index: appending in place needs a shared filesystem; the workspace %s is an object store, so "
                    "the index is built again", workspace.location(""))
        return False
    if meta["kind"] == "dense":
        return build_path(workspace, meta, TRAINED).is_file()
    if not {"code_bytes", "id_dtype", "ivf_entries"} <= set(meta):
        return False
    committed = plaid.Layout(meta["passages"], meta["tokens"], meta["code_bytes"], meta["id_dtype"],
                             meta["centroids"])
    if not plaid.lists_match(build_path(workspace, meta), committed, meta["ivf_entries"]):
        logger.warning("index: the lists in %s are not those %s commits (an append that did not finish); "
                       "rebuilding", build_path(workspace, meta), INDEX_META)
        return False
    committed.resize(build_path(workspace, meta))  # rows a stopped append grew are cut back
    return True


def _append(context: StageContext, model: str, key: str, meta: dict) -> tuple[dict, dict]:
    """Encode only the new and changed documents and append them to the built index (with its codec or trained
    quantiser); the passages of changed and removed documents are deleted from the results."""
    options, workspace, started = context.options, context.workspace, time.perf_counter()
    context.ray()
    number = len(meta.get("appended", [])) + 1
    build = build_path(workspace, meta)
    documents = f"{meta['build']}/append-{number:04d}-docs.parquet"
    passage_maps = meta.get("passage_maps", [PASSAGE_MAP])
    changes = in_task(changes_task, workspace.uri, str(build), documents,
                      [str(build / name) for name in passage_maps], num_cpus=options.task_cpus)
    passage_map = f"passages-{number:04d}.arrow"
    first, tokens_before = int(meta["passages"]), int(meta["tokens"])
    if changes["encode"]:  # else only deletions
        append = _append_colbert if meta["kind"] == "colbert" else _append_dense
        meta = append(workspace, build, options, model, meta, documents, passage_map, number)
        meta["passage_maps"] = passage_maps + [passage_map]
    Path(workspace.path(documents)).unlink()
    deleted = (add_deleted(build, changes["stale_passages"]) if len(changes["stale_passages"])
               else int(meta.get("deleted_passages", 0)))
    os.replace(build / f"{DOCUMENTS}.next", build / DOCUMENTS)
    seconds = time.perf_counter() - started
    record = {"documents": changes["encode"], "passages": int(meta["passages"]) - first,
              "tokens": int(meta["tokens"]) - tokens_before, "deleted_passages": len(changes["stale_passages"]),
              "seconds": round(seconds, 2)}
    meta |= {"key": key, "docs": workspace.row_count(EVAL_DOCS), "deleted_passages": deleted,
             "appended": meta.get("appended", []) + [record]}
    logger.info("index: appended %d new or changed documents (%d passages) to %s in %.1f s; %d passages of changed "
                "or removed documents deleted", record["documents"], record["passages"], build, seconds,
                record["deleted_passages"])
    metrics = {"appended_documents": float(record["documents"]), "appended_passages": float(record["passages"]),
               "deleted_passages": float(record["deleted_passages"]), "encoded_documents": float(record["documents"]),
               "passages": float(meta["passages"]), "dim": float(meta["dim"])}
    return meta, metrics


def _append_colbert(workspace: Workspace, build: Path, options: IndexConfig, model: str, meta: dict, documents: str,
                    passage_map: str, number: int) -> dict:
    """Compress the documents to append with the built codec, grow the token arrays and merge the lists."""
    previous = plaid.Layout(meta["passages"], meta["tokens"], meta["code_bytes"], meta["id_dtype"], meta["centroids"])
    numbering = TokenNumbering(previous.passages, previous.tokens)
    table = f"append-{number:04d}-{CODES_TABLE}"
    _encode_documents(workspace, workspace.mirror(meta["build"]), options, ColBERTEncoderActor,
                      {"model": model, "build": meta["build"], "workspace": workspace.uri}, table,
                      schemas.TOKEN_CODES, numbering, documents, passage_map)
    layout = plaid.Layout(numbering.next_id, numbering.next_token, previous.code_bytes, previous.id_dtype,
                          previous.nlist)
    _, entries = build_token_index(build, layout, options.num_shards, options.task_cpus, previous, table)
    (build / table).unlink()
    size = sum((build / name).stat().st_size for name in plaid.FILES)
    return meta | {"passages": layout.passages, "tokens": layout.tokens, "ivf_entries": entries, "bytes": size}


def _append_dense(workspace: Workspace, build: Path, options: IndexConfig, model: str, meta: dict, documents: str,
                  passage_map: str, number: int) -> dict:
    """Encode the documents to append and add them, in shard tasks, to copies of the build's trained index: new
    shard files searched beside the built ones."""
    import ray

    numbering = PassageNumbering(options.num_shards, meta["passages"])
    table = f"append-{number:04d}-{EMBEDDINGS_TABLE}"
    _encode_documents(workspace, workspace.mirror(meta["build"]), options, EncoderActor, {"model": model}, table,
                      schemas.EMBEDDINGS, numbering, documents, passage_map)
    paths = [build / f"append-{number:04d}-shard-{shard:03d}.faiss" for shard in range(options.num_shards)]
    add = ray.remote(num_cpus=options.task_cpus, max_retries=SHARD_TASK_RETRIES)(shard_task)
    digests = ray.get([add.remote(workspace.uri, meta["build"], table, shard, path.name, options.device)
                       for shard, path in enumerate(paths)])
    total = functools.reduce(Digest.merge, digests, Digest())
    if total != Digest.of_range(numbering.next_id, first=meta["passages"]):
        raise ExactlyOnceError(f"index: the appended shards hold {total.rows} vectors for "
                               f"{numbering.next_id - meta['passages']} passages, or some twice; nothing was "
                               "committed: run the stage again")
    (build / table).unlink()
    files = meta["files"] + [path.name for path in paths]
    size = sum((build / name).stat().st_size for name in files)
    return meta | {"passages": numbering.next_id, "tokens": numbering.next_id, "files": files, "bytes": size}


def _remove_other_builds(workspace: Workspace, keep: str | None) -> None:
    """Once a new build is in use, the builds it replaced are deleted."""
    if not workspace.exists(BUILDS):
        return
    for info in workspace.fs.get_file_info(pafs.FileSelector(workspace.path(BUILDS))):
        if f"{BUILDS}/{info.base_name}" != keep and info.type == pafs.FileType.Directory:
            workspace.fs.delete_dir(info.path)


# ------------------------------------------------------------------------------------------------ dense
def _build_dense(context: StageContext, model: str, key: str) -> tuple[dict, dict]:
    options, workspace = context.options, context.workspace
    plan = faiss_index.plan_index(options.factory, dense_dim(model))
    docs = workspace.row_count(EVAL_DOCS)
    if options.passages is None:  # one vector per document: the training points are known before encoding
        faiss_index.check_training_points(plan, docs, options.train_sample, f"{EVAL_DOCS} ({docs} documents)")
    relative = f"{BUILDS}/{key}"
    build = workspace.mirror(relative)
    build.clear()  # an interrupted build of the same key
    context.ray()
    numbering = PassageNumbering(options.num_shards)
    pace = _encode_documents(workspace, build, options, EncoderActor,
                             {"model": workspace.share(model), "workspace": workspace.uri}, EMBEDDINGS_TABLE,
                             schemas.EMBEDDINGS, numbering)
    passages = numbering.next_id
    faiss_index.check_training_points(plan, passages, options.train_sample, f"the {passages} passages")
    files, digests, trained_on = build_from_table(build, plan, passages, options.num_shards, options.train_sample,
                                                  options.device, options.task_cpus, _task_gpus(options))
    if not options.keep_vectors:
        build.remove(EMBEDDINGS_TABLE)
    size = sum(build.size(name) for name in files + ([faiss_index.MERGED_LISTS] if plan.merges_on_disk else []))
    meta = {"kind": "dense", "dim": plan.dim, "docs": docs, "passages": passages, "tokens": passages, "model": model,
            "key": key, "build": relative, "factory": plan.factory, "files": files,
            "search_params": faiss_index.default_search_params(plan), "bytes": size,
            "passage_split": options.passages.model_dump() if options.passages else None}
    logger.info("index: %d documents as %d passages, %s at dim %d, %.1f MB in %s (trained on %d vectors)", docs,
                passages, plan.factory, plan.dim, size / 2**20, workspace.location(relative), trained_on)
    metrics = {"dim": float(plan.dim), "shards": float(options.num_shards), "passages": float(passages),
               "encoded_documents": float(docs),
               "passages_per_doc": passages / max(docs, 1), "index_bytes": float(size),
               "bytes_per_vector": size / max(passages, 1)} | pace
    return meta, metrics | {f"shard_{i}_size": float(s.rows) for i, s in enumerate(digests)}


def _task_gpus(options: IndexConfig) -> int:
    """GPUs an index task that can use one reserves: one when the stage has GPUs (its actors take some) and its
    device allows them, else none; FAISS and torch in a task that reserved no GPU stay on the CPUs."""
    return 1 if options.num_gpus_per_actor and options.device != "cpu" else 0


def build_from_table(build: Mirror, plan: faiss_index.IndexPlan, vectors: int, shards: int, train_sample: int,
                     device: str = "auto", task_cpus: float = 1, gpus: int = 0) -> tuple[list[str], list[Digest], int]:
    """Build the index of the vector table in `build` (steps 2-4 above, each in Ray tasks reserving `task_cpus`, and
    `gpus` where `faiss_index.gpu_plan` puts work on a GPU: training, and adding to an index it clones); returns its
    files, each shard's digest of the ids it added and the vectors trained on. Checks that the shards hold every one
    of the `vectors` once. Each task writes its own file (on an object store: uploads it)."""
    import ray

    uri, relative = build.workspace.uri, build.relative
    gpu_plan = faiss_index.gpu_plan(faiss_index.empty_index(plan))
    trained_on = in_task(train_task, uri, relative, EMBEDDINGS_TABLE, plan, train_sample, vectors, device,
                         num_cpus=task_cpus, num_gpus=gpus if plan.needs_training and gpu_plan != "cpu" else 0)
    shard_names = [f"shard-{shard:03d}.faiss" for shard in range(shards)]
    build_shard_file = ray.remote(num_cpus=task_cpus, num_gpus=gpus if gpu_plan == "clone" else 0,
                                  max_retries=SHARD_TASK_RETRIES)(shard_task)
    digests = ray.get([build_shard_file.remote(uri, relative, EMBEDDINGS_TABLE, shard, name, device)
                       for shard, name in enumerate(shard_names)])
    total = functools.reduce(Digest.merge, digests, Digest())
    if total != Digest.of_range(vectors):
        raise ExactlyOnceError(f"index: the shards hold {total.rows} vectors for {vectors} passages, or some twice; "
                               "nothing was committed: run the stage again")
    if not plan.merges_on_disk:
        return shard_names, digests, trained_on
    in_task(merge_task, uri, relative, shard_names, num_cpus=task_cpus)
    build.remove(*shard_names)
    return [faiss_index.MERGED], digests, trained_on


def _encode_documents(workspace: Workspace, build: Mirror, options: IndexConfig, actor: type, actor_kwargs: dict,
                      table: str, schema: pa.Schema, numbering, documents: str = EVAL_DOCS,
                      passage_map: str = PASSAGE_MAP) -> dict[str, float]:
    """Stream every document of `documents` (a workspace table) through the encoder `actor` pool into the build's
    `table` (rows numbered and cut into row groups by `numbering`, a PassageNumbering or TokenNumbering) and its
    `passage_map`; returns the encoding's pace (passages a second, after the first batch: start-up is not pace).

    Checked before anything is committed: every document gave exactly one first passage, and nothing else.
    """
    split = (options.passages.length, options.passages.stride) if options.passages else None
    dataset = read_table_dataset(workspace, documents, rows_per_block=options.batch_size).map_batches(
        actor, batch_format="numpy",
        fn_constructor_kwargs={"max_length": options.max_length, "batch_size": options.batch_size, "passages": split,
                               **actor_kwargs},
        **actor_map_args(options),
    )
    rows_path = build.folder / f".{passage_map}.rows"
    with pa.OSFile(str(rows_path), "wb") as sink, \
            pa.ipc.new_file(sink, pa.schema([("docid", pa.string()), ("passage", pa.int32())])) as passage_rows, \
            workspace.exactly_once_writer(f"{build.relative}/{table}", schema, ["docid"],
                                          expected=workspace.key_batches(documents, ["id"]),
                                          select=lambda rows: rows.filter(pc.equal(rows["passage"], 0))) as writer:
        started, arrived = time.perf_counter(), []
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            for part in numbering(batch):  # one row group each
                writer.write(part)
                passage_rows.write_table(part.select(["docid", "passage"]))
            arrived.append((time.perf_counter(), batch.num_rows))
        ended = time.perf_counter()
    write_passage_map(_read_ipc(rows_path), build.folder / passage_map)
    build.commit(passage_map)
    rows_path.unlink()
    return {"encode_seconds": ended - started, "encode_steady_passages_per_s": steady_pace(arrived)}


def _read_ipc(path: Path):
    reader = pa.ipc.open_file(pa.memory_map(str(path)))
    for i in range(reader.num_record_batches):
        yield reader.get_batch(i)


# ------------------------------------------------------------------------------------------------ ColBERT
def _build_colbert(context: StageContext, model: str, key: str) -> tuple[dict, dict]:
    """The compressed token index (`td_ray.retrieval.plaid`): codec trained in a task on a sample, documents
    encoded and compressed by actors into the codes table, shard tasks fill the token arrays and their lists, a
    task merges the lists on disk."""
    options, workspace = context.options, context.workspace
    spec = ColBERTSpec.load(model)
    relative = f"{BUILDS}/{key}"
    mirror = workspace.mirror(relative)
    mirror.clear()  # an interrupted build of the same key
    context.ray()
    started = time.perf_counter()
    shared = workspace.share(model)
    trained = in_task(train_codec_task, workspace.uri, relative, shared, options, num_cpus=options.task_cpus,
                      num_gpus=_task_gpus(options))
    logger.info("index: codec trained in %.1f s on %d token vectors of %d documents: %d centroids (about %d tokens "
                "in the collection), %d bits, %d B a token", time.perf_counter() - started, trained["sample_tokens"],
                trained["sample_docs"], trained["centroids"], trained["estimated_tokens"], options.colbert.nbits,
                trained["bytes_per_token"])
    numbering = TokenNumbering()
    _encode_documents(workspace, mirror, options, ColBERTEncoderActor,
                      {"model": shared, "workspace": workspace.uri, "build": relative}, CODES_TABLE,
                      schemas.TOKEN_CODES, numbering)
    passages, tokens = numbering.next_id, numbering.next_token
    layout = plaid.Layout(passages, tokens, trained["code_bytes"], trained["id_dtype"], trained["centroids"])
    if workspace.is_local:
        digests, entries = build_token_index(mirror.folder, layout, options.num_shards, options.task_cpus)
    else:  # the token arrays are filled in place: on one node's disk, then uploaded
        digests, entries = in_task(token_index_task, workspace.uri, relative, layout, options.num_shards,
                                   options.task_cpus, num_cpus=0)
    if not options.keep_vectors:
        mirror.remove(CODES_TABLE)
    size = sum(mirror.size(name) for name in plaid.FILES)
    docs = workspace.row_count(EVAL_DOCS)
    meta = {"kind": "colbert", "dim": trained["dim"], "docs": docs, "passages": passages, "tokens": tokens,
            "model": model, "key": key, "build": relative, "files": plaid.FILES, "nbits": options.colbert.nbits,
            "centroids": layout.nlist, "query_maxlen": spec.query_maxlen, "bytes": size,
            "bytes_per_token": trained["bytes_per_token"], "error_bound": trained["error_bound"],
            "code_bytes": layout.code_bytes, "id_dtype": layout.id_dtype, "ivf_entries": entries,
            "passage_split": options.passages.model_dump() if options.passages else None}
    logger.info("index: %d documents as %d passages and %d tokens (%.1f a passage), %d centroids, %d-bit residuals: "
                "%.1f MB in %s (%.1f B a token with the lists)", docs, passages, tokens, tokens / max(passages, 1),
                layout.nlist, options.colbert.nbits, size / 2**20, workspace.location(relative),
                size / max(tokens, 1))
    metrics = {"dim": float(trained["dim"]), "shards": float(options.num_shards), "passages": float(passages),
               "tokens": float(tokens), "tokens_per_passage": tokens / max(passages, 1), "centroids": float(layout.nlist),
               "index_bytes": float(size), "bytes_per_token": size / max(tokens, 1), "ivf_entries": float(entries),
               "codec_error_bound": trained["error_bound"], "codec_sample_documents": float(trained["sample_docs"]),
               "codec_seconds": trained["seconds"], "encoded_documents": float(docs)}
    return meta, metrics | {f"shard_{i}_size": float(d.rows) for i, d in enumerate(digests)}


def build_token_index(build: Path, layout: plaid.Layout, shards: int, task_cpus: float = 1,
                      previous: plaid.Layout | None = None, table: str = CODES_TABLE,
                      same_node: bool = False) -> tuple[list[Digest], int]:
    """From the codes `table` in `build`: allocate the token arrays of `layout` (or grow those of the `previous`
    layout's build), fill each shard's passages in its own Ray task (retried when its worker dies), check that every
    passage was written once, and merge the inverted lists on disk in a task (after the previous passages' lists),
    every task reserving `task_cpus`; with `same_node`, every task runs on this process's node (whose disk `build`
    is on). Returns each shard's digest of its passages and the lists' entries."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    first = previous.passages if previous is not None else 0
    if previous is None:
        layout.allocate(build)
    else:
        layout.resize(build)
    placement = {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                       soft=False)} if same_node else {}
    fill = ray.remote(num_cpus=task_cpus, max_retries=SHARD_TASK_RETRIES)(token_shard_task).options(**placement)
    digests = ray.get([fill.remote(str(build / table), str(build), shard, first + start, first + end, layout)
                       for shard, (start, end) in enumerate(plaid.shard_ranges(layout.passages - first, shards))])
    total = functools.reduce(Digest.merge, digests, Digest())
    if total != Digest.of_range(layout.passages, first=first):
        raise ExactlyOnceError(f"index: the token shards hold {total.rows} passages for {layout.passages - first}, "
                               "or some twice; nothing was committed: run the stage again")
    merge = ray.remote(num_cpus=task_cpus)(merge_lists_task).options(**placement)
    return digests, ray.get(merge.remote(str(build), list(range(shards)), layout, previous))


def token_index_task(workspace_uri: str, build: str, layout: plaid.Layout, shards: int,
                     task_cpus: float) -> tuple[list[Digest], int]:
    """Ray task, for an object-store workspace: `build_token_index` on this node's copy of the build (its shard and
    merge tasks pinned to this node, so the arrays they fill in place are on one disk), then upload the index."""
    mirror = Workspace(workspace_uri).mirror(build)
    folder = mirror.fetch(CODES_TABLE, plaid.CODEC, plaid.CODEC_RANGE)
    built = build_token_index(folder, layout, shards, task_cpus, same_node=True)
    mirror.commit(*plaid.FILES)
    return built
