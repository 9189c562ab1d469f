"""The index stage's Ray shell: the Data actors that hold one student encoder each (dense passages, or ColBERT
token vectors compressed by the build's codec), and the tasks that train the index (or the codec), fill each shard
and merge them."""
from __future__ import annotations

from pathlib import Path

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from td_ray import devices
from td_ray.config import IndexConfig
from td_ray.encoders.dense import StudentEncoder
from td_ray.encoders.passages import split_passages
from td_ray.index.core import (
    TokenReservoir,
    document_changes,
    document_fingerprints,
    in_sample,
    plan_centroids,
    sample_fraction,
    sample_vectors,
    shard_batches,
)
from td_ray.keys import Digest
from td_ray.retrieval import faiss_index, plaid
from td_ray.retrieval.layout import DOCUMENTS, TRAINED
from td_ray.workspace import EVAL_DOCS, Workspace

#: Columns the actor reads from each batch.
INPUT_COLUMNS = ("id", "text")


def _texts(batch: dict[str, np.ndarray]) -> list[str]:
    return ["" if text is None else str(text) for text in batch["text"]]


class EncoderActor:
    """Encodes batches of documents ``{id, text}`` into passage rows ``{docid, passage, vector}``: each document cut
    into windows of `passages` = (length, stride) student tokens, or kept whole (cut at max_length) when None.
    Loads the model once."""

    def __init__(self, model: str, max_length: int, batch_size: int, passages: tuple[int, int] | None,
                 workspace: str | None = None):
        if workspace is not None:  # `model` as shared with the cluster (`Workspace.share`)
            model = Workspace(workspace).resolve(model)
        self.encoder = StudentEncoder(model, max_length=max_length, batch_size=batch_size)
        self.passages = passages

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        per_doc = _passages(self.encoder.tokenizer, _texts(batch), self.passages)
        counts = np.array([len(parts) for parts in per_doc], dtype=np.int64)
        vectors = self.encoder.encode([part for parts in per_doc for part in parts])
        return pa.table({
            "docid": pa.array(np.repeat(np.asarray(batch["id"], dtype=object), counts), pa.string()),
            "passage": pa.array(np.concatenate([np.arange(n) for n in counts]) if len(counts) else [], pa.int32()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]),
        })


def _passages(tokenizer, texts: list[str], passages: tuple[int, int] | None) -> list[list[str]]:
    """Each document's passages (windows of student tokens), or the document itself when `passages` is None."""
    return [[text] for text in texts] if passages is None else split_passages(tokenizer, texts, *passages)


class ColBERTEncoderActor:
    """Encodes batches of documents ``{id, text}`` into compressed passage rows ``{docid, passage, tokens,
    centroid_ids, residuals}``: the ColBERT student's vectors of the tokens MaxSim uses, each stored as its centroid
    id and residual code by the build's trained codec (`td_ray.retrieval.plaid`), as bytes. Loads both once."""

    def __init__(self, model: str, max_length: int, batch_size: int, passages: tuple[int, int] | None, build: str,
                 workspace: str):
        from td_ray.encoders.colbert import ColBERTStudentEncoder

        workspace_ = Workspace(workspace)  # `model` as shared with the cluster; `build` workspace-relative
        self.encoder = ColBERTStudentEncoder(workspace_.resolve(model), max_length=max_length, batch_size=batch_size)
        self.codec = plaid.ResidualCodec.load(workspace_.mirror(build).fetch(plaid.CODEC, plaid.CODEC_RANGE))
        self.passages = passages

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        per_doc = _passages(self.encoder.tokenizer.hf, _texts(batch), self.passages)
        counts = np.array([len(parts) for parts in per_doc], dtype=np.int64)
        encoded = self.encoder.encode_documents([part for parts in per_doc for part in parts])
        tokens = np.array([len(vectors) for vectors in encoded], dtype=np.int32)
        vectors = np.concatenate(encoded) if encoded else np.zeros((0, self.codec.dim), np.float32)
        ids, residuals = self.codec.encode(vectors, self.encoder.device)
        return pa.table({
            "docid": pa.array(np.repeat(np.asarray(batch["id"], dtype=object), counts), pa.string()),
            "passage": pa.array(np.concatenate([np.arange(n) for n in counts]) if len(counts) else [], pa.int32()),
            "tokens": tokens,
            "centroid_ids": plaid.per_passage_bytes(ids, tokens),
            "residuals": plaid.per_passage_bytes(residuals, tokens),
        })


