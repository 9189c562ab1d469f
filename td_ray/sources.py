"""Read pipeline inputs (ir_datasets ids, TSV, JSONL, Parquet, TREC files) into the workspace as Parquet.

Each source is read lazily, row by row, and written in batches, so a collection never has to fit in memory.
An ingested table remembers the source it came from and is reused while that source is unchanged.
"""
from __future__ import annotations

import functools
import gzip
import itertools
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import pyarrow as pa

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
from td_ray.errors import CorruptTableError, TdRayError
from td_ray.fingerprint import path_fingerprint
from td_ray.keys import HashSet, key_hashes, repeated_hashes, string_hashes
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
    """The non-blank lines of a UTF-8 text file (gzipped when it ends in .gz), numbered, without their line ends or
    a byte-order mark (which editors on Windows write, and which would otherwise start the first id)."""
    if not os.path.isfile(path):
        raise SourceError(f"input file not found: {path} (check the path in the config's data section)")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
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
    for batch in dataset.to_batches(columns=[source.id_column, source.text_column], batch_readahead=1,
                                    fragment_readahead=1):
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
    else:  # scoreddocs carry scores, not ranks: `RankedCandidates` ranks them per query
        for item in dataset.scoreddocs_iter():
            yield item.query_id, item.doc_id, None, float(item.score)


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


def mojibake_only():
    """ftfy's settings that fix only mojibake (UTF-8 read as Latin-1 or Windows-1252), as ir_datasets fixes MS MARCO:
    quotes stay curly, ligatures, full-width letters, HTML entities, line breaks and C1 controls stay as they are
    (controls become spaces after), and no Unicode normalisation."""
    from ftfy import TextFixerConfig

    return TextFixerConfig(unescape_html=False, remove_terminal_escapes=False, fix_c1_controls=False,
                           fix_latin_ligatures=False, fix_character_width=False, uncurl_quotes=False,
                           fix_line_breaks=False, fix_surrogates=False, remove_control_chars=False,
                           normalization=None)


class TextPolicy:
    """Applies a docs/queries source's text policies row by row: repair, invalid Unicode, controls, duplicates.

    Control characters (C0 but tab and newlines, DEL and C1) become spaces: MT tokenizers map them to <unk> or
    drop them unpredictably. Counts of every change are kept for the ingest log and the table's metadata.
    Duplicates are found after a first pass (see `ingest`), so only the few repeated ids are ever held.
    """

    def __init__(self, source: DataSource, name: str, repeated: set[str] | None = None):
        self.source, self.name = source, name
        self.repair = getattr(source, "repair", "none")
        self.repeated = repeated or set()
        """Ids known to repeat (found by a first pass): their first row is kept, the others dropped."""
        self.seen: set[str] = set()
        self.counts = {"repaired": 0, "invalid_replaced": 0, "controls_replaced": 0, "duplicates_dropped": 0}
        if self.repair == "ftfy":
            import ftfy

            self._fix = functools.partial(ftfy.fix_text, config=mojibake_only())
            self.repair = f"ftfy {ftfy.__version__} (mojibake only)"

    def __call__(self, rows: Iterator[tuple]) -> Iterator[tuple]:
        for doc_id, text in rows:
            if doc_id in self.repeated:
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


class RankedCandidates:
    """Candidates per query, as they stream: ranks 1..n are kept, any other ranks (0-based, constant, missing as
    in ir_datasets' scoreddocs) are replaced by the order of the scores, best first (ties keep the file order).

    Rows usually come query by query (TREC runs are written so); then only the current query's rows and the ids
    of the queries already seen are held. A query seen again after others raises `_NotGrouped`, and `ingest`
    reads the source again through `group_by_query`.
    """

    def __init__(self, name: str):
        self.name = name
        self.finished: set[str] = set()
        self.counts = {"queries": 0, "reranked_queries": 0}

    def __call__(self, rows: Iterator[tuple]) -> Iterator[tuple]:
        group: list[tuple] = []
        for row in rows:
            if group and row[0] != group[0][0]:
                yield from self._close(group)
                group = []
            if not group and row[0] in self.finished:
                raise _NotGrouped(row[0])
            group.append(row)
        if group:
            yield from self._close(group)

    def _close(self, group: list[tuple]) -> Iterator[tuple]:
        qid = group[0][0]
        self.finished.add(qid)
        self.counts["queries"] += 1
        pids = [row[1] for row in group]
        if len(set(pids)) != len(pids):
            repeated = sorted({pid for pid in pids if pids.count(pid) > 1})[:3]
            raise SourceError(f"input {self.name!r}: query {qid!r} lists passage(s) {repeated} more than once; "
                              "keep one line per (query, passage)")
        if sorted(row[2] if row[2] is not None else 0 for row in group) != list(range(1, len(group) + 1)):
            self.counts["reranked_queries"] += 1
            order = sorted(range(len(group)), key=lambda i: -group[i][3])
            group = [(qid, group[i][1], rank, group[i][3]) for rank, i in enumerate(order, start=1)]
        yield from group

    def metadata(self) -> dict[str, str]:
        return {"td_ray_candidate_counts": json.dumps(self.counts)}


