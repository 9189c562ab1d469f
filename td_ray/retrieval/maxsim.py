"""Exact MaxSim, the late-interaction score of ColBERT-X: per query token, the best dot product with any of the
passage's tokens, summed. The compressed token index (:mod:`td_ray.retrieval.plaid`) scores its candidates with it
over decoded tokens; :func:`exhaustive_search` scores every passage with the original vectors and is the oracle
that tests and the benchmark compare the compressed search with."""
from __future__ import annotations

import numpy as np


def token_rows(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The rows ``starts[i] .. starts[i] + counts[i] - 1`` of every i, concatenated in order."""
    starts, counts = np.asarray(starts, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    segments = np.cumsum(counts) - counts
    return np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(starts - segments, counts)


def maxsim_scores(query: np.ndarray, token_vectors: np.ndarray, doc_offsets: np.ndarray, docs: np.ndarray,
                  chunk: int = 1024) -> np.ndarray:
    """Exact MaxSim of one query [Lq, dim] against each of `docs` (passage numbers). Passage j's tokens are the
    rows ``doc_offsets[j]:doc_offsets[j + 1]`` of `token_vectors`; `chunk` passages are scored at a time."""
    docs = np.asarray(docs, dtype=np.int64)
    doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
    out = np.empty(len(docs), dtype=np.float32)
    for begin in range(0, len(docs), chunk):
        part = docs[begin:begin + chunk]
        starts, lengths = doc_offsets[part], doc_offsets[part + 1] - doc_offsets[part]
        if (lengths < 1).any():
            raise ValueError(f"passages {part[lengths < 1][:5].tolist()} have no tokens; MaxSim needs at least one")
        segments = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        similarity = query @ np.asarray(token_vectors[token_rows(starts, lengths)]).T  # [Lq, tokens of these]
        out[begin:begin + chunk] = np.maximum.reduceat(similarity, segments, axis=1).sum(axis=0)
    return out


def exhaustive_search(token_vectors: np.ndarray, doc_offsets: np.ndarray, queries,
                      depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Every passage scored by exact MaxSim against each query: scores and passage numbers [n, min(depth,
    passages)], best first (ties by passage number)."""
    passages = np.arange(len(doc_offsets) - 1)
    width = min(depth, len(passages))
    scores = np.empty((len(queries), width), dtype=np.float32)
    ids = np.empty((len(queries), width), dtype=np.int64)
    for row, query in enumerate(queries):
        exact = maxsim_scores(np.asarray(query, dtype=np.float32), token_vectors, doc_offsets, passages)
        order = np.lexsort((passages, -exact))[:width]
        scores[row], ids[row] = exact[order], passages[order]
    return scores, ids