def train_codec_task(workspace_uri: str, build: str, model: str, options: IndexConfig) -> dict:
    """Ray task: train the build's codec (`_train_codec`) and store it; `build` is workspace-relative, `model` as
    shared with the cluster."""
    workspace = Workspace(workspace_uri)
    mirror = workspace.mirror(build)
    trained = _train_codec(workspace, mirror.folder, workspace.resolve(model), options)
    mirror.commit(plaid.CODEC, plaid.CODEC_RANGE)
    return trained


def _train_codec(workspace: Workspace, build: Path, model: str, options: IndexConfig) -> dict:
    """Encode documents drawn evenly from the collection (PLAID's sample size), keep a uniform sample of at most
    `train_sample` of their token vectors in one buffer, train the codec on it on the device and threads the task
    reserved, and save it in the local folder `build`; returns what it was trained on."""
    from td_ray.devices import resolve_device, use_reserved_threads
    from td_ray.encoders.colbert import ColBERTStudentEncoder

    started = time.perf_counter()
    threads = use_reserved_threads()
    device = resolve_device(options.device)
    docs = workspace.row_count(EVAL_DOCS)
    chosen = sample_fraction(docs)
    encoder = ColBERTStudentEncoder(model, max_length=options.max_length, batch_size=options.batch_size,
                                    device=device)
    split = (options.passages.length, options.passages.stride) if options.passages else None
    reservoir, seen_docs = TokenReservoir(options.train_sample), 0
    for batch in workspace.iter_batches(EVAL_DOCS, columns=["id", "text"], batch_size=options.batch_size * 4):
        rows = np.flatnonzero(in_sample(batch.column("id"), chosen))
        if not len(rows):
            continue
        texts = _texts({"text": batch.column("text").take(pa.array(rows)).to_numpy(zero_copy_only=False)})
        encoded = encoder.encode_documents([part for parts in _passages(encoder.tokenizer.hf, texts, split)
                                            for part in parts])
        reservoir.add(np.concatenate(encoded))
        seen_docs += len(rows)
    sample = reservoir.sample
    estimated = int(reservoir.seen / max(seen_docs, 1) * docs)
    centroids = plan_centroids(options.colbert.centroids, estimated, len(sample))
    codec = plaid.ResidualCodec.train(sample, centroids, options.colbert.nbits, options.colbert.kmeans_niter,
                                      device=device, in_place=True)
    codec.save(build)
    return {"sample_docs": seen_docs, "sample_tokens": len(sample), "estimated_tokens": estimated,
            "centroids": centroids, "dim": codec.dim, "code_bytes": codec.code_bytes, "id_dtype": codec.id_dtype.str,
            "error_bound": codec.error_bound(), "bytes_per_token": codec.bytes_per_token, "device": device,
            "threads": threads, "seconds": time.perf_counter() - started}


def fingerprints_task(workspace_uri: str, build: str) -> int:
    """Ray task: write (id, text fingerprint) of every evaluation document into the build; returns the documents."""
    workspace = Workspace(workspace_uri)
    table = document_fingerprints(workspace.iter_batches(EVAL_DOCS, ["id", "text"]))
    workspace.write_table(table, f"{build}/{DOCUMENTS}")
    return table.num_rows


