"""Row keys as 64-bit hashes, so that checks and lookups over millions of rows hold 8 bytes a row, or nothing.

- :func:`key_hashes` hashes one or more key columns of a batch (pandas' SipHash with its fixed key: the same value
  hashes the same in every process and on every node).
- :class:`Digest` is an order-independent fingerprint of a multiset of keys (a count and two sums). Two streams
  hold exactly the same keys, each as often, when their digests match, barring a 2^-64 accident, so an
  exactly-once check of 26.5 M score rows needs no memory at all.
- :func:`describe_differences` names the missing, repeated and unexpected keys when digests differ, reading both
  streams again in hash partitions, so the error names real ids without ever holding every key.
- :class:`HashSet` is a sorted array of hashes for membership tests (a work list against what is committed).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

KeyBatches = Callable[[], Iterable[pa.Table | pa.RecordBatch]]
"""A function that yields a fresh stream of key batches (the key columns, in key order) each time it is called."""

_MIX = np.uint64(0x9E3779B97F4A7C15)
_PARTITION_ROWS = 4_000_000
"""Keys held at once (as strings) while naming the differences between two streams."""


def _column_hashes(values) -> np.ndarray:
    import pandas as pd

    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_numpy(zero_copy_only=False)
    return pd.util.hash_array(np.asarray(values, dtype=object), categorize=False)


def _splitmix(hashes: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (splitmix64's finaliser): spreads combined hashes over all 64 bits."""
    with np.errstate(over="ignore"):
        z = hashes + _MIX
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def key_hashes(batch: pa.Table | pa.RecordBatch, columns: list[str] | None = None) -> np.ndarray:
    """One uint64 per row of `batch`, from its `columns` (default: all, in order)."""
    names = columns or batch.schema.names
    combined = _column_hashes(batch.column(names[0]))
    for name in names[1:]:
        with np.errstate(over="ignore"):
            combined = _splitmix(combined) ^ _column_hashes(batch.column(name))
    return combined


def string_hashes(values) -> np.ndarray:
    """One uint64 per string (ids), the same as `key_hashes` of a one-column batch of them."""
    return _column_hashes(values)


@dataclass
class Digest:
    """An order-independent fingerprint of a multiset of keys: rows, and two wrapping sums of their hashes."""

    rows: int = 0
    total: int = 0
    mixed: int = 0

    def add(self, hashes: np.ndarray) -> None:
        with np.errstate(over="ignore"):
            self.rows += len(hashes)
            self.total = (self.total + int(hashes.sum(dtype=np.uint64))) % 2**64
            self.mixed = (self.mixed + int(_splitmix(hashes).sum(dtype=np.uint64))) % 2**64

    def merge(self, other: Digest) -> Digest:
        """The digest of both multisets together (for parts digested apart, such as index shards)."""
        return Digest(self.rows + other.rows, (self.total + other.total) % 2**64, (self.mixed + other.mixed) % 2**64)

    def add_batch(self, batch: pa.Table | pa.RecordBatch, columns: list[str] | None = None) -> None:
        self.add(key_hashes(batch, columns))

    @classmethod
    def of_range(cls, count: int, chunk: int = 1 << 20, first: int = 0) -> Digest:
        """The digest of the integer keys first .. count - 1, each once (their own values as hashes), in chunks."""
        digest = cls()
        for start in range(first, count, chunk):
            digest.add(np.arange(start, min(count, start + chunk), dtype=np.uint64))
        return digest

    @classmethod
    def of(cls, batches: Iterable[pa.Table | pa.RecordBatch]) -> Digest:
        digest = cls()
        for batch in batches:
            digest.add_batch(batch)
        return digest


def _partition_keys(batches: Iterable, part: int, parts: int) -> Counter:
    found: Counter = Counter()
    for batch in batches:
        hashes = key_hashes(batch)
        chosen = np.flatnonzero(hashes % np.uint64(parts) == np.uint64(part)) if parts > 1 else np.arange(len(hashes))
        if len(chosen):
            rows = batch.take(pa.array(chosen))
            found.update(zip(*(rows.column(i).to_pylist() for i in range(rows.num_columns))))
    return found


def describe_differences(expected: KeyBatches | None, written: KeyBatches, rows: int,
                         limit: int = 3) -> dict[str, list]:
    """Up to `limit` example keys per kind of difference: ``missing`` (expected, not written), ``repeated``
    (written more than once) and ``unexpected`` (written, not expected). Reads both streams once per hash
    partition, holding about _PARTITION_ROWS keys at a time; `rows` sizes the partitions."""
    parts = max(1, -(-rows // _PARTITION_ROWS))
    found: dict[str, list] = {"missing": [], "repeated": [], "unexpected": []}
    for part in range(parts):
        have = _partition_keys(written(), part, parts)
        want = _partition_keys(expected(), part, parts) if expected is not None else None
        for key, count in have.items():
            if count > 1:
                found["repeated"].append(key)
            if want is not None and key not in want:
                found["unexpected"].append(key)
        if want is not None:
            found["missing"] += [key for key in want if key not in have]
        if all(len(items) >= limit for items in found.values()):
            break
    return {kind: [key[0] if len(key) == 1 else key for key in items[:limit]] for kind, items in found.items()}


class HashSet:
    """A sorted array of distinct key hashes (8 bytes a key) answering membership for whole batches at once; it may
    be memory-mapped from a file (`save`, `load`).

    A hash collision can only make a key look present that is not: work planned against the set would skip it,
    and the exactly-once check of the output then names it, so nothing is lost silently.
    """

    def __init__(self, hashes: np.ndarray, distinct: bool = False):
        if not distinct:  # sorted in place and deduplicated: no copy beyond one mask and the result
            hashes = np.asarray(hashes, dtype=np.uint64)
            hashes.sort()
            if len(hashes) > 1:
                hashes = hashes[np.concatenate(([True], hashes[1:] != hashes[:-1]))]
        self.hashes = hashes

    def save(self, path) -> None:
        """Write the sorted hashes as a .npy file (through a temporary name)."""
        import os

        temporary = f"{path}.{os.getpid()}.tmp.npy"
        np.save(temporary, self.hashes)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path) -> HashSet:
        """A set saved by `save`, memory-mapped: pages are read as lookups need them."""
        return cls(np.load(path, mmap_mode="r"), distinct=True)

    @classmethod
    def of(cls, batches: Iterable[pa.Table | pa.RecordBatch], columns: list[str] | None = None) -> HashSet:
        parts = [key_hashes(batch, columns) for batch in batches]
        return cls(np.concatenate(parts) if parts else np.zeros(0, np.uint64))

    def __len__(self) -> int:
        return len(self.hashes)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """A boolean mask: which of `hashes` are in the set."""
        if not len(self.hashes):
            return np.zeros(len(hashes), dtype=bool)
        positions = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        return self.hashes[positions] == hashes


def repeated_hashes(batches: Iterator[np.ndarray]) -> np.ndarray:
    """The hashes that occur more than once among all `batches` (one uint64 a row held while sorting)."""
    parts = list(batches)
    if not parts:
        return np.zeros(0, np.uint64)
    hashes = np.sort(np.concatenate(parts))
    return np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
