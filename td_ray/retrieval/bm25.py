"""BM25 (bm25s) over the evaluation documents: a lexical reference beside the student.

With English topics over target-language documents it scores near zero, which is the point: it shows the
vocabulary gap the cross-language student has to cross. It reads the whole collection into memory, so it is a
reference for small collections (the demo's, a sample), refused above `MAX_DOCUMENTS`.
"""
from __future__ import annotations

from collections.abc import Iterable

from td_ray.errors import TdRayError

MAX_DOCUMENTS = 1_000_000
"""Most documents the in-memory BM25 reference indexes."""


class TooManyDocumentsError(TdRayError):
    """The collection is too large for the in-memory BM25 reference."""


def bm25_rankings(docs: Iterable[tuple[str, str]], doc_count: int, queries: list[str],
                  depth: int) -> list[list[tuple[str, float]]]:
    """Per query, up to `depth` (docid, BM25 score) pairs, best first; documents with no query term are left out.

    Terms are bm25s's default: lowercased words of two or more characters, English stopwords removed.
    """
    import bm25s
    import numpy as np

    if doc_count > MAX_DOCUMENTS:
        raise TooManyDocumentsError(
            f"the BM25 reference holds the collection in memory and {doc_count:,} documents exceed "
            f"{MAX_DOCUMENTS:,}; set evaluate.bm25_reference: false for this collection")
    ids, texts = [], []
    for docid, text in docs:
        ids.append(docid)
        texts.append(text)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, show_progress=False), show_progress=False)
    vocabulary = retriever.vocab_dict
    rankings = []
    for query in queries:
        terms = [vocabulary[term] for term in bm25s.tokenize([query], return_ids=False, show_progress=False)[0]
                 if term in vocabulary]
        if not terms:
            rankings.append([])
            continue
        scores = retriever.get_scores(terms)
        top = np.argsort(-scores, kind="stable")[:depth]
        rankings.append([(ids[i], float(scores[i])) for i in top if scores[i] > 0])
    return rankings
