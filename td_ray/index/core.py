"""Pure FAISS helpers: build a shard, merge shards into one index, search it."""
from __future__ import annotations

import faiss
import numpy as np


def build_shard(vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """An exact inner-product index over `vectors`, keyed by the int64 `ids`."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def merge_shards(shards: list[faiss.Index], dim: int) -> faiss.Index:
    """One index holding every shard's vectors (merge_from moves them: the shards are left empty)."""
    merged = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    for shard in shards:
        merged.merge_from(shard)
    return merged


def stored_ids(index: faiss.Index) -> np.ndarray:
    """The int64 ids an IndexIDMap holds, in storage order."""
    return faiss.vector_to_array(index.id_map)


def reconstruct_all(index: faiss.Index) -> np.ndarray:
    """Every stored vector, in the order of `stored_ids`."""
    return index.index.reconstruct_n(0, index.ntotal)


def searchable(index: faiss.Index) -> faiss.Index:
    """The index on all GPUs when this FAISS build has any (faiss-gpu extra), else as is."""
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_all_gpus(index)
    return index


def search(index: faiss.Index, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids of the top `depth` documents per query (id -1 pads when the index is smaller)."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(depth, index.ntotal))
