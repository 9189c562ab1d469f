"""ColBERT-X search over a token index: each query token's nearest document tokens give the candidate documents,
ranked by exact MaxSim (ColBERTv1's end-to-end retrieval), and the helpers of the flat token index it searches."""
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


def vectors_by_id(index: faiss.Index) -> np.ndarray:
    """Every stored vector as a [ntotal, dim] array whose row i holds id i (ids must be 0 .. ntotal - 1, as the
    token rows of a ColBERT index are)."""
    ids = stored_ids(index)
    if len(ids) and (ids.min() < 0 or ids.max() >= len(ids) or len(np.unique(ids)) != len(ids)):
        raise ValueError(f"the index's {len(ids)} ids are not 0 .. {len(ids) - 1}; rebuild it with the index stage")
    vectors = np.empty((index.ntotal, index.d), dtype=np.float32)
    vectors[ids] = reconstruct_all(index)
    return vectors


def maxsim_scores(query: np.ndarray, token_vectors: np.ndarray, doc_offsets: np.ndarray, docs: np.ndarray,
                  chunk: int = 1024) -> np.ndarray:
    """Exact MaxSim of one query [Lq, dim] against each of `docs` (document numbers): per query token, the best
    dot product with any of the document's tokens, summed. Document j's tokens are the rows
    ``doc_offsets[j]:doc_offsets[j + 1]`` of `token_vectors`; `chunk` documents are scored at a time."""
    docs = np.asarray(docs, dtype=np.int64)
    out = np.empty(len(docs), dtype=np.float32)
    for begin in range(0, len(docs), chunk):
        part = docs[begin:begin + chunk]
        starts, lengths = doc_offsets[part], doc_offsets[part + 1] - doc_offsets[part]
        if (lengths < 1).any():
            raise ValueError(f"documents {part[lengths < 1][:5].tolist()} have no tokens; MaxSim needs at least one")
        segments = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        rows = np.arange(lengths.sum()) + np.repeat(starts - segments, lengths)
        similarity = query @ token_vectors[rows].T  # [Lq, tokens of these documents]
        out[begin:begin + chunk] = np.maximum.reduceat(similarity, segments, axis=1).sum(axis=0)
    return out


def colbert_search(index: faiss.Index, token_vectors: np.ndarray, doc_offsets: np.ndarray, queries,
                   depth: int, hits_per_token: int) -> tuple[np.ndarray, np.ndarray]:
    """ColBERTv1 end-to-end retrieval over a token index whose ids are token rows.

    Each query token fetches its `hits_per_token` nearest document tokens; their documents are the candidates,
    and each candidate is scored exactly by MaxSim (:func:`maxsim_scores`) and ranked (ties by document number).
    `queries` is a [n, Lq, dim] array or a list of [Lq_i, dim] arrays. Returns scores and document numbers
    shaped like :func:`search`: [n, min(depth, docs)], padded with -inf and -1 when a query finds fewer.
    The ranking equals brute-force MaxSim over the whole collection once `hits_per_token` reaches the collection's
    token count; smaller values trade recall of the candidates, never the exactness of their scores.
    """
    doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
    queries = [np.ascontiguousarray(query, dtype=np.float32) for query in queries]
    width = min(depth, len(doc_offsets) - 1)
    scores = np.full((len(queries), width), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), width), -1, dtype=np.int64)
    if not queries or width < 1 or index.ntotal == 0:
        return scores, ids
    _, hits = index.search(np.concatenate(queries), min(hits_per_token, index.ntotal))
    bounds = np.cumsum([0] + [len(query) for query in queries])
    for row, query in enumerate(queries):
        found = hits[bounds[row]:bounds[row + 1]]
        candidates = np.unique(np.searchsorted(doc_offsets, found[found >= 0], side="right") - 1)
        exact = maxsim_scores(query, token_vectors, doc_offsets, candidates)
        order = np.lexsort((candidates, -exact))[:width]
        scores[row, :len(order)], ids[row, :len(order)] = exact[order], candidates[order]
    return scores, ids
