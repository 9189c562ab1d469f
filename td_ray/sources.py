"""Read pipeline inputs (ir_datasets ids, TSV, JSONL, Parquet, TREC files) into the workspace as Parquet.

Each source is read lazily, row by row, and written in batches, so a collection never has to fit in memory.
An ingested table remembers the source it came from and is reused while that source is unchanged.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from td_ray import schemas
from td_ray.config import (
    DataSource,
    IrDatasetsSource,
    JsonlSource,
    ParquetSource,
    TrecQrelsSource,
    TrecRunSource,
    TsvSource,
)
from td_ray.errors import TdRayError
from td_ray.workspace import Workspace

logger = logging.getLogger(__name__)

Role = Literal["docs", "queries", "qrels", "candidates"]
ROLE_SCHEMAS: dict[str, pa.Schema] = {
    "docs": schemas.DOCS,
    "queries": schemas.QUERIES,
    "qrels": schemas.QRELS,
    "candidates": schemas.CANDIDATES,
}
ROLE_FORMATS: dict[str, tuple[str, ...]] = {
    "docs": ("tsv", "jsonl", "parquet", "ir_datasets"),
    "queries": ("tsv", "jsonl", "parquet", "ir_datasets"),
    "qrels": ("trec_qrels", "ir_datasets"),
    "candidates": ("trec_run", "ir_datasets"),
}
_BATCH_ROWS = 50_000


class SourceError(TdRayError):
    """An input that cannot be read as given: the message names the file, the line and the fix."""


def _open_text_lines(path: str) -> Iterator[tuple[int, str]]:
    if not os.path.isfile(path):
        raise SourceError(f"input file not found: {path} (check the path in the config's data section)")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise SourceError(
                    f"{path}:{number}: not valid UTF-8 ({error.reason} at byte {error.start}); "
                    "re-encode the file as UTF-8 (or repair it, e.g. with ftfy) and run again"
                ) from None
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def _tsv_rows(source: TsvSource) -> Iterator[tuple]:
    lines = _open_text_lines(source.path)
    columns = [source.id_column, source.text_column]
    if source.header:
        _, first = next(lines, (0, ""))
        names = first.split("\t")
        unknown = [column for column in columns if column not in names]
        if unknown:
            raise SourceError(f"{source.path}: header {names} has no column {unknown}; set id_column/text_column")
        columns = [names.index(column) for column in columns]
    elif not all(isinstance(column, int) for column in columns):
        raise SourceError(f"{source.path}: column names need `header: true`; otherwise give 0-based indices")
    needed = max(columns) + 1
    for number, line in lines:
        fields = line.split("\t")
        if len(fields) < needed or not fields[columns[0]]:
            raise SourceError(f"{source.path}:{number}: expected at least {needed} tab-separated fields with an id, "
                              f"got {line[:80]!r}")
        yield fields[columns[0]], fields[columns[1]]


def _jsonl_rows(source: JsonlSource) -> Iterator[tuple]:
    for number, line in _open_text_lines(source.path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SourceError(f"{source.path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or record.get(source.id_field) in (None, ""):
            raise SourceError(f"{source.path}:{number}: no {source.id_field!r} field (set id_field in the config)")
        text = " ".join(str(record.get(field) or "") for field in source.text_fields).strip()
        yield str(record[source.id_field]), text


def _parquet_rows(source: ParquetSource) -> Iterator[tuple]:
    import pyarrow.dataset as pads

    if not os.path.exists(source.path):
        raise SourceError(f"input not found: {source.path} (check the path in the config's data section)")
    dataset = pads.dataset(source.path, format="parquet")
    for column in (source.id_column, source.text_column):
        if column not in dataset.schema.names:
            raise SourceError(
                f"{source.path}: no column {column!r} (columns: {dataset.schema.names}); set id_column/text_column"
            )
    for batch in dataset.to_batches(columns=[source.id_column, source.text_column]):
        for doc_id, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            yield str(doc_id), text or ""


def _trec_run_rows(source: TrecRunSource) -> Iterator[tuple]:
    for number, line in _open_text_lines(source.path):
        fields = line.split()
        if len(fields) != 6:
            raise SourceError(f"{source.path}:{number}: a TREC run line has 6 fields (qid Q0 docid rank score tag)")
        try:
            yield fields[0], fields[2], int(fields[3]), float(fields[4])
        except ValueError:
            raise SourceError(f"{source.path}:{number}: rank must be an integer and score a number") from None


def _trec_qrels_rows(source: TrecQrelsSource) -> Iterator[tuple]:
    for number, line in _open_text_lines(source.path):
        fields = line.split()
        if len(fields) != 4:
            raise SourceError(f"{source.path}:{number}: a qrels line has 4 fields (qid 0 docid relevance)")
        try:
            yield fields[0], fields[2], int(fields[3])
        except ValueError:
            raise SourceError(f"{source.path}:{number}: relevance must be an integer") from None


def _irds_text(record: object, fields: list[str], source: IrDatasetsSource) -> str:
    missing = [field for field in fields if not hasattr(record, field)]
    if missing:
        raise SourceError(
            f"ir_datasets {source.id!r}: records have no field(s) {missing}; they have {list(record._fields)}. "
            "Set text_fields in the config."
        )
    return " ".join(str(getattr(record, field) or "") for field in fields).strip()


def _irds_rows(source: IrDatasetsSource, role: Role) -> Iterator[tuple]:
    import ir_datasets

    try:
        dataset = ir_datasets.load(source.id)
    except KeyError:
        raise SourceError(f"unknown ir_datasets id {source.id!r}; see https://ir-datasets.com for valid ids") from None
    fields = source.text_fields or ["text"]
    if role == "docs":
        for doc in dataset.docs_iter():
            yield doc.doc_id, _irds_text(doc, fields, source)
    elif role == "queries":
        for query in dataset.queries_iter():
            yield query.query_id, _irds_text(query, fields, source)
    elif role == "qrels":
        for qrel in dataset.qrels_iter():
            yield qrel.query_id, qrel.doc_id, int(qrel.relevance)
    else:  # scoreddocs carry scores, not ranks: rank them per query here
        yield from _rank_scored(dataset.scoreddocs_iter())


def _rank_scored(scored: Iterator) -> Iterator[tuple]:
    """Rank scoreddocs per query by score (they carry no ranks, and need not arrive grouped by query).

    Holds every (query, doc, score) in memory: for MS MARCO's full BM25 top-1000 prefer a TREC run file.
    """
    groups: dict[str, list[tuple[str, float]]] = {}
    for item in scored:
        groups.setdefault(item.query_id, []).append((item.doc_id, float(item.score)))
    for query_id, group in groups.items():
        group.sort(key=lambda pair: -pair[1])  # stable: equal scores keep the file's order
        for rank, (doc_id, score) in enumerate(group, start=1):
            yield query_id, doc_id, rank, score


_READERS: dict[str, Callable[..., Iterator[tuple]]] = {
    "tsv": _tsv_rows,
    "jsonl": _jsonl_rows,
    "parquet": _parquet_rows,
    "trec_run": _trec_run_rows,
    "trec_qrels": _trec_qrels_rows,
}


def iter_rows(source: DataSource, role: Role) -> Iterator[tuple]:
    """Rows of `source` read as `role`, as tuples in the role schema's column order."""
    if source.format not in ROLE_FORMATS[role]:
        raise SourceError(f"a {source.format} source cannot provide {role}; use one of {ROLE_FORMATS[role]}")
    if isinstance(source, IrDatasetsSource):
        return _irds_rows(source, role)
    return _READERS[source.format](source)


