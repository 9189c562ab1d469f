"""Text joined late, in the training workers: id -> text lookups over memory-mapped Arrow files.

The examples carry ids and scores only (as PyLate's distillation data does). Before training, the driver copies
each text table the workers need (queries, passages per language) batch by batch into an uncompressed Arrow IPC
file; every worker maps it, so the text lives once per node in the page cache, whatever the number of workers.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from td_ray.textjoin import MissingTextError
from td_ray.workspace import Workspace

logger = logging.getLogger(__name__)


def export_text(workspace: Workspace, relative: str, target: Path) -> Path:
    """Copy the (id, text) columns of a workspace table into the Arrow IPC file `target`, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    parquet = pq.ParquetFile(workspace.path(relative), filesystem=workspace.fs)
    with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for batch in parquet.iter_batches(columns=["id", "text"], batch_size=65536):
            writer.write_batch(pa.record_batch([batch.column(0).cast(pa.string()), batch.column(1).cast(pa.string())],
                                               schema=schema))
    os.replace(temporary, target)
    return target


class TextLookup:
    """Texts by id from one exported file: mapped, not read, and indexed by id once per worker."""

    def __init__(self, path: str | Path, source: str):
        import pandas as pd

        self.source = source
        self.table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        self.index = pd.Index(self.table.column("id").to_numpy(zero_copy_only=False))

    def __call__(self, ids: Sequence[str]) -> list[str]:
        positions = self.index.get_indexer(list(ids))
        if (positions < 0).any():
            missing = [ids[i] for i in np.flatnonzero(positions < 0)[:3]]
            raise MissingTextError(f"no text in the {self.source} for id(s) {missing}")
        return self.table.column("text").take(pa.array(positions)).to_pylist()


def check_coverage(workspace: Workspace, relative: str, column: str, texts: pa.Array, source: str,
                   fix: str) -> None:
    """Fail before training when a table names ids in `column` that `texts` (ids) lacks; reads batch by batch."""
    parquet = pq.ParquetFile(workspace.path(relative), filesystem=workspace.fs)
    for batch in parquet.iter_batches(columns=[column], batch_size=262144):
        values = batch.column(0)
        if values.type != pa.string():  # lists of ids (positives) are checked element by element
            values = pc.list_flatten(values)
        lacking = values.filter(pc.invert(pc.is_in(values, value_set=texts)))
        if len(lacking):
            raise MissingTextError(
                f"{len(lacking)} {column} value(s) in {relative} have no text in the {source}, e.g. "
                f"{lacking.slice(0, 3).to_pylist()}; {fix}"
            )
