"""The workspace: one root (local path or pyarrow filesystem URI) holding every table a stage writes.

All writes are atomic: a table is written to a temporary name beside its target and renamed into place
only once complete, so a killed stage never leaves a half-written table under its final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from td_ray.errors import ExactlyOnceError, TdRayError
from td_ray.keys import Digest, KeyBatches, describe_differences, key_hashes, repeated_hashes
from td_ray.usage import mark_first_row

logger = logging.getLogger(__name__)


class Workspace:
    """Paths and atomic Parquet I/O under one root."""

    def __init__(self, root: str):
        if "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())
        self.uri = root
        self.fs.create_dir(self.root, recursive=True)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, relative: str) -> str:
        """Full path of `relative` inside the workspace (on the workspace's filesystem)."""
        return f"{self.root.rstrip('/')}/{relative}"

    def local_dir(self, relative: str) -> Path:
        """A local directory under the workspace, for engines that need one (models, FAISS, MLflow)."""
        if not self.is_local:
            raise TdRayError(
                f"{relative!r} needs a local directory, but the workspace {self.uri} is remote; use a local path "
                "or a shared mount (NFS, EFS, a Kubernetes volume) as the workspace"
            )
        path = Path(self.path(relative))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def read_table(self, relative: str, columns: list[str] | None = None) -> pa.Table:
        if not self.exists(relative):
            raise FileNotFoundError(
                f"table {relative!r} not found in workspace {self.uri}; run the stage that writes it first"
            )
        return pq.read_table(self.path(relative), columns=columns, filesystem=self.fs)

    def row_count(self, relative: str) -> int:
        """Rows of a Parquet table, read from its footer."""
        with self.fs.open_input_file(self.path(relative)) as handle:
            return pq.read_metadata(handle).num_rows

    def table_identity(self, relative: str) -> object:
        """What identifies a table's content for the stages that read it: an ingested input by its source, a
        translate view by what it was made from, a score table by its inputs, anything else by its size and time."""
        metadata = self.file_metadata(relative)
        for key in ("td_ray_source", "td_ray_view", "td_ray_inputs"):
            if key in metadata:
                return [key, metadata[key]]
        info = self.fs.get_file_info(self.path(relative))
        return [info.size, info.mtime_ns]

    def file_metadata(self, relative: str) -> dict[str, str]:
        """The key-value pairs in a Parquet file's footer (as written by `atomic_writer(metadata=...)`)."""
        with self.fs.open_input_file(self.path(relative)) as handle:
            pairs = pq.read_metadata(handle).metadata or {}
        return {key.decode(): value.decode() for key, value in pairs.items() if key != b"ARROW:schema"}

    def read_schema(self, relative: str) -> pa.Schema:
        if not self.exists(relative):
            raise FileNotFoundError(
                f"table {relative!r} not found in workspace {self.uri}; run the stage that writes it first"
            )
        return pq.read_schema(self.path(relative), filesystem=self.fs)

    def iter_batches(self, relative: str, columns: list[str] | None = None,
                     batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
        """Stream a table's `columns` in record batches, never holding the whole table."""
        with self.fs.open_input_file(self.path(relative)) as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=columns)

    def key_batches(self, relative: str, columns: list[str]) -> KeyBatches:
        """A re-readable stream of a table's key `columns` (for exactly-once checks)."""
        return lambda: self.iter_batches(relative, columns)

    @contextlib.contextmanager
    def atomic_writer(self, relative: str, schema: pa.Schema,
                      validate: Callable[[Callable[[list[str]], Iterator[pa.RecordBatch]]], None] | None = None,
                      metadata: Callable[[], dict[str, str]] | None = None) -> Iterator[pq.ParquetWriter]:
        """A ParquetWriter whose file appears under `relative` only if the block exits cleanly.

        `validate`, if given, is called with a function that streams columns of the finished file, before the
        rename commits it. `metadata`, if given, is called once all rows are written; its pairs go in the
        file's footer (read back with `file_metadata`).
        """
        target = self.path(relative)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        temporary = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        writer = pq.ParquetWriter(temporary, schema, filesystem=self.fs)

        def read(columns: list[str]) -> Iterator[pa.RecordBatch]:
            with self.fs.open_input_file(temporary) as handle:
                yield from pq.ParquetFile(handle).iter_batches(batch_size=65_536, columns=columns)

        try:
            yield writer
            if metadata is not None:
                writer.add_key_value_metadata(metadata())
            writer.close()
            if validate is not None:
                validate(read)
            self.fs.move(temporary, target)
        except BaseException:
            writer.close()
            self.fs.delete_file(temporary)
            raise

    @contextlib.contextmanager
    def exactly_once_writer(self, relative: str, schema: pa.Schema, keys: list[str],
                            expected: KeyBatches | None = None,
                            metadata: Callable[[], dict[str, str]] | None = None,
                            select: Callable[[pa.Table], pa.Table] | None = None) -> Iterator[KeyedWriter]:
        """An atomic writer that commits only if each `keys` value was written once and, when `expected` (a
        stream of the key columns that must come out) is given, exactly those. `select` picks the rows whose keys
        are checked (e.g. each document's first passage). Memory: none with `expected` (digests), one uint64 a
        row without it. On failure the error names example keys and nothing is committed."""
        checked = KeyedWriter(schema, keys, collect=expected is None, select=select)

        def validate(read: Callable[[list[str]], Iterator[pa.RecordBatch]]) -> None:
            columns = list(dict.fromkeys(keys + (schema.names if select else [])))
            checked.check(expected, lambda: (checked.checked_keys(batch) for batch in read(columns)), relative)

        with self.atomic_writer(relative, schema, validate=validate, metadata=metadata) as writer:
            checked.writer = writer
            yield checked

    def commit_block(self, directory: str, table: pa.Table, schema: pa.Schema, keys: list[str]) -> str:
        """Write one block of a block store atomically into `directory`; returns its file name.

        The name is a hash of the block's keys, so a retried task rewrites the same file instead of adding a twin.
        """
        table = table.select(schema.names).cast(schema)
        digest = hashlib.sha256("\n".join("\t".join(map(str, key)) for key in
                                           zip(*(table[name].to_pylist() for name in keys))).encode())
        name = f"part-{digest.hexdigest()[:20]}.parquet"
        target = self.path(f"{directory}/{name}")
        temporary = self.path(f"{directory}/.{name}.{uuid.uuid4().hex[:8]}.tmp")
        self.fs.create_dir(self.path(directory), recursive=True)
        try:
            pq.write_table(table, temporary, filesystem=self.fs)
            self.fs.move(temporary, target)
        except BaseException:
            if self.fs.get_file_info(temporary).type != pafs.FileType.NotFound:
                self.fs.delete_file(temporary)
            raise
        return name

    def block_names(self, directory: str) -> list[str]:
        """The committed block files of a block store directory."""
        if not self.exists(directory):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(directory)))
        return [info.base_name for info in infos if info.base_name.startswith("part-")]

    def remove_temporaries(self, *relatives: str) -> int:
        """Delete the temporary files a killed writer left under `relatives` (one job per workspace at a time);
        returns how many. Called at the start of each stage."""
        removed = 0
        for relative in relatives:
            if not self.exists(relative):
                continue
            for info in self.fs.get_file_info(pafs.FileSelector(self.path(relative), recursive=True)):
                if info.type == pafs.FileType.File and _TEMPORARY.search(info.base_name):
                    self.fs.delete_file(info.path)
                    removed += 1
        if removed:
            logger.info("removed %d temporary file(s) left by an interrupted run under %s", removed, relatives)
        return removed

    def write_table(self, table: pa.Table, relative: str, schema: pa.Schema | None = None,
                    metadata: dict[str, str] | None = None) -> str:
        """Write one table atomically; cast to `schema` first so every writer agrees on types. `metadata` goes
        in the file's footer."""
        if schema is not None:
            table = table.select(schema.names).cast(schema)
        with self.atomic_writer(relative, table.schema, metadata=(lambda: metadata) if metadata else None) as writer:
            writer.write_table(table)
        return self.path(relative)