_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class TextPolicy:
    """Applies a docs/queries source's text policies row by row: repair, invalid Unicode, controls, duplicates.

    Control characters (C0 but tab and newlines, DEL and C1) become spaces: MT tokenizers map them to <unk> or
    drop them unpredictably. Counts of every change are kept for the ingest log and the table's metadata.
    """

    def __init__(self, source: DataSource, name: str):
        self.source, self.name = source, name
        self.repair = getattr(source, "repair", "none")
        self.seen: set[str] | None = set() if getattr(source, "duplicates", "error") == "keep_first" else None
        self.counts = {"repaired": 0, "invalid_replaced": 0, "controls_replaced": 0, "duplicates_dropped": 0}
        if self.repair == "ftfy":
            import ftfy

            self._fix = ftfy.fix_text
            self.repair = f"ftfy {ftfy.__version__}"

    def __call__(self, rows: Iterator[tuple]) -> Iterator[tuple]:
        for doc_id, text in rows:
            if self.seen is not None:
                if doc_id in self.seen:
                    self.counts["duplicates_dropped"] += 1
                    continue
                self.seen.add(doc_id)
            yield doc_id, self._clean(doc_id, text or "")

    def _clean(self, doc_id: str, text: str) -> str:
        if _SURROGATE.search(text):
            if getattr(self.source, "invalid_text", "error") == "error":
                raise SourceError(
                    f"input {self.name!r} id {doc_id!r}: text holds lone surrogates (not valid Unicode); fix the "
                    "source, or set invalid_text: replace on it to put U+FFFD in their place"
                )
            text = _SURROGATE.sub("\ufffd", text)
            self.counts["invalid_replaced"] += 1
        if self.repair != "none":
            fixed = self._fix(text)
            self.counts["repaired"] += fixed != text
            text = fixed
        cleaned = _CONTROL.sub(" ", text)
        self.counts["controls_replaced"] += cleaned != text
        return cleaned

    def metadata(self) -> dict[str, str]:
        return {"td_ray_repair": self.repair, "td_ray_text_counts": json.dumps(self.counts)}