def changes_task(workspace_uri: str, build: str, documents: str, passage_maps: list[str]) -> dict:
    """Ray task: what changed in the evaluation documents since the build in `build`: the documents to encode
    (new or changed) copied to the table `documents` (workspace-relative), the build's passages of changed or
    removed documents, and the current fingerprints, saved beside the built ones to replace them once the append
    is committed."""
    from td_ray.retrieval.maxp import PassageMap

    workspace = Workspace(workspace_uri)
    current = document_fingerprints(workspace.iter_batches(EVAL_DOCS, ["id", "text"]))
    encode, stale = document_changes(pq.read_table(Path(build) / DOCUMENTS), current)
    with workspace.atomic_writer(documents, workspace.read_schema(EVAL_DOCS)) as writer:
        for batch in workspace.iter_batches(EVAL_DOCS):
            chosen = batch.filter(pc.is_in(batch.column("id").cast(pa.string()), encode))
            if chosen.num_rows:
                writer.write(pa.Table.from_batches([chosen]))
    passages, first = [], 0
    for batch in PassageMap([Path(path) for path in passage_maps]).batches:
        passages.append(first + np.flatnonzero(pc.is_in(batch.column("docid"), stale).to_numpy(zero_copy_only=False)))
        first += batch.num_rows
    pq.write_table(current, Path(build) / f"{DOCUMENTS}.next")
    return {"encode": len(encode), "stale_documents": len(stale),
            "stale_passages": np.concatenate(passages) if passages else np.zeros(0, np.int64)}


def token_shard_task(table: str, build: str, shard: int, first: int, last: int, layout: plaid.Layout) -> Digest:
    """Ray task: fill passages [first, last) of the token index from the codes table, and write its lists."""
    return plaid.write_shard(Path(table), Path(build), shard, first, last, layout)


def merge_lists_task(build: str, shards: list[int], layout: plaid.Layout, previous: plaid.Layout | None = None) -> int:
    """Ray task: lay the shards' inverted lists (after the `previous` passages' built ones) out as one on disk."""
    return plaid.merge_lists(Path(build), shards, layout, previous)


def train_task(workspace_uri: str, build: str, table: str, plan: faiss_index.IndexPlan, sample: int, rows: int,
               device: str) -> int:
    """Ray task: train the plan's index on about `sample` vectors drawn evenly from the build's vector `table`, save it
    empty into the build."""
    devices.use_reserved_threads()
    workspace = Workspace(workspace_uri)
    mirror = workspace.mirror(build)
    with workspace.fs.open_input_file(workspace.path(f"{build}/{table}")) as handle:
        vectors = sample_vectors(handle, rows, sample, plan.dim)
    faiss_index.write_atomic(faiss_index.train(plan, vectors, device), mirror.folder / TRAINED)
    mirror.commit(TRAINED)
    return len(vectors)


def shard_task(workspace_uri: str, build: str, table: str, shard: int, out: str, device: str) -> Digest:
    """Ray task: add the shard's own row groups of the build's vector `table` (read alone, from the workspace) to a copy
    of the trained index, and write it as the build's file `out`."""
    devices.use_reserved_threads()
    workspace = Workspace(workspace_uri)
    mirror = workspace.mirror(build)
    mirror.fetch(TRAINED)
    with workspace.fs.open_input_file(workspace.path(f"{build}/{table}")) as handle:
        added = faiss_index.add_shard(mirror.folder / TRAINED, shard_batches(handle, shard), mirror.folder / out,
                                      device)
    mirror.commit(out)
    return added


def merge_task(workspace_uri: str, build: str, shards: list[str]) -> int:
    """Ray task: merge the build's IVF shards into one index whose inverted lists are one on-disk file."""
    devices.use_reserved_threads()
    mirror = Workspace(workspace_uri).mirror(build)
    folder = mirror.fetch(TRAINED, *shards)
    vectors = faiss_index.merge_on_disk(folder / TRAINED, [folder / name for name in shards],
                                        folder / faiss_index.MERGED, folder / faiss_index.MERGED_LISTS)
    mirror.commit(faiss_index.MERGED_LISTS, faiss_index.MERGED)
    return vectors
