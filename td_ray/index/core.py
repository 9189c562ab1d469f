"""The index stage's pure logic: passages numbered as they stream in, vectors read back by shard or sampled for
training, each reading one row group at a time; for ColBERT, which documents train the codec and how many
centroids it gets."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from td_ray import schemas
from td_ray.keys import string_hashes
from td_ray.retrieval.faiss_index import IndexSettingsError
from td_ray.retrieval.plaid import default_centroids


class PassageNumbering:
    """Numbers streamed batches of passage rows with their faiss ids (consecutive from `first`, in arrival order)
    and cuts each batch into `shards` contiguous slices, slice i going to shard i: every shard gets its share of
    every batch, and each slice is written as a row group of its own, so a shard task reads only its row groups."""

    def __init__(self, shards: int, first: int = 0):
        self.shards = shards
        self.next_id = first

    def __call__(self, batch: pa.Table) -> list[pa.Table]:
        ids = np.arange(self.next_id, self.next_id + batch.num_rows, dtype=np.int64)
        self.next_id += batch.num_rows
        vectors = batch["vector"].combine_chunks() if isinstance(batch["vector"], pa.ChunkedArray) else batch["vector"]
        table = pa.table({"docid": batch["docid"], "passage": batch["passage"], "faiss_id": ids,
                          "shard": pa.array(np.zeros(batch.num_rows, dtype=np.int32)),
                          "vector": vectors.cast(pa.large_list(pa.float32()))}, schema=schemas.EMBEDDINGS)
        bounds = np.linspace(0, batch.num_rows, self.shards + 1).astype(int)
        return [table.slice(start, end - start).set_column(3, "shard", pa.array(np.full(end - start, shard, np.int32)))
                for shard, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])) if end > start]


class TokenNumbering:
    """Numbers streamed batches of compressed passage rows (ColBERT) with their passage numbers (faiss_id, in
    arrival order, from `first`) and their first token rows (from `first_token`): each passage's tokens take the
    next rows, so they are contiguous and ascend with its number. Each batch is one row group."""

    def __init__(self, first: int = 0, first_token: int = 0):
        self.next_id, self.next_token = first, first_token

    def __call__(self, batch: pa.Table) -> list[pa.Table]:
        tokens = batch["tokens"].to_numpy().astype(np.int64)
        ids = np.arange(self.next_id, self.next_id + batch.num_rows, dtype=np.int64)
        first = self.next_token + np.cumsum(tokens) - tokens
        self.next_id, self.next_token = self.next_id + batch.num_rows, self.next_token + int(tokens.sum())
        return [pa.table({"docid": batch["docid"], "passage": batch["passage"], "faiss_id": ids, "first_token": first,
                          "tokens": batch["tokens"], "centroid_ids": batch["centroid_ids"],
                          "residuals": batch["residuals"]}, schema=schemas.TOKEN_CODES)]


def _vectors(batch: pa.RecordBatch, dim: int) -> np.ndarray:
    return np.asarray(batch.column("vector").flatten(), dtype=np.float32).reshape(-1, dim)


def shard_batches(table: str | pa.NativeFile, shard: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(vectors, faiss ids) of one shard, row group by row group (a shard is whole row groups, see
    PassageNumbering), read from the vector table without touching the other shards' rows."""
    parquet = pq.ParquetFile(table)
    column = parquet.schema_arrow.get_field_index("shard")
    groups = [group for group in range(parquet.num_row_groups)
              if parquet.metadata.row_group(group).column(column).statistics.min == shard]
    for batch in parquet.iter_batches(row_groups=groups, columns=["faiss_id", "vector"], batch_size=16_384):
        if batch.num_rows:
            dim = len(batch.column("vector")[0])
            yield _vectors(batch, dim), batch.column("faiss_id").to_numpy()


def sample_vectors(table: str | pa.NativeFile, rows: int, sample: int, dim: int, seed: int = 0) -> np.ndarray:
    """About `sample` vectors drawn evenly (each row with probability sample / rows, seeded) from the table."""
    rng = np.random.default_rng(seed)
    keep = min(1.0, sample / max(rows, 1))
    parts = []
    for batch in pq.ParquetFile(table).iter_batches(columns=["vector"], batch_size=16_384):
        chosen = np.flatnonzero(rng.random(batch.num_rows) < keep)
        if len(chosen):
            parts.append(_vectors(batch.take(pa.array(chosen)), dim))
    return np.concatenate(parts)[:sample] if parts else np.zeros((0, dim), np.float32)


DOCUMENT_FINGERPRINTS = pa.schema([("id", pa.string()), ("fingerprint", pa.uint64())])