def _fingerprint(source: DataSource) -> str:
    """What identifies a source's content: its settings, and a local file's size and mtime."""
    described = source.model_dump(mode="json")
    path = getattr(source, "path", None)
    if path and os.path.exists(path):
        stat = os.stat(path)
        described["stat"] = [stat.st_size, stat.st_mtime_ns]
    return json.dumps(described, sort_keys=True)


def _key_columns(role: Role) -> list[str]:
    return {"docs": ["id"], "queries": ["id"], "qrels": ["qid", "docid"], "candidates": ["qid", "pid"]}[role]


def find_duplicates(table: pa.Table, keys: list[str], limit: int = 5) -> list[tuple]:
    """Up to `limit` key values that occur more than once in `table`."""
    counts = table.group_by(keys).aggregate([([], "count_all")])
    repeated = counts.filter(pc.greater(counts["count_all"], 1)).slice(0, limit)
    return list(zip(*(repeated[key].to_pylist() for key in keys)))


def ingest(workspace: Workspace, source: DataSource, role: Role, name: str, field: str | None = None) -> str:
    """Copy `source` into ``inputs/<name>.parquet`` (reused while the source is unchanged); returns its path.

    Fails on an empty source or duplicate ids, naming them and the config `field` (default ``data.<name>``),
    before any stage uses the table; a table ingested earlier is left as it was.
    """
    try:
        return _ingest(workspace, source, role, name)
    except SourceError as error:
        raise SourceError(f"{field or 'data.' + name}: {error}") from None


def _ingest(workspace: Workspace, source: DataSource, role: Role, name: str) -> str:
    relative = f"inputs/{name}.parquet"
    fingerprint = _fingerprint(source)
    if workspace.exists(relative) and workspace.file_metadata(relative).get("td_ray_source") == fingerprint:
        logger.info("input %s: reusing %s", name, workspace.path(relative))
        return relative
    keys = _key_columns(role)
    rows_in = iter_rows(source, role)
    policy = None
    if role in ("docs", "queries"):
        policy = TextPolicy(source, name)
        rows_in = policy(rows_in)

    def validate(written: pa.Table) -> None:
        if written.num_rows == 0:
            raise SourceError(f"input {name!r} ({source.format}) has no rows; check the source in the config")
        duplicates = find_duplicates(written, keys)
        if duplicates:
            raise SourceError(
                f"input {name!r} has duplicate {'/'.join(keys)} values, e.g. {duplicates}; "
                "each must appear once: remove the repeated rows from the source"
            )

    rows = 0
    schema = ROLE_SCHEMAS[role]
    temporary = workspace.atomic_writer(relative, schema, validate=validate, validate_columns=keys,
                                        metadata=lambda: {"td_ray_source": fingerprint} | (policy.metadata() if policy else {}))
    with temporary as writer:
        buffer: list[tuple] = []
        for row in rows_in:
            buffer.append(row)
            if len(buffer) >= _BATCH_ROWS:
                writer.write_table(_to_table(buffer, schema))
                rows += len(buffer)
                buffer = []
        if buffer:
            writer.write_table(_to_table(buffer, schema))
            rows += len(buffer)
    changed = {key: value for key, value in (policy.counts if policy else {}).items() if value}
    logger.info("input %s: %d rows -> %s%s", name, rows, workspace.path(relative), f" ({changed})" if changed else "")
    return relative


def _to_table(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    columns = list(zip(*rows))
    return pa.Table.from_arrays([pa.array(column, type=field.type) for column, field in zip(columns, schema)], schema=schema)
