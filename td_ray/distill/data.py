"""Training examples: the score table (ids and scores only) joined late with query and passage text.

One English score table serves every language: the passage text comes from whichever translation the
config names. That join is the heart of Translate-Distill.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from td_ray import schemas
from td_ray.distill.sampling import ShortListError
from td_ray.textjoin import attach_text

logger = logging.getLogger(__name__)


__all__ = ["ShortListError", "build_examples"]


def build_examples(scores: pa.Table, queries: pa.Table, passages: pa.Table, nway: int,
                   short_list_policy: str = "skip", top_k: int | None = None) -> tuple[pa.Table, list[str]]:
    """One example per query: its `top_k` best-scored passages (all when None, at least `nway`), best first,
    with their teacher scores; the trainer samples nway of them at each step.

    Returns the examples and the qids skipped for having fewer than `nway` candidates.
    """
    joined = attach_text(scores.select(["qid", "pid", "score"]), passages, "pid", "passage", "passages",
                         "translate those passages into distill.passage_lang first")
    joined = attach_text(joined, queries, "qid", "query", "training queries",
                         "the score table and the training queries must come from the same collection")
    ordered = joined.sort_by([("qid", "ascending"), ("score", "descending"), ("pid", "ascending")])
    qids = ordered["qid"].to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.flatnonzero(qids[1:] != qids[:-1]) + 1, [len(qids)]]) if len(qids) else np.array([0])
    pids, texts, values, query_text = (ordered[name].to_pylist() for name in ("pid", "passage", "score", "query"))
    rows: dict[str, list] = {name: [] for name in schemas.EXAMPLES.names}
    skipped: list[str] = []
    for start, end in zip(starts[:-1], starts[1:]):
        if end - start < nway:
            if short_list_policy == "error":
                raise ShortListError(
                    f"query {qids[start]!r} has {end - start} scored candidates, fewer than nway={nway}; "
                    "lower distill.nway, score more candidates, or set distill.short_list_policy: skip"
                )
            skipped.append(str(qids[start]))
            continue
        take = slice(start, end if top_k is None else min(end, start + top_k))
        rows["qid"].append(str(qids[start]))
        rows["query"].append(query_text[start])
        rows["pids"].append(pids[take])
        rows["passages"].append(texts[take])
        rows["teacher_scores"].append(values[take])
    if skipped:
        logger.warning("skipped %d queries with fewer than %d candidates, e.g. %s", len(skipped), nway, skipped[:3])
    return pa.table(rows, schema=schemas.EXAMPLES), skipped
