"""index: every document encoded once, FAISS shards built in parallel and merged into one index."""
from __future__ import annotations

import faiss
import numpy as np

from td_ray.distill.model import StudentEncoder
from td_ray.index.core import build_shard, merge_shards, reconstruct_all, stored_ids
from td_ray.workspace import (
    DOC_IDS,
    EMBEDDINGS,
    EVAL_DOCS,
    FAISS_INDEX,
    STUDENT_DIR,
    Workspace,
)


def test_merged_index_holds_every_document_once_and_each_vector_finds_itself(pipeline_run):
    config, results = pipeline_run
    workspace = Workspace(config.workspace)
    index = faiss.read_index(workspace.path(FAISS_INDEX))
    docs = workspace.read_table(EVAL_DOCS)
    mapping = workspace.read_table(DOC_IDS)
    ids = stored_ids(index)
    assert index.ntotal == docs.num_rows == len(np.unique(ids))
    assert sorted(mapping["docid"].to_pylist()) == sorted(docs["id"].to_pylist())
    assert results["index"].metrics["shard_0_size"] > 0 and results["index"].metrics["shard_1_size"] > 0

    vectors = reconstruct_all(index)
    # the merged index ranks exactly as a brute-force dot product over the whole collection
    queries = vectors[:7] + 0.01
    scores, found = index.search(queries, 5)
    brute = queries @ vectors.T
    np.testing.assert_allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :5], rtol=1e-4, atol=1e-4)
    assert found[:, 0].tolist() == ids[brute.argmax(axis=1)].tolist()

    # the stored vectors are the student's encoding of the document text
    by_faiss_id = dict(zip(mapping["faiss_id"].to_pylist(), mapping["docid"].to_pylist()))
    texts = dict(zip(docs["id"].to_pylist(), docs["text"].to_pylist()))
    encoder = StudentEncoder(workspace.path(STUDENT_DIR), max_length=config.index.max_length)
    direct = encoder.encode([texts[by_faiss_id[int(i)]] for i in ids[:5]])
    np.testing.assert_allclose(vectors[:5], direct, atol=1e-4)


def test_embeddings_table_shards_partition_the_collection(pipeline_run):
    config, _ = pipeline_run
    table = Workspace(config.workspace).read_table(EMBEDDINGS, columns=["docid", "shard"])
    shards = set(table["shard"].to_pylist())
    assert shards == set(range(config.index.num_shards))
    assert table.num_rows == len(set(table["docid"].to_pylist()))


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
