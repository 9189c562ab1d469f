"""Text joined late: tables carry ids, and text is looked up by id only where a model reads it.

A text table (id, text) is exported once into an uncompressed Arrow IPC file of small record batches, with a
sorted array of its ids' 64-bit hashes and their row numbers beside it (``.hashes.npy``, ``.rows.npy``).
:class:`TextLookup` memory-maps all three: a lookup hashes the asked ids, binary-searches the hashes, checks
the ids it lands on and reads only the batches that hold them. So

- no process reads the whole collection, and a node holds it once in its page cache, however many workers map it;
- the text column may be any size: it is never concatenated (a single Arrow string array stops at 2 GiB);
- an index costs 16 bytes an id on disk, mapped, not built again per worker and per language.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from td_ray.errors import TdRayError
from td_ray.keys import string_hashes
from td_ray.workspace import Workspace

logger = logging.getLogger(__name__)

TEXT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.large_string())])
LOOKUP_BATCH_ROWS = 4096
"""Rows per record batch of an exported file: a lookup reads whole batches, so they are kept small."""


class MissingTextError(TdRayError):
    """Rows name ids that have no text in the table they should come from."""


def _companions(path: Path) -> tuple[Path, Path, Path]:
    """The hash index, the row numbers and the source marker beside a lookup file (`passages.zh.arrow` ->
    `passages.zh.hashes.npy`, ...)."""
    return tuple(path.with_name(f"{path.stem}.{suffix}") for suffix in ("hashes.npy", "rows.npy", "source.json"))


def write_text_file(batches: Iterable[pa.RecordBatch], target: Path, source: dict | None = None) -> Path:
    """Write (id, text) batches into the lookup file `target` and its hash index, atomically; returns `target`.

    `source` (what the text came from) is written last, as the marker that the export is complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    hashes_path, rows_path, source_path = _companions(target)
    source_path.unlink(missing_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    partials = [path.with_name(f".{path.name}.{os.getpid()}.tmp.npy") for path in (hashes_path, rows_path)]
    try:
        hashes: list[np.ndarray] = []
        with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, TEXT_SCHEMA) as writer:
            for batch in batches:
                for start in range(0, batch.num_rows, LOOKUP_BATCH_ROWS):
                    part = batch.slice(start, LOOKUP_BATCH_ROWS)
                    ids = part.column(0).cast(pa.string())
                    texts = part.column(1).cast(pa.large_string())
                    writer.write_batch(pa.record_batch([ids, texts], schema=TEXT_SCHEMA))
                    hashes.append(string_hashes(ids))
        all_hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        del hashes
        order = np.argsort(all_hashes, kind="stable")
        for path, partial, array in ((hashes_path, partials[0], all_hashes[order]),
                                     (rows_path, partials[1], order.astype(np.int64))):
            np.save(partial, array)
            os.replace(partial, path)
    except BaseException:  # a full disk: no partial file stays
        for path in (temporary, *partials):
            path.unlink(missing_ok=True)
        raise
    os.replace(temporary, target)
    source_path.write_text(json.dumps(source or {}), encoding="utf-8")
    return target


LOOKUP_FILE = "lookup.arrow"


def export_text(workspace: Workspace, relative: str) -> str:
    """The lookup of the workspace table `relative`: a folder ``text/<table>/`` in the workspace, exported once (in
    the calling process, on a node-local scratch folder when the workspace is an object store, then uploaded) and
    again only when the table changes. Returns the folder, workspace-relative; `open_lookup` maps it on any node."""
    folder = "text/" + relative.removesuffix(".parquet").replace("/", "--")
    source = {"table": relative, "identity": workspace.table_identity(relative)}
    marker = f"{folder}/{_companions(Path(LOOKUP_FILE))[2].name}"
    if workspace.exists(marker) and json.loads(workspace.read_text(marker)) == source:
        return folder
    logger.info("exporting %s for text lookups -> %s", relative, workspace.location(folder))
    local = workspace.local_dir(folder)
    with workspace.storage(str(local / LOOKUP_FILE)):
        write_text_file(workspace.iter_batches(relative, ["id", "text"]), local / LOOKUP_FILE, source)
    workspace.upload(local, folder)
    return folder


