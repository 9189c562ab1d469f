"""index: every passage encoded once into FAISS shards built by Ray tasks."""
from __future__ import annotations

import faiss
import numpy as np

from td_ray.encoders.dense import StudentEncoder
from td_ray.retrieval.faiss_index import Searcher
from td_ray.retrieval.layout import PASSAGE_MAP, build_path, read_index_meta
from td_ray.retrieval.maxp import PassageMap
from td_ray.workspace import EVAL_DOCS, STUDENT_DIR, Workspace


def _shard_vectors(workspace: Workspace, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """Every (faiss id, vector) the build's Flat shards hold."""
    ids, vectors = [], []
    for name in meta["files"]:
        shard = faiss.read_index(str(build_path(workspace, meta, name)))
        ids.append(faiss.vector_to_array(shard.id_map))
        vectors.append(shard.index.reconstruct_n(0, shard.ntotal))
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


def test_vector_columns_have_64_bit_offsets():
    """A shard's vectors pass 2^31 values (2^31 / dim passages; a ColBERT shard's codes, 2^31 bytes), where a
    plain list or binary column's 32-bit offsets overflow."""
    import pyarrow as pa

    from td_ray import schemas

    assert schemas.EMBEDDINGS.field("vector").type == pa.large_list(pa.float32())
    assert schemas.TOKEN_CODES.field("residuals").type == schemas.TOKEN_CODES.field("centroid_ids").type == \
        pa.large_binary()


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
