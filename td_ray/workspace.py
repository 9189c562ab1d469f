"""The workspace: one root (local path or pyarrow filesystem URI) holding every table a stage writes.

All writes are atomic: a table is written to a temporary name beside its target and renamed into place
only once complete, so a killed stage never leaves a half-written table under its final name.
"""
from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from td_ray.errors import TdRayError

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

    @contextlib.contextmanager
    def atomic_writer(self, relative: str, schema: pa.Schema,
                      validate: Callable[[pa.Table], None] | None = None,
                      validate_columns: list[str] | None = None,
                      metadata: Callable[[], dict[str, str]] | None = None) -> Iterator[pq.ParquetWriter]:
        """A ParquetWriter whose file appears under `relative` only if the block exits cleanly.

        `validate`, if given, sees the finished file (its `validate_columns`) before the rename commits it.
        `metadata`, if given, is called once all rows are written; its pairs go in the file's footer
        (read back with `file_metadata`).
        """
        target = self.path(relative)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        temporary = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        writer = pq.ParquetWriter(temporary, schema, filesystem=self.fs)
        try:
            yield writer
            if metadata is not None:
                writer.add_key_value_metadata(metadata())
            writer.close()
            if validate is not None:
                validate(pq.read_table(temporary, columns=validate_columns, filesystem=self.fs))
            self.fs.move(temporary, target)
        except BaseException:
            writer.close()
            self.fs.delete_file(temporary)
            raise

    def write_table(self, table: pa.Table, relative: str, schema: pa.Schema | None = None) -> str:
        """Write one table atomically; cast to `schema` first so every writer agrees on types."""
        if schema is not None:
            table = table.select(schema.names).cast(schema)
        with self.atomic_writer(relative, table.schema) as writer:
            writer.write_table(table)
        return self.path(relative)


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
TOKEN_EMBEDDINGS = "index/token_embeddings.parquet"
DOC_IDS = "index/docids.parquet"
TOKEN_DOCS = "index/token_docs.parquet"
FAISS_INDEX = "index/index.faiss"
INDEX_META = "index/index_meta.json"
RUN = "evaluate/run.parquet"
RUN_TREC = "evaluate/run.trec"
PER_QUERY = "evaluate/per_query.parquet"


def translated(kind: str, lang: str) -> str:
    """The translate stage's table of `kind` (passages or queries) in `lang`; English is the ingested input."""
    if lang == "en":
        return PASSAGES_EN if kind == "passages" else TRAIN_QUERIES_EN
    return f"translate/{kind}.{lang}.parquet"
