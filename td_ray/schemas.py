"""Every table td-ray writes, as one pyarrow schema each.

Stages talk only through Parquet tables in the workspace; this module is the contract between them.
Ids are strings everywhere (MS MARCO ids are digits, NeuCLIR ids are UUIDs: both fit).
"""
from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from td_ray.errors import TdRayError

#: A collection of passages or documents, in one language.
DOCS = pa.schema([("id", pa.string()), ("text", pa.string())])
#: Queries or topics, in one language.
QUERIES = pa.schema([("id", pa.string()), ("text", pa.string())])
#: Relevance judgements; graded (NeuCLIR uses 3 / 1 / 0).
QRELS = pa.schema([("qid", pa.string()), ("docid", pa.string()), ("relevance", pa.int32())])
#: First-stage candidates per training query (top K, rank 1 is best).
CANDIDATES = pa.schema(
    [("qid", pa.string()), ("pid", pa.string()), ("rank", pa.int32()), ("score", pa.float32())]
)
#: translate: the work list of one (kind, lang, model): English rows not yet in the store, with their text hash.
TRANSLATE_TODO = pa.schema([("id", pa.string()), ("text", pa.string()), ("source_hash", pa.string())])
#: translate: every translation made, keyed by (id, lang, mt_model, source_hash); flags say what looked wrong.
TRANSLATION_STORE = pa.schema(
    [
        ("id", pa.string()),
        ("lang", pa.string()),
        ("mt_model", pa.string()),
        ("source_hash", pa.string()),
        ("text", pa.string()),
        ("segments", pa.int32()),
        ("source_tokens", pa.int32()),
        ("target_tokens", pa.int32()),
        ("attempts", pa.int8()),
        ("flags", pa.list_(pa.string())),
    ]
)
#: translate: the current view, one row per (id, lang) of the current input; later stages read only this.
TRANSLATIONS = pa.schema(
    [
        ("id", pa.string()),
        ("lang", pa.string()),
        ("text", pa.string()),
        ("mt_model", pa.string()),
        ("source_hash", pa.string()),
        ("flags", pa.list_(pa.string())),
    ]
)
#: score: the teacher's raw score (a logit, never squashed) per (qid, pid). Ids and scores only.
SCORES = pa.schema(
    [("qid", pa.string()), ("pid", pa.string()), ("score", pa.float32()), ("teacher", pa.string())]
)
#: distill: one training example per query, PyLate-style: candidate ids best-scored first with their raw teacher
#: scores, and the qrels positives (empty unless the Translate-Train baseline asks for them). Text is joined late.
EXAMPLES = pa.schema(
    [
        ("qid", pa.string()),
        ("pids", pa.list_(pa.string())),
        ("teacher_scores", pa.list_(pa.float32())),
        ("positives", pa.list_(pa.string())),
    ]
)
#: index: the student's embedding of each passage (its number within its document), with its FAISS id and shard.
#: Vector columns are large_list (64-bit offsets): a shard of 2^31 / dim rows would overflow a plain list column.
EMBEDDINGS = pa.schema(
    [
        ("docid", pa.string()),
        ("passage", pa.int32()),
        ("faiss_id", pa.int64()),
        ("shard", pa.int32()),
        ("vector", pa.large_list(pa.float32())),
    ]
)
#: index, ColBERT students: each passage's compressed tokens, in passage-number (faiss_id) order: its first token
#: row, its tokens, and per token the centroid id (little-endian uint16, or uint32 past 65,536 centroids) and the
#: residual code, as bytes.
TOKEN_CODES = pa.schema(
    [
        ("docid", pa.string()),
        ("passage", pa.int32()),
        ("faiss_id", pa.int64()),
        ("first_token", pa.int64()),
        ("tokens", pa.int32()),
        ("centroid_ids", pa.large_binary()),
        ("residuals", pa.large_binary()),
    ]
)
#: evaluate: a ranked run, the Parquet twin of the TREC run file.
RUN = pa.schema(
    [("qid", pa.string()), ("docid", pa.string()), ("rank", pa.int32()), ("score", pa.float32())]
)


class MissingColumnsError(TdRayError):
    """A stage's input table lacks columns the stage needs."""


def require_columns(schema: pa.Schema, required: Iterable[str], table: str) -> None:
    """Fail before any work starts if `table` lacks one of the `required` columns."""
    missing = [name for name in required if name not in schema.names]
    if missing:
        raise MissingColumnsError(
            f"table {table!r} is missing column(s) {missing}; it has {schema.names}. "
            "Re-create it with the stage that writes it, or fix the input file's columns."
        )
