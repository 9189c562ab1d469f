"""Pure evaluation logic: runs as tables, TREC runs, ir_measures."""
from __future__ import annotations


import numpy as np
import pyarrow as pa

from td_ray import schemas
from td_ray.errors import TdRayError


class MeasureError(TdRayError):
    """A measure name ir_measures does not know."""


def parse_measures(names: list[str]) -> list:
    """ir_measures measure objects for `names` (e.g. nDCG@20, R@100, RR@10)."""
    import ir_measures

    measures = []
    for name in names:
        try:
            measures.append(ir_measures.parse_measure(name))
        except (ValueError, NameError, KeyError, SyntaxError, TypeError):
            raise MeasureError(f"evaluate.measures: unknown measure {name!r}; use ir_measures names such as "
                               "nDCG@20, R@100, RR@10, AP") from None
    return measures


def document_run(qids: list[str], runs: list[list[tuple[str, float]]]) -> pa.Table:
    """A RUN table from each query's (docid, score) list, best first."""
    rows: dict[str, list] = {"qid": [], "docid": [], "rank": [], "score": []}
    for qid, run in zip(qids, runs):
        for position, (docid, score) in enumerate(run, start=1):
            rows["qid"].append(qid)
            rows["docid"].append(docid)
            rows["rank"].append(position)
            rows["score"].append(float(score))
    return pa.table(rows, schema=schemas.RUN)


def run_table(docids: dict[int, str], qids: list[str], scores: np.ndarray, ids: np.ndarray) -> pa.Table:
    """A RUN table from per-query score and id rows, best first (ids -1 are padding and dropped)."""
    return document_run(qids, [[(docids[int(i)], score) for score, i in zip(row_scores, row_ids) if i >= 0]
                               for row_scores, row_ids in zip(scores, ids)])


def trec_run_text(run: pa.Table, tag: str) -> str:
    """The run as `qid Q0 docid rank score tag` lines.

    >>> import pyarrow as pa
    >>> print(trec_run_text(pa.table({"qid": ["q1"], "docid": ["d7"], "rank": [1], "score": [2.5]}), "td"), end="")
    q1 Q0 d7 1 2.500000 td
    """
    lines = [f"{q} Q0 {d} {r} {s:.6f} {tag}" for q, d, r, s in zip(*(run[c].to_pylist() for c in ("qid", "docid", "rank", "score")))]
    return "\n".join(lines) + "\n"


def evaluate_run(run: pa.Table, qrels: pa.Table, names: list[str]) -> tuple[dict[str, float], pa.Table]:
    """Aggregate values per measure name, and a per-query table (qid, measure, value)."""
    import ir_measures

    measures = parse_measures(names)
    qrel_rows = [ir_measures.Qrel(q, d, int(r)) for q, d, r in zip(*(qrels[c].to_pylist() for c in ("qid", "docid", "relevance")))]
    run_rows = [ir_measures.ScoredDoc(q, d, float(s)) for q, d, s in zip(*(run[c].to_pylist() for c in ("qid", "docid", "score")))]
    aggregate = {name: float(ir_measures.calc_aggregate([measure], qrel_rows, run_rows)[measure])
                 for name, measure in zip(names, measures)}
    by_name = {str(measure): name for name, measure in zip(names, measures)}
    per_query = {"qid": [], "measure": [], "value": []}
    for item in ir_measures.iter_calc(measures, qrel_rows, run_rows):
        per_query["qid"].append(item.query_id)
        per_query["measure"].append(by_name.get(str(item.measure), str(item.measure)))
        per_query["value"].append(float(item.value))
    return aggregate, pa.table(per_query)