def fingerprint(source: DataSource) -> str:
    """What identifies a source's content: its settings, and the size and mtime of its file, or of every file
    under its directory (so an edit in place in a Parquet directory is noticed)."""
    described = source.model_dump(mode="json")
    path = getattr(source, "path", None)
    if path and os.path.exists(path):
        described["stat"] = path_fingerprint(path)
    return json.dumps(described, sort_keys=True)


def _key_columns(role: Role) -> list[str]:
    return {"docs": ["id"], "queries": ["id"], "qrels": ["qid", "docid"], "candidates": ["qid", "pid"]}[role]


class _NotGrouped(Exception):
    """Internal: a query's candidates are not together in the source; `ingest` groups them on disk."""


_GROUP_BUCKETS = 64
_GROUP_SCHEMA = pa.schema([("qid", pa.string()), ("pid", pa.string()), ("rank", pa.int64()), ("score", pa.float64()),
                           ("order", pa.int64())])


def group_by_query(rows: Iterator[tuple], folder: str) -> Iterator[tuple]:
    """Candidate rows regrouped query by query, each query's rows in their source order.

    The rows are spread over hash buckets of query ids in `folder`, and each bucket is read back sorted, so the
    memory held is one bucket's rows (a 64th of the source), whatever the source's order.
    """
    import shutil

    import pyarrow.parquet as pq

    shutil.rmtree(folder, ignore_errors=True)  # buckets of a killed run
    os.makedirs(folder)
    paths = [os.path.join(folder, f"bucket-{i:02d}.parquet") for i in range(_GROUP_BUCKETS)]
    writers = [pq.ParquetWriter(path, _GROUP_SCHEMA) for path in paths]
    try:
        buffer: list[tuple] = []
        order = 0

        def flush() -> None:
            table = pa.Table.from_arrays([pa.array(column, type=field.type) for column, field in
                                          zip(zip(*buffer), _GROUP_SCHEMA)], schema=_GROUP_SCHEMA)
            bucket = string_hashes(table["qid"]) % np.uint64(_GROUP_BUCKETS)
            for index, writer in enumerate(writers):
                chosen = np.flatnonzero(bucket == np.uint64(index))
                if len(chosen):
                    writer.write_table(table.take(pa.array(chosen)))

        for row in rows:
            buffer.append((*row, order))
            order += 1
            if len(buffer) >= _BATCH_ROWS:
                flush()
                buffer = []
        if buffer:
            flush()
    finally:
        for writer in writers:
            writer.close()
    for path in paths:
        table = pq.read_table(path).sort_by([("qid", "ascending"), ("order", "ascending")])
        os.remove(path)
        yield from zip(*(table[name].to_pylist() for name in ("qid", "pid", "rank", "score")))
    os.rmdir(folder)


class _Repeated(Exception):
    """Internal: the first pass found ids that repeat; `ingest` reads the source again, keeping their first rows."""

    def __init__(self, ids: set[str]):
        super().__init__(f"{len(ids)} repeated ids")
        self.ids = ids


def ingest(workspace: Workspace, source: DataSource, role: Role, name: str, field: str | None = None,
           within: tuple[str, str] | None = None) -> str:
    """Copy `source` into ``inputs/<name>.parquet`` (reused while the source is unchanged); returns its path.

    Fails on an empty source or duplicate ids, naming them and the config `field` (default ``data.<name>``),
    before any stage uses the table; a table ingested earlier is left as it was. Rows stream through: the
    duplicate check holds one 64-bit hash a row (candidates: only the current query's rows). The source's `limit`
    keeps its first records (`limited`); `within` = (table, column) keeps only the ids that column of that ingested
    table holds (a small run's passages and queries, for the candidates its limit kept).
    """
    try:
        try:
            return _ingest(workspace, source, role, name, within)
        except _Repeated as repeated:  # duplicates: keep_first
            return _ingest(workspace, source, role, name, within, repeated.ids)
        except _NotGrouped:  # candidates that do not come query by query
            logger.info("input %s: candidates are not grouped by query; grouping them on disk", name)
            return _ingest(workspace, source, role, name, within, grouped=False)
    except SourceError as error:
        raise SourceError(f"{field or 'data.' + name}: {error}") from None