class KeyedWriter:
    """Writes batches cast to one schema, keeping a digest of their keys for the exactly-once check."""

    def __init__(self, schema: pa.Schema, keys: list[str], collect: bool,
                 select: Callable[[pa.Table], pa.Table] | None = None):
        self.schema, self.keys, self.select = schema, keys, select
        self.rows = 0
        self.digest = Digest()
        self.hashes: list[np.ndarray] | None = [] if collect else None
        self.writer: pq.ParquetWriter | None = None

    def write(self, batch: pa.Table | pa.RecordBatch, row_group_size: int | None = None) -> None:
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        batch = batch.select(self.schema.names).cast(self.schema)
        hashes = key_hashes(self.checked_keys(batch))
        self.rows += batch.num_rows
        self.digest.add(hashes)
        if self.hashes is not None:
            self.hashes.append(hashes)
        self.writer.write_table(batch, row_group_size=row_group_size)
        if batch.num_rows:
            mark_first_row()

    def checked_keys(self, batch: pa.Table | pa.RecordBatch) -> pa.Table:
        """The key columns of the rows the check covers."""
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        return (self.select(table) if self.select else table).select(self.keys)

    def check(self, expected: KeyBatches | None, written: KeyBatches, name: str) -> None:
        """Raise ExactlyOnceError, naming example keys, unless the written keys are right."""
        if expected is not None:
            wanted = Digest.of(expected())
            if wanted == self.digest:
                return
            rows = max(wanted.rows, self.digest.rows)
        elif not len(repeated_hashes(iter(self.hashes))):
            return
        else:
            rows = self.digest.rows
        found = describe_differences(expected, written, rows)
        if expected is None and not found["repeated"]:
            return  # two keys shared a hash; none repeats
        raise ExactlyOnceError(
            f"{name}: the output does not hold each input key exactly once ({self.digest.rows} rows written"
            + (f" for {wanted.rows} expected" if expected is not None else "") + f"): missing {found['missing']}, "
            f"repeated {found['repeated']}, unexpected {found['unexpected']}; nothing was committed. Run the stage "
            "again; if it repeats, its inputs changed while it ran"
        )


