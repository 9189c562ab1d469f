"""Training examples, as PyLate keeps distillation data: ids and teacher scores only, one row per query.

The score table is grouped by query in hash buckets on disk (`group_scores`), so no process holds every score
or every example, whatever the order of the table. Text is joined in the
training workers (:mod:`td_ray.textjoin`), in whichever language(s) the config names: one English score table
serves every translation, which is the heart of Translate-Distill.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from td_ray.distill.sampling import ShortListError
from td_ray.keys import string_hashes
from td_ray.workspace import Workspace

logger = logging.getLogger(__name__)

__all__ = ["ExampleFilter", "ExampleShard", "ShortListError", "TextSource", "group_by_query", "group_scores",
           "read_positives"]


def group_by_query(scores: pa.Table, top_k: int | None = None) -> pa.Table:
    """Example rows (qid, pids, teacher_scores, positives) from score rows (qid, pid, score) holding every row of
    the queries they name: each query's candidates best-scored first (ties by pid), cut to its `top_k` best (all
    when None), with empty positives. Vectorised: one sort, then list columns over the group boundaries."""
    nan = pc.is_nan(scores["score"].cast(pa.float64()))
    if pc.any(pc.or_kleene(nan, pc.is_null(scores["score"]))).as_py():
        bad = scores.filter(pc.or_kleene(nan, pc.is_null(scores["score"])))["qid"][0].as_py()
        raise ValueError(f"query {bad!r} has a teacher score that is NaN or missing; rescore it")
    ordered = scores.sort_by([("qid", "ascending"), ("score", "descending"), ("pid", "ascending")])
    qids = ordered["qid"].combine_chunks()
    starts = (np.flatnonzero(np.concatenate([[True], pc.not_equal(qids.slice(1), qids.slice(0, len(qids) - 1))
                                             .to_numpy(zero_copy_only=False)])) if len(qids) else np.zeros(0, np.int64))
    offsets = pa.array(np.append(starts, len(qids)).astype(np.int32))
    pids = pa.ListArray.from_arrays(offsets, ordered["pid"].combine_chunks().cast(pa.string()))
    values = pa.ListArray.from_arrays(offsets, ordered["score"].combine_chunks().cast(pa.float32()))
    if top_k is not None:
        pids, values = pc.list_slice(pids, 0, top_k), pc.list_slice(values, 0, top_k)
    return pa.table({"qid": qids.take(pa.array(starts)), "pids": pids, "teacher_scores": values,
                     "positives": pa.array([[]] * len(starts), pa.list_(pa.string()))})


def group_scores(workspace: Workspace, scores: str, folder: str, top_k: int | None) -> Iterator[pa.Table]:
    """Example rows of every query of the score table `scores`, bucket by bucket: the rows are spread over hash
    buckets of their qid in `folder` (one streamed pass; on this node's disk when the workspace is an object store),
    then each bucket is grouped by `group_by_query`. Holds one bucket (about BUCKET_ROWS score rows) at a time,
    whatever the order of the score table."""
    import shutil

    import pyarrow.parquet as pq

    path = workspace.local_dir(folder)
    shutil.rmtree(path, ignore_errors=True)  # the buckets of a killed run
    path.mkdir(parents=True)
    buckets = max(1, -(-workspace.row_count(scores) // BUCKET_ROWS))
    schema = pa.schema([("qid", pa.string()), ("pid", pa.string()), ("score", pa.float32())])
    writers = [pq.ParquetWriter(f"{path}/bucket-{i:04d}.parquet", schema) for i in range(buckets)]
    try:
        for batch in workspace.iter_batches(scores, ["qid", "pid", "score"], batch_size=262_144):
            table = pa.Table.from_batches([batch]).cast(schema)
            which = string_hashes(table["qid"]) % np.uint64(buckets)
            for bucket in np.unique(which):
                writers[bucket].write_table(table.filter(pa.array(which == bucket)))
    finally:
        for writer in writers:
            writer.close()
    for bucket in range(buckets):
        file = f"{path}/bucket-{bucket:04d}.parquet"
        table = pq.read_table(file)
        yield group_by_query(table, top_k)
    shutil.rmtree(path, ignore_errors=True)


BUCKET_ROWS = 1_000_000
"""Score rows per bucket when grouping by query (about 40 MB of ids and scores)."""

EXAMPLE_ROW_GROUP = 8_192
"""Example rows per Parquet row group: the unit a training worker reads (a few MB, whatever the table's size)."""


class ExampleShard:
    """One training worker's share of the examples table, read straight from the workspace.

    The share is rows ``[rank * n, (rank + 1) * n)`` with ``n = rows // world``: it depends on the rank and the
    world size only, so a restarted worker reads the rows it read before, and every worker holds as many rows, so
    the DDP ranks step in lockstep (the last ``rows % world`` rows are left out). An epoch reads the share one
    row group at a time, never the whole table.

    >>> import tempfile, pyarrow.parquet as pq
    >>> folder = tempfile.mkdtemp()
    >>> pq.write_table(pa.table({"qid": [f"q{i}" for i in range(10)]}), f"{folder}/e.parquet", row_group_size=4)
    >>> [ExampleShard(Workspace(folder), "e.parquet", rank, 3).pieces for rank in range(3)]
    [[(0, 0, 3)], [(0, 3, 1), (1, 0, 2)], [(1, 2, 2), (2, 0, 1)]]
    >>> [batch["qid"] for batch in ExampleShard(Workspace(folder), "e.parquet", 1, 2).batches(2, 0, seed=0)]
    [['q5', 'q6'], ['q7', 'q8']]
    """

    def __init__(self, workspace: Workspace, table: str, rank: int, world: int):
        import pyarrow.parquet as pq

        self.workspace, self.table = workspace, table
        with workspace.fs.open_input_file(workspace.path(table)) as handle:
            metadata = pq.read_metadata(handle)
        self.rows = metadata.num_rows // world
        first, last = rank * self.rows, (rank + 1) * self.rows
        self.pieces: list[tuple[int, int, int]] = []  # (row group, first row in it, rows)
        start = 0
        for group in range(metadata.num_row_groups):
            count = metadata.row_group(group).num_rows
            low, high = max(first, start), min(last, start + count)
            if low < high:
                self.pieces.append((group, low - start, high - low))
            start += count

    def batches(self, batch_size: int, shuffle_buffer: int, seed: int) -> Iterator[dict[str, list]]:
        """One epoch of full batches (columns as lists). With a `shuffle_buffer`, the row groups come in an order
        drawn from `seed` and the rows through a buffer of that many, shuffled by the same generator; without one,
        in the table's order."""
        import pyarrow.parquet as pq

        rng = np.random.default_rng(seed) if shuffle_buffer else None
        pieces = [self.pieces[i] for i in rng.permutation(len(self.pieces))] if rng is not None else self.pieces
        held: list[pa.Table] = []
        with self.workspace.fs.open_input_file(self.workspace.path(self.table)) as handle:
            parquet = pq.ParquetFile(handle)
            for group, offset, rows in pieces:
                held.append(parquet.read_row_group(group).slice(offset, rows))
                if sum(part.num_rows for part in held) >= max(shuffle_buffer, batch_size):
                    held = yield from _drain(held, batch_size, shuffle_buffer // 2, rng)
        yield from _drain(held, batch_size, 0, rng)


def _drain(held: list[pa.Table], batch_size: int, keep: int, rng: np.random.Generator | None):
    """Yield full batches from the rows `held` (shuffled by `rng` when given), leaving at least `keep` rows;
    returns what is left, to be topped up."""
    if not held:
        return []
    buffer = pa.concat_tables(held)
    if rng is not None:
        buffer = buffer.take(pa.array(rng.permutation(buffer.num_rows)))
    ready = max(0, buffer.num_rows - keep) // batch_size * batch_size
    for start in range(0, ready, batch_size):
        yield buffer.slice(start, batch_size).to_pydict()
    return [buffer.slice(ready)] if ready < buffer.num_rows else []


def read_positives(qrels: pa.Table) -> pa.Table:
    """(qid, positives): the docids judged relevant (relevance > 0) per training query."""
    relevant = qrels.filter(pc.greater(qrels["relevance"], 0)).select(["qid", "docid"])
    grouped = relevant.group_by("qid").aggregate([("docid", "distinct")])
    return grouped.rename_columns(["qid", "positives"])


@dataclass
class ExampleFilter:
    """Per streamed batch of example rows: attach qrels positives, and drop (or refuse) queries that cannot fill
    nway passages, counting what it dropped. `positives` None means the teacher's ranking alone is used."""

    nway: int
    short_list_policy: str = "skip"
    positives: pa.Table | None = None
    skipped: list[str] = field(default_factory=list)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.positives is not None:
            found = pc.index_in(batch["qid"], value_set=self.positives["qid"].combine_chunks())
            batch = batch.set_column(batch.schema.get_field_index("positives"), "positives",
                                     self.positives["positives"].combine_chunks().take(found))
        keep = [self._usable(qid, pids, positives) for qid, pids, positives in
                zip(batch["qid"].to_pylist(), batch["pids"].to_pylist(), batch["positives"].to_pylist())]
        return batch.filter(pa.array(keep, type=pa.bool_()))

    def _usable(self, qid: str, pids: list[str], positives: list[str] | None) -> bool:
        if self.positives is None:
            problem = None if len(pids) >= self.nway else f"{len(pids)} scored candidates, fewer than nway={self.nway}"
        elif not positives:
            problem = "no judged relevant passage in data.train_qrels"
        else:
            negatives = len(set(pids) - set(positives))
            problem = None if negatives >= self.nway - 1 else (
                f"{negatives} unjudged candidates, fewer than the nway - 1 = {self.nway - 1} negatives needed")
        if problem is None:
            return True
        if self.short_list_policy == "error":
            raise ShortListError.for_query(qid, problem)
        self.skipped.append(qid)
        return False

    def report(self) -> None:
        if self.skipped:
            logger.warning("skipped %d queries that cannot fill nway=%d passages, e.g. %s", len(self.skipped),
                           self.nway, self.skipped[:3])


TextSource = Callable[[list[str]], list[str]]
"""Texts for ids, in order: a :class:`td_ray.textjoin.TextLookup`, or any function doing the same."""