def open_lookup(workspace: Workspace, folder: str, source: str) -> TextLookup:
    """The `export_text` lookup `folder`, mapped from this node's disk (copied into its cache from an object store)."""
    return TextLookup(workspace.local_copy(folder) / LOOKUP_FILE, source)


class TextLookup:
    """Texts by id from one exported file: mapped, never read whole, with the index mapped beside it."""

    def __init__(self, path: str | Path, source: str):
        path = Path(path)
        hashes_path, rows_path, _ = _companions(path)
        self.source = source
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.starts = np.cumsum([0] + [batch.num_rows for batch in self.batches])
        self.hashes = np.load(hashes_path, mmap_mode="r")
        self.rows = np.load(rows_path, mmap_mode="r")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _column_at(self, rows: np.ndarray, column: int) -> list:
        """Values of `column` at global `rows`, in order, read batch by batch."""
        out: list = [None] * len(rows)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(which, kind="stable")
        for chosen in np.split(order, np.flatnonzero(np.diff(which[order])) + 1) if len(order) else []:
            batch = which[chosen[0]]
            values = self.batches[batch].column(column).take(pa.array(rows[chosen] - self.starts[batch]))
            for position, value in zip(chosen, values.to_pylist()):
                out[position] = value
        return out

    def positions(self, ids: Sequence[str]) -> np.ndarray:
        """The row of each id, or -1 where the file has none."""
        ids = [str(value) for value in ids]
        hashes = string_hashes(ids)
        left = np.searchsorted(self.hashes, hashes, side="left")
        right = np.searchsorted(self.hashes, hashes, side="right")
        found = np.full(len(ids), -1, dtype=np.int64)
        single = np.flatnonzero(right - left == 1)
        if len(single):
            rows = np.asarray(self.rows[left[single]])
            stored = self._column_at(rows, 0)
            same = np.array([stored[i] == ids[j] for i, j in enumerate(single)], dtype=bool)
            found[single[same]] = rows[same]
        for index in np.flatnonzero(right - left > 1):  # ids whose hashes collide: check each candidate row
            rows = np.asarray(self.rows[left[index]:right[index]])
            matches = [row for row, stored in zip(rows, self._column_at(rows, 0)) if stored == ids[index]]
            found[index] = matches[0] if matches else -1
        return found

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids that have no text."""
        return [ids[i] for i in np.flatnonzero(self.positions(ids) < 0)]

    def get(self, ids: Sequence[str]) -> list[str | None]:
        """The text of each id, in order, None where there is none."""
        rows = self.positions(ids)
        found = np.flatnonzero(rows >= 0)
        texts: list[str | None] = [None] * len(rows)
        for position, text in zip(found, self._column_at(rows[found], 1)):
            texts[position] = text
        return texts

    def __call__(self, ids: Sequence[str]) -> list[str]:
        """The text of each id, in order; fails naming ids that have none."""
        rows = self.positions(ids)
        if (rows < 0).any():
            missing = [ids[i] for i in np.flatnonzero(rows < 0)[:3]]
            raise MissingTextError(f"no text in the {self.source} for id(s) {missing}")
        return self._column_at(rows, 1)


def check_coverage(workspace: Workspace, relative: str, column: str, lookup: TextLookup, fix: str) -> None:
    """Fail before any model runs when a table names ids in `column` (ids, or lists of ids) that `lookup` lacks;
    reads the table batch by batch."""
    import pyarrow.compute as pc

    for batch in workspace.iter_batches(relative, [column], batch_size=262_144):
        values = batch.column(0)
        if values.type != pa.string():  # lists of ids (positives) are checked element by element
            values = pc.list_flatten(values)
        lacking = lookup.missing(values.to_pylist())
        if lacking:
            raise MissingTextError(
                f"{len(lacking)} {column} value(s) in a batch of {relative} have no text in the {lookup.source}, "
                f"e.g. {lacking[:3]}; {fix}"
            )
