"""MaxP: a document scores as its best passage, and runs list documents, never passages.

The index stage writes a passage map, an Arrow IPC file whose row i is the (docid, passage) of faiss id i. Search
memory-maps it and looks up only the ids it found, so no process holds the mapping of the whole collection.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa

PASSAGE_MAP_SCHEMA = pa.schema([("docid", pa.string()), ("passage", pa.int32())])


def write_passage_map(batches: Iterable[pa.RecordBatch | pa.Table], path: Path) -> int:
    """Write (docid, passage) rows, in faiss-id order, as the passage map; returns the rows."""
    import os

    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    rows = 0
    with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, PASSAGE_MAP_SCHEMA) as writer:
        for batch in batches:
            table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
            writer.write_table(table.select(PASSAGE_MAP_SCHEMA.names).cast(PASSAGE_MAP_SCHEMA))
            rows += table.num_rows
    os.replace(temporary, path)
    return rows


class PassageMap:
    """faiss id -> (docid, passage), memory-mapped; from one map, or several whose ids follow each other (a build
    and its appends)."""

    def __init__(self, paths: Path | list[Path]):
        self.batches = []
        for path in [paths] if isinstance(paths, Path) else paths:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            self.batches += [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.starts = np.cumsum([0] + [batch.num_rows for batch in self.batches])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def docids(self, ids: np.ndarray) -> np.ndarray:
        """The docid of each faiss id (an object array shaped like `ids`)."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty(len(flat), dtype=object)
        which = np.searchsorted(self.starts, flat, side="right") - 1
        order = np.argsort(which, kind="stable")
        for chosen in np.split(order, np.flatnonzero(np.diff(which[order])) + 1) if len(order) else []:
            batch = which[chosen[0]]
            rows = pa.array(flat[chosen] - self.starts[batch])
            out[chosen] = self.batches[batch].column(0).take(rows).to_numpy(zero_copy_only=False)
        return out.reshape(np.shape(ids))


def maxp(scores: np.ndarray, ids: np.ndarray, docids_of: Callable[[np.ndarray], np.ndarray],
         depth: int) -> list[list[tuple[str, float]]]:
    """Per query, its documents by their best passage's score, best first, at most `depth`; ties go to the smaller
    docid, so a run is the same every time. `scores` and `ids` are a search's [n, k] passage hits (-1 pads)."""
    found = ids >= 0
    docids = np.full(ids.shape, None, dtype=object)
    if found.any():
        docids[found] = docids_of(ids[found])
    runs = []
    for row_scores, row_docs, row_found in zip(scores, docids, found):
        best: dict[str, float] = {}
        for score, docid in zip(row_scores[row_found].tolist(), row_docs[row_found].tolist()):
            if score > best.get(docid, -np.inf):
                best[docid] = score
        runs.append(sorted(best.items(), key=lambda item: (-item[1], item[0]))[:depth])
    return runs


def rank_documents(searcher, passages: PassageMap, queries: np.ndarray, depth: int,
                   passage_depth: int) -> list[list[tuple[str, float]]]:
    """The top `depth` documents of each query by MaxP over its top `passage_depth` passages. A query whose
    passages name fewer than `depth` documents is searched again twice as deep, until it has them or the index
    is exhausted, so a document-level run is never cut short by passages of the same documents."""
    runs: list[list[tuple[str, float]]] = [[] for _ in range(len(queries))]
    pending = np.arange(len(queries))
    k = min(passage_depth, searcher.ntotal)
    while len(pending) and k > 0:
        scores, ids = searcher.search(queries[pending], k)
        for query, run in zip(pending, maxp(scores, ids, passages.docids, depth)):
            runs[query] = run
        if k >= searcher.ntotal:
            break
        pending = np.array([query for query in pending if len(runs[query]) < depth], dtype=np.int64)
        k = min(2 * k, searcher.ntotal)
    return runs