def document_fingerprints(batches: Iterator[pa.RecordBatch]) -> pa.Table:
    """(id, fingerprint of its text) of every document: what a build was made from, to find what changed.
    Sixteen bytes and the id a document, never its text."""
    parts = [pa.table({"id": batch.column("id").cast(pa.string()),
                       "fingerprint": pa.array(string_hashes(batch.column("text").fill_null("")), pa.uint64())},
                      schema=DOCUMENT_FINGERPRINTS) for batch in batches]
    return pa.concat_tables(parts) if parts else DOCUMENT_FINGERPRINTS.empty_table()


def document_changes(built: pa.Table, current: pa.Table) -> tuple[pa.Array, pa.Array]:
    """From the fingerprints a build was made from and the current ones: the ids to encode (new or changed) and
    the ids whose indexed passages must leave the results (changed or removed), each sorted.

    >>> built = pa.table({"id": ["a", "b", "c"], "fingerprint": pa.array([1, 2, 3], pa.uint64())})
    >>> now = pa.table({"id": ["a", "c", "d"], "fingerprint": pa.array([1, 9, 4], pa.uint64())})
    >>> [ids.to_pylist() for ids in document_changes(built, now)]
    [['c', 'd'], ['b', 'c']]
    """
    joined = current.join(built.rename_columns(["id", "built"]), "id", join_type="left outer")
    encode = joined.filter(pc.or_kleene(pc.is_null(joined["built"]),
                                        pc.not_equal(joined["fingerprint"], joined["built"])))["id"]
    removed = built.join(current.select(["id"]), "id", join_type="left anti")["id"]
    changed = encode.filter(pc.is_in(encode, built["id"]))
    stale = pa.concat_arrays([removed.combine_chunks(), changed.combine_chunks()])
    encode = encode.combine_chunks()
    return encode.take(pc.sort_indices(encode)), stale.take(pc.sort_indices(stale))


class TokenReservoir:
    """A uniform sample of at most `capacity` token vectors from a stream of any length, held in one buffer
    allocated once (reservoir sampling, Vitter's algorithm R, a batch at a time, seeded): every token seen has the
    same chance to be kept, wherever in the collection it comes."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity, self.seen = capacity, 0
        self.rng = np.random.default_rng(seed)
        self.buffer: np.ndarray | None = None

    def add(self, vectors: np.ndarray) -> None:
        if self.buffer is None:
            self.buffer = np.empty((self.capacity, vectors.shape[1]), dtype=np.float32)
        free = max(0, min(self.capacity - self.seen, len(vectors)))
        self.buffer[self.seen:self.seen + free] = vectors[:free]
        rest = vectors[free:]
        if len(rest):  # token t (0-based, over the stream) replaces a random slot with probability capacity / (t + 1)
            slots = self.rng.integers(0, self.seen + free + np.arange(1, len(rest) + 1))
            hit = slots < self.capacity
            self.buffer[slots[hit]] = rest[hit]
        self.seen += len(vectors)

    @property
    def sample(self) -> np.ndarray:
        """The kept vectors [min(seen, capacity), dim] (a view of the buffer)."""
        if self.buffer is None:
            return np.zeros((0, 1), np.float32)
        return self.buffer[:min(self.seen, self.capacity)]


def sample_fraction(docs: int) -> float:
    """The share of documents encoded to train a ColBERT codec: PLAID's 16 sqrt(120 x passages) sampled passages,
    counted in documents, all of a small collection."""
    return min(1.0, 16 * np.sqrt(120 * max(docs, 1)) / max(docs, 1))


def in_sample(ids: pa.Array | pa.ChunkedArray, fraction: float) -> np.ndarray:
    """Which documents (by id hash: the same ones in every run and on every node) fall in the sample."""
    if fraction >= 1:
        return np.ones(len(ids), dtype=bool)
    return string_hashes(ids) < np.uint64(int(fraction * 2**64))


def plan_centroids(requested: int | None, estimated_tokens: int, sample_tokens: int) -> int:
    """The codec's centroids: index.colbert.centroids, else PLAID's rule for the estimated tokens, lowered to a
    power of two the sample can train (k-means needs a training point per centroid)."""
    if requested is not None:
        if requested > sample_tokens:
            raise IndexSettingsError(
                f"index.colbert.centroids {requested}: k-means needs a training token per centroid, but the sample "
                f"holds {sample_tokens}; raise index.train_sample, or use at most {sample_tokens} centroids "
                "(or leave centroids unset for PLAID's rule)")
        return requested
    if sample_tokens < 1:
        raise IndexSettingsError("index: the training sample holds no tokens; the collection's documents are empty")
    return min(default_centroids(estimated_tokens), 2 ** int(np.floor(np.log2(sample_tokens))))