_TEMPORARY = re.compile(r"(\.tmp-[0-9a-f]{8}$)|(^\..+\.tmp$)")
"""Names of files a killed writer can leave: `<target>.tmp-<8 hex>` (atomic writes), `.<name>.<...>.tmp` (blocks)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write a local text file through a temporary name and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# Where each stage's tables live, relative to the workspace root: the one place that names them.
PASSAGES_EN = "inputs/passages.parquet"
TRAIN_QUERIES_EN = "inputs/train_queries.parquet"
CANDIDATES = "inputs/candidates.parquet"
EVAL_DOCS = "inputs/eval_docs.parquet"
EVAL_TOPICS = "inputs/eval_topics.parquet"
EVAL_QRELS = "inputs/eval_qrels.parquet"
TRAIN_QRELS = "inputs/train_qrels.parquet"
SCORES = "score/scores.parquet"
STUDENT_DIR = "distill/student"
EMBEDDINGS = "index/embeddings.parquet"
INDEX_META = "index/index_meta.json"
RUN = "evaluate/run.parquet"
RUN_TREC = "evaluate/run.trec"
PER_QUERY = "evaluate/per_query.parquet"
UNTRAINED = "untrained"
"""Folder, inside the workspace, of the untrained student's index and evaluation (the pipeline's
`compare_untrained`), itself a workspace."""


def untrained_label(stage: str) -> str:
    """The name of the untrained student's `stage` (index or evaluate) in the summary, MLflow and the report."""
    return f"{stage} ({UNTRAINED})"


def translated(kind: str, lang: str) -> str:
    """The translate stage's table of `kind` (passages or queries) in `lang`; English is the ingested input."""
    if lang == "en":
        return PASSAGES_EN if kind == "passages" else TRAIN_QUERIES_EN
    return f"translate/{kind}.{lang}.parquet"
