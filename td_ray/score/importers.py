"""Teacher score files that users already hold, read into the SCORES table so the score stage can be skipped.

Formats: ColBERT-X / PLAID-X distillation files (``["qid", [pid, score], ...]`` per line, e.g.
hltcoe/tdist-msmarco-scores), sentence-transformers' msmarco-hard-negatives JSON lines with ``ce-score``
entries, and PyLate / lightonai rows (``query_id``, ``document_ids``, ``scores``) as JSON lines or Parquet.
Files are read line by line (gzip by the ``.gz`` suffix) and never unpickled. Every error names the file,
the 1-based line (or Parquet row) and the query id, and says how to fix it.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from td_ray import schemas
from td_ray.errors import TdRayError
from td_ray.workspace import Workspace, atomic_write_text

logger = logging.getLogger(__name__)

ScoreFormat = Literal["colbertx", "st_hard_negatives", "pylate"]
ShortListPolicy = Literal["skip", "error"]
FORMATS: tuple[str, ...] = get_args(ScoreFormat)
_BATCH_ROWS = 50_000
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_EXAMPLES = 5


class ScoreFileError(TdRayError):
    """A teacher score file that cannot be imported as given: names the file, line, query and the fix."""


@dataclass(frozen=True)
class ImportSummary:
    """What an import kept: rows and queries, and the qids of queries skipped for having fewer than nway."""

    rows: int
    queries: int
    skipped: list[str]


@dataclass(frozen=True)
class ImportedScores(ImportSummary):
    """An import held in memory: the SCORES table with its summary."""

    table: pa.Table


def read_score_file(path: str | os.PathLike, fmt: ScoreFormat, *, teacher: str, nway: int | None = None,
                    short_list: ShortListPolicy = "error") -> ImportedScores:
    """Read a whole score file into one SCORES table (for files that fit in memory; see `import_score_file`)."""
    reader = _ScoreReader(path, fmt, teacher, nway, short_list)
    table = pa.concat_tables(list(reader.batches()))  # never empty: the reader fails on a file with no queries
    return ImportedScores(reader.rows, reader.queries, reader.skipped, table)


def import_score_file(workspace: Workspace, relative: str, path: str | os.PathLike, fmt: ScoreFormat, *,
                      teacher: str, nway: int | None = None, short_list: ShortListPolicy = "error",
                      metadata: dict[str, str] | None = None) -> ImportSummary:
    """Stream a score file into the workspace table `relative` (atomic: nothing appears if the file is bad).

    The table's provenance (`td_ray_provenance` in its metadata) names the file, its format and its sha256;
    `metadata` adds pairs of the caller's.
    """
    reader = _ScoreReader(path, fmt, teacher, nway, short_list)
    provenance = {"source": "import", "format": fmt, "path": str(path), "sha256": _sha256(path)}
    footer = {"td_ray_provenance": json.dumps(provenance)} | (metadata or {})
    with workspace.atomic_writer(relative, schemas.SCORES, metadata=lambda: footer) as writer:
        for batch in reader.batches():
            writer.write_table(batch)
    logger.info("score import: %d rows -> %s", reader.rows, workspace.path(relative))
    return ImportSummary(reader.rows, reader.queries, reader.skipped)


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_colbertx(scores: pa.Table | Iterable[pa.Table], path: str | os.PathLike,
                    provenance: dict | None = None) -> int:
    """Write scores in the ColBERT-X format (gzip if `path` ends in .gz); returns the queries written.

    `provenance` (e.g. a score table's `td_ray_provenance`: teacher, revision, template, languages, max
    lengths) goes beside it as ``<path>.provenance.json``, so a published file says how it was made.

    Queries keep their first-appearance order and candidates are sorted by score, best first, so the file
    also serves ColBERT-X's only_top sampling. Holds every row in memory; the write is atomic.
    """
    table = scores if isinstance(scores, pa.Table) else pa.concat_tables(list(scores))
    schemas.require_columns(table.schema, ("qid", "pid", "score"), "scores")
    target = Path(path)
    if table.num_rows == 0:
        raise ScoreFileError(f"no scores to export to {target}; the table is empty")
    columns = ["qid", "pid", "score"]
    table = table.select(columns).cast(pa.schema([schemas.SCORES.field(name) for name in columns]))
    if any(table[name].null_count for name in columns) or not pc.all(pc.is_finite(table["score"])).as_py():
        raise ScoreFileError(f"cannot export to {target}: the scores hold null ids or scores, or non-finite scores")
    order = table.column("qid").combine_chunks().dictionary_encode().indices  # first appearance order
    table = table.append_column("_order", order).sort_by([("_order", "ascending"), ("score", "descending")])
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    queries = 0
    try:
        with _open_for_writing(temporary, gz=target.name.endswith(".gz")) as handle:
            for qid, group in _groups(table):
                handle.write(json.dumps([qid, *group]) + "\n")
                queries += 1
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if provenance is not None:
        atomic_write_text(target.with_name(f"{target.name}.provenance.json"), json.dumps(provenance, indent=1))
    logger.info("exported %d queries, %d scores -> %s", queries, table.num_rows, target)
    return queries


def _open_for_writing(path: Path, gz: bool) -> TextIO:
    """A UTF-8 text file; gzip at level 6 (the gzip tool's default), about 4x faster than Python's default 9."""
    return gzip.open(path, "wt", encoding="utf-8", compresslevel=6) if gz else path.open("w", encoding="utf-8")


def _groups(table: pa.Table) -> Iterator[tuple[str, list[list]]]:
    """(qid, [[pid, score], ...]) per query of a table sorted by query; a repeated (qid, pid) is an error."""
    current: str | None = None
    group: list[list] = []
    seen: set[str] = set()
    for batch in table.to_batches():
        for qid, pid, score in zip(*(batch.column(name).to_pylist() for name in ("qid", "pid", "score"))):
            if qid != current:
                if current is not None:
                    yield current, group
                current, group, seen = qid, [], set()
            if pid in seen:
                raise ScoreFileError(f"scores hold query {qid!r} passage {pid!r} twice; keep one row per (qid, pid)")
            seen.add(pid)
            group.append([pid, score])
    if current is not None:
        yield current, group


class _ScoreReader:
    """Parses one file's records into SCORES batches, validating each query and counting what it keeps."""

    def __init__(self, path: str | os.PathLike, fmt: str, teacher: str, nway: int | None, short_list: str):
        if fmt not in FORMATS:
            raise ScoreFileError(f"unknown score file format {fmt!r}; use one of {list(FORMATS)}")
        if short_list not in get_args(ShortListPolicy):
            raise ScoreFileError(f"short_list must be 'skip' or 'error', not {short_list!r}")
        if nway is not None and nway < 1:
            raise ScoreFileError(f"nway must be at least 1, not {nway}")
        self.path, self.fmt, self.teacher, self.nway, self.short_list = str(path), fmt, teacher, nway, short_list
        self.rows = self.queries = 0
        self.skipped: list[str] = []
        self._lines: dict[str, int] = {}  # qid -> line it was read from, to report repeats

    def batches(self) -> Iterator[pa.Table]:
        """SCORES tables of about _BATCH_ROWS rows; fails at the first bad line, or at the end if nothing was kept."""
        if not os.path.isfile(self.path):
            raise ScoreFileError(f"score file not found: {self.path} (check the path)")
        parse = {"colbertx": self._colbertx, "st_hard_negatives": self._st_hard_negatives, "pylate": self._pylate}
        columns: tuple[list, list, list] = ([], [], [])
        for number, record in self._records():
            qid, candidates = parse[self.fmt](number, record)
            kept = self._check_query(number, qid, candidates)
            if kept is None:
                continue
            columns[0].extend([qid] * len(kept))
            columns[1].extend(kept)
            columns[2].extend(kept.values())
            if len(columns[0]) >= _BATCH_ROWS:
                yield self._table(*columns)
                columns = ([], [], [])
        if columns[0]:
            yield self._table(*columns)
        self._finish()

    def _records(self) -> Iterator[tuple[int, object]]:
        if self.fmt == "pylate" and self.path.endswith(".parquet"):
            yield from self._parquet_records()
            return
        opener = gzip.open if self.path.endswith(".gz") else open
        try:
            with opener(self.path, "rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    if raw.strip():
                        yield number, self._json(number, raw)
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise ScoreFileError(f"{self.path}: not a complete gzip file ({error}); re-download it, or drop the "
                                 ".gz suffix if it is plain text") from None

    def _json(self, number: int, raw: bytes) -> object:
        hint = ("it looks like a Python pickle, which td-ray never loads (unpickling can run code): convert it to "
                "JSON lines" if number == 1 and raw[:1] == b"\x80" else "fix or remove the line")
        try:
            return json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError:
            raise ScoreFileError(f"{self._at(number)}: not JSON (the bytes are not UTF-8 text); {hint}") from None
        except json.JSONDecodeError as error:
            raise ScoreFileError(f"{self._at(number)}: not JSON ({error.msg} at column {error.colno}); "
                                 f"{hint}") from None

    def _parquet_records(self) -> Iterator[tuple[int, object]]:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self.path)
        except pa.ArrowInvalid as error:
            raise ScoreFileError(f"{self.path}: not a Parquet file ({error})") from None
        needed = ["query_id", "document_ids", "scores"]
        missing = [name for name in needed if name not in parquet.schema_arrow.names]
        if missing:
            raise ScoreFileError(f"{self.path}: no column(s) {missing} (columns: {parquet.schema_arrow.names}); "
                                 "a PyLate score table has query_id, document_ids and scores")
        number = 0
        for batch in parquet.iter_batches(columns=needed):
            for record in batch.to_pylist():
                number += 1
                yield number, record

    def _at(self, number: int, qid: str | None = None) -> str:
        where = f"{self.path} row {number}" if self.path.endswith(".parquet") else f"{self.path}:{number}"
        return where if qid is None else f"{where}: query {qid!r}"

    def _id(self, number: int, value: object, what: str, qid: str | None = None) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            raise ScoreFileError(f"{self._at(number, qid)}: {what} must be a non-empty string or an integer, "
                                 f"got {value!r}")
        return str(value)

    def _score(self, number: int, qid: str, pid: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ScoreFileError(f"{self._at(number, qid)}: passage {pid!r} has a non-numeric score {value!r}; "
                                 "scores must be JSON numbers")
        try:
            score = float(value)
        except OverflowError:  # an integer beyond float range
            score = math.inf
        if not math.isfinite(score) or abs(score) > _FLOAT32_MAX:
            raise ScoreFileError(f"{self._at(number, qid)}: passage {pid!r} has score {value!r}; scores must be "
                                 "finite float32 numbers: re-score or drop this query")
        return score

    def _colbertx(self, number: int, record: object) -> tuple[str, list[tuple[str, float]]]:
        if not isinstance(record, list) or not record:
            raise ScoreFileError(f"{self._at(number)}: expected a JSON array [qid, [pid, score], ...] (the ColBERT-X "
                                 f"format), got {type(record).__name__}; is the file in another format?")
        qid = self._id(number, record[0], "the query id (first element)")
        candidates = []
        for item in record[1:]:
            if not isinstance(item, list) or len(item) != 2:
                hint = (" (a [qid, pid, pid, ...] line has no scores: Translate-Train data, not a teacher score file)"
                        if isinstance(item, (str, int)) else "")
                raise ScoreFileError(f"{self._at(number, qid)}: each candidate must be a [pid, score] pair, got "
                                     f"{item!r}{hint}")
            pid = self._id(number, item[0], "a passage id", qid)
            candidates.append((pid, self._score(number, qid, pid, item[1])))
        return qid, candidates

    def _st_hard_negatives(self, number: int, record: object) -> tuple[str, list[tuple[str, float]]]:
        if not isinstance(record, dict) or "qid" not in record:
            raise ScoreFileError(f"{self._at(number)}: expected a JSON object with qid, pos and neg (the "
                                 "msmarco-hard-negatives format); is the file in another format?")
        qid = self._id(number, record["qid"], "qid")
        positives, negatives = record.get("pos", []), record.get("neg", {})
        if not isinstance(positives, list) or not isinstance(negatives, dict):
            raise ScoreFileError(f"{self._at(number, qid)}: 'pos' must be a list and 'neg' an object mapping each "
                                 "system to a list")
        lists = [("pos", positives)] + [(f"neg.{system}", items) for system, items in negatives.items()]
        candidates = []
        for where, items in lists:
            if not isinstance(items, list):
                raise ScoreFileError(f"{self._at(number, qid)}: {where} must be a list of {{pid, ce-score}} objects")
            for item in items:
                if not isinstance(item, dict) or "pid" not in item or "ce-score" not in item:
                    raise ScoreFileError(
                        f"{self._at(number, qid)}: {where} holds {item!r}, not a {{pid, ce-score}} object; a file of "
                        "bare pids has no teacher scores (its cross-encoder scores are a separate pickle, which "
                        "td-ray never loads: convert them to one of the JSON formats)")
                pid = self._id(number, item["pid"], f"a pid in {where}", qid)
                candidates.append((pid, self._score(number, qid, pid, item["ce-score"])))
        return qid, candidates

    def _pylate(self, number: int, record: object) -> tuple[str, list[tuple[str, float]]]:
        if not isinstance(record, dict) or "query_id" not in record:
            raise ScoreFileError(f"{self._at(number)}: expected an object with query_id, document_ids and scores "
                                 "(the PyLate format); is the file in another format?")
        qid = self._id(number, record["query_id"], "query_id")
        pids, scores = record.get("document_ids"), record.get("scores")
        if not isinstance(pids, list) or not isinstance(scores, list):
            raise ScoreFileError(f"{self._at(number, qid)}: document_ids and scores must both be lists")
        if len(pids) != len(scores):
            raise ScoreFileError(f"{self._at(number, qid)}: {len(pids)} document_ids but {len(scores)} scores; "
                                 "each document needs exactly one score")
        candidates = []
        for value, score in zip(pids, scores):
            pid = self._id(number, value, "a document id", qid)
            candidates.append((pid, self._score(number, qid, pid, score)))
        return qid, candidates

    def _check_query(self, number: int, qid: str, candidates: list[tuple[str, float]]) -> dict[str, float] | None:
        """One query's candidates as {pid: score} in file order, or None when the short-list policy skips it."""
        if qid in self._lines:
            raise ScoreFileError(f"{self._at(number, qid)}: the query already appeared on line {self._lines[qid]}; "
                                 "each query must be on one line: merge or remove the repeat")
        self._lines[qid] = number
        if not candidates:
            raise ScoreFileError(f"{self._at(number, qid)}: no candidates; remove the line or add scored passages")
        unique: dict[str, float] = {}
        for pid, score in candidates:
            if pid in unique and np.float32(unique[pid]) != np.float32(score):
                raise ScoreFileError(f"{self._at(number, qid)}: passage {pid!r} has two different scores "
                                     f"({unique[pid]} and {score}); keep one score per passage")
            unique.setdefault(pid, score)
        if self.nway is not None and len(unique) < self.nway:
            if self.short_list == "error":
                raise ScoreFileError(f"{self._at(number, qid)}: {len(unique)} candidates, fewer than nway="
                                     f"{self.nway}; drop the query, lower nway, or set the short-list policy to skip")
            self.skipped.append(qid)
            return None
        self.queries += 1
        self.rows += len(unique)
        return unique

    def _table(self, qids: list, pids: list, scores: list) -> pa.Table:
        return pa.Table.from_arrays(
            [pa.array(qids, pa.string()), pa.array(pids, pa.string()), pa.array(scores, pa.float32()),
             pa.repeat(pa.scalar(self.teacher, pa.string()), len(qids))],
            schema=schemas.SCORES,
        )

    def _finish(self) -> None:
        if self.skipped:
            logger.warning("%s: skipped %d queries with fewer than nway=%d candidates, e.g. %s", self.path,
                           len(self.skipped), self.nway, self.skipped[:_EXAMPLES])
        if not self.queries:
            detail = f" ({len(self.skipped)} skipped as shorter than nway={self.nway})" if self.skipped else ""
            raise ScoreFileError(f"{self.path}: no queries to import{detail}; check the file and its format")
        logger.info("%s (%s): %d rows, %d queries, %d skipped", self.path, self.fmt, self.rows, self.queries,
                    len(self.skipped))