def limited(rows: Iterator[tuple], role: Role, limit: int | None) -> Iterator[tuple]:
    """The first `limit` records of `rows`: rows, or for candidates (grouped by query) the first `limit` queries'.

    >>> list(limited(iter([("q1", "a"), ("q1", "b"), ("q2", "c"), ("q3", "d")]), "candidates", 2))
    [('q1', 'a'), ('q1', 'b'), ('q2', 'c')]
    >>> list(limited(iter([("d1",), ("d2",), ("d3",)]), "docs", 2))
    [('d1',), ('d2',)]
    """
    if limit is None:
        yield from rows
    elif role != "candidates":
        yield from itertools.islice(rows, limit)
    else:
        queries, current = 0, None
        for row in rows:
            if row[0] != current:
                queries, current = queries + 1, row[0]
                if queries > limit:
                    return
            yield row


def _ingest(workspace: Workspace, source: DataSource, role: Role, name: str, within: tuple[str, str] | None,
            repeated: set[str] | None = None, grouped: bool = True) -> str:
    relative = f"inputs/{name}.parquet"
    identity = fingerprint(source)
    if within is not None:  # the subset follows the table it is read for
        identity += json.dumps({"within": [*within, workspace.file_metadata(within[0]).get("td_ray_source")]})
    if _ingested_from(workspace, relative) == identity:
        logger.info("input %s: reusing %s", name, workspace.path(relative))
        return relative
    keys = _key_columns(role)
    rows_in = iter_rows(source, role)
    if within is not None:
        table, column = within
        wanted = set(workspace.read_table(table, [column])[column].unique().to_pylist())
        rows_in = (row for row in rows_in if row[0] in wanted)
    policy: TextPolicy | RankedCandidates | None = None
    if role in ("docs", "queries"):
        policy = TextPolicy(source, name, repeated)
    elif role == "candidates":
        policy = RankedCandidates(name)
        if not grouped:
            rows_in = group_by_query(rows_in, workspace.path(f"inputs/.{name}.groups"))
    if policy is not None:
        rows_in = policy(rows_in)
    rows_in = limited(rows_in, role, getattr(source, "limit", None))
    hashes: list[np.ndarray] = []
    check_keys = role != "candidates"  # candidates are checked query by query as they stream

    def validate(read) -> None:
        if not rows:
            raise SourceError(f"input {name!r} ({source.format}) has no rows; check the source in the config")
        suspects = repeated_hashes(iter(hashes)) if check_keys else np.zeros(0, np.uint64)
        if not len(suspects):
            return
        counts: Counter = Counter()
        suspected = HashSet(suspects)
        for batch in read(keys):
            chosen = np.flatnonzero(suspected.contains(key_hashes(batch)))
            counts.update(zip(*(batch.column(key).take(pa.array(chosen)).to_pylist() for key in keys)))
        duplicates = [key[0] if len(key) == 1 else key for key, count in counts.items() if count > 1]
        if not duplicates:
            return  # two ids shared a hash; neither repeats
        if role in ("docs", "queries") and getattr(source, "duplicates", "error") == "keep_first":
            raise _Repeated(set(duplicates))
        raise SourceError(
            f"input {name!r} has duplicate {'/'.join(keys)} values, e.g. {duplicates[:5]}; "
            "each must appear once: remove the repeated rows from the source"
        )

    rows = 0
    schema = ROLE_SCHEMAS[role]
    temporary = workspace.atomic_writer(relative, schema, validate=validate,
                                        metadata=lambda: {"td_ray_source": identity} | (policy.metadata() if policy else {}))
    with temporary as writer:
        buffer: list[tuple] = []
        for row in rows_in:
            buffer.append(row)
            if len(buffer) >= _BATCH_ROWS:
                rows += _write_rows(writer, buffer, schema, keys if check_keys else None, hashes)
                buffer = []
        if buffer:
            rows += _write_rows(writer, buffer, schema, keys if check_keys else None, hashes)
    changed = {key: value for key, value in (policy.counts if policy else {}).items() if value}
    logger.info("input %s: %d rows -> %s%s", name, rows, workspace.path(relative), f" ({changed})" if changed else "")
    return relative


def _ingested_from(workspace: Workspace, relative: str) -> str | None:
    """The source identity an ingested table was made from; None when there is none, or when the table is damaged
    (it is then read again from its source)."""
    if not workspace.exists(relative):
        return None
    try:
        return workspace.file_metadata(relative).get("td_ray_source")
    except CorruptTableError as error:
        logger.warning("%s; reading the source again", error)
        return None


def _write_rows(writer, rows: list[tuple], schema: pa.Schema, keys: list[str] | None, hashes: list) -> int:
    table = _to_table(rows, schema)
    if keys is not None:
        hashes.append(key_hashes(table, keys))
    writer.write_table(table)
    return table.num_rows


def _to_table(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    columns = list(zip(*rows))
    return pa.Table.from_arrays([pa.array(column, type=field.type) for column, field in zip(columns, schema)], schema=schema)
