"""index: every passage encoded once into FAISS shards built by Ray tasks; the flat token index's merge."""
from __future__ import annotations

import faiss
import numpy as np

from td_ray.encoders.dense import StudentEncoder
from td_ray.retrieval.faiss_index import Searcher
from td_ray.retrieval.layout import PASSAGE_MAP, build_path, read_index_meta
from td_ray.retrieval.maxp import PassageMap
from td_ray.retrieval.maxsim import build_shard, merge_shards, reconstruct_all, stored_ids
from td_ray.workspace import EVAL_DOCS, STUDENT_DIR, Workspace


def _shard_vectors(workspace: Workspace, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """Every (faiss id, vector) the build's Flat shards hold."""
    ids, vectors = [], []
    for name in meta["files"]:
        shard = faiss.read_index(str(build_path(workspace, meta, name)))
        ids.append(stored_ids(shard))
        vectors.append(reconstruct_all(shard))
    return np.concatenate(ids), np.concatenate(vectors)


def test_the_index_holds_every_passage_once_and_each_vector_finds_itself(pipeline_run):
    config, results = pipeline_run
    workspace = Workspace(config.workspace)
    meta = read_index_meta(workspace)
    docs = workspace.read_table(EVAL_DOCS)
    passages = PassageMap(build_path(workspace, meta, PASSAGE_MAP))
    ids, vectors = _shard_vectors(workspace, meta)
    assert meta["factory"] == "Flat" and len(meta["files"]) == config.index.num_shards
    assert len(ids) == len(np.unique(ids)) == len(passages) == meta["passages"] >= docs.num_rows
    assert sorted(ids.tolist()) == list(range(len(ids)))
    assert set(passages.docids(ids)) == set(docs["id"].to_pylist())  # every document, through its passages
    assert all(results["index"].metrics[f"shard_{i}_size"] > 0 for i in range(config.index.num_shards))

    # the shards, searched in turn, rank exactly as a brute-force dot product over the whole collection
    searcher = Searcher([build_path(workspace, meta, name) for name in meta["files"]], None)
    queries = vectors[:7] + 0.01
    scores, found = searcher.search(queries, 5)
    brute = queries @ vectors.T
    np.testing.assert_allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :5], rtol=1e-4, atol=1e-4)
    assert found[:, 0].tolist() == ids[brute.argmax(axis=1)].tolist()

    # the stored vectors are the student's encoding of the passages (the demo's documents are one passage each)
    texts = dict(zip(docs["id"].to_pylist(), docs["text"].to_pylist()))
    encoder = StudentEncoder(workspace.path(STUDENT_DIR), max_length=config.index.max_length)
    direct = encoder.encode([texts[docid] for docid in passages.docids(ids[:5])])
    np.testing.assert_allclose(vectors[:5], direct, atol=1e-4)
    assert not build_path(workspace, meta, "embeddings.parquet").exists()  # the vectors live in the index only


def test_merge_moves_every_shard_into_one_index():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # unit vectors: each is its own nearest neighbour
    shards = [build_shard(vectors[i::3], np.arange(30)[i::3]) for i in range(3)]
    merged = merge_shards(shards, 8)
    assert merged.ntotal == 30 and sorted(stored_ids(merged)) == list(range(30))
    assert all(shard.ntotal == 0 for shard in shards)
    _, found = merged.search(vectors, 1)
    assert found[:, 0].tolist() == list(range(30))


def test_vector_columns_have_64_bit_offsets_and_are_assembled_chunk_by_chunk():
    """A shard's vectors pass 2^31 values (dense: 2^31 / dim rows; ColBERT: about 93 k documents), where a plain
    list column's 32-bit offsets overflow; chunks are turned into numpy one by one, never concatenated in Arrow."""
    import pyarrow as pa

    from td_ray import schemas
    from td_ray.index import vectors_of

    assert schemas.EMBEDDINGS.field("vector").type == pa.large_list(pa.float32())
    assert schemas.TOKEN_EMBEDDINGS.field("vectors").type == pa.large_list(pa.float32())
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)
    whole = pa.array(list(rows), pa.large_list(pa.float32()))
    chunked = pa.chunked_array([whole.slice(0, 1), whole.slice(1, 3), whole.slice(4)])  # sliced: offsets not at 0
    assert np.array_equal(vectors_of(chunked), rows)
    assert np.array_equal(vectors_of(pa.chunked_array([whole.slice(1)]), dim=2), rows[1:])


def test_a_table_written_as_one_row_group_is_read_in_blocks_every_actor_of_a_pool_can_take(tmp_path, ray_cluster):
    """The index stage reads the documents in blocks of `index.batch_size` rows: read as one block, the whole
    collection would go to a single encoder actor while the rest of the pool waited."""
    import pyarrow as pa

    from td_ray.raydata import read_table_dataset

    workspace = Workspace(str(tmp_path))
    workspace.write_table(pa.table({"id": [f"d{i}" for i in range(1000)]}), "docs.parquet")
    assert read_table_dataset(workspace, "docs.parquet").materialize().num_blocks() == 1
    blocks = read_table_dataset(workspace, "docs.parquet", rows_per_block=128).materialize()
    assert blocks.num_blocks() == 8
    assert sorted(row["id"] for row in blocks.take_all()) == sorted(f"d{i}" for i in range(1000))
