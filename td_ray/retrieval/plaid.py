"""ColBERT-X's compressed token index, after PLAID (Santhanam et al., CIKM 2022) and PLAID-X.

Each token vector is stored as the id of its nearest centroid plus its residual (vector minus centroid) quantised
to `nbits` per dimension; an inverted list maps each centroid to the passages holding a token there. The codec is
FAISS's IVF residual codec used standalone (`sa_encode` / `sa_decode`):

- 1, 2 and 4 bits: ``IVF{k},PQ{dim}x{nbits}``, one 1-D codebook of 2^nbits levels per dimension, trained by k-means
  on the residuals (PLAID's per-dimension buckets, fitted per dimension);
- 8 bits: ``IVF{k},SQ8``, 256 uniform levels per dimension over the trained range (a 1-D PQ at 8 bits trains 128
  codebooks of 256 levels: 64 s for 20 k vectors on 2 cores, against 4 s).

PLAID-X and fast-plaid were the other candidates; neither installs beside the project's pins (PLAID-X pins
faiss-cpu 1.9.0 and pulls torchvision, which fails to import beside the local torch; fast-plaid builds from Rust
source), so the codec is FAISS's.

A build directory holds, all memory-mapped at search (`TokenIndex`):

- ``codec.faiss`` (centroids and residual quantiser) and ``codec_range.npy`` (per-dimension range of the training
  residuals, for the error bound);
- ``centroid_ids.npy`` [tokens] (uint16 up to 65,536 centroids, else uint32) and ``residuals.npy``
  [tokens, dim x nbits / 8] uint8: token t of passage p is row ``offsets[p] + i``, so one passage's tokens decode
  without reading any other's;
- ``offsets.npy`` [passages + 1] int64: each passage's first token row;
- ``ivf.npy`` (passage numbers, grouped by centroid, ascending within a centroid) and ``ivf_offsets.npy``
  [centroids + 1] int64.

The arrays are pre-allocated by the driver and filled by shard tasks, each writing its own contiguous range of
passages (a retried task rewrites the same bytes); each shard also writes its part of the inverted lists, which
`merge_lists` lays out on disk in shard order, so a list ascends by passage number however many shards built it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from td_ray.errors import StaleIndexError, TdRayError
from td_ray.keys import Digest
from td_ray.retrieval.maxsim import maxsim_scores, token_rows

logger = logging.getLogger(__name__)

NBITS = (1, 2, 4, 8)
CODEC = "codec.faiss"
CODEC_RANGE = "codec_range.npy"
CENTROID_IDS = "centroid_ids.npy"
RESIDUALS = "residuals.npy"
OFFSETS = "offsets.npy"
IVF = "ivf.npy"
IVF_OFFSETS = "ivf_offsets.npy"
FILES = [CODEC, CODEC_RANGE, CENTROID_IDS, RESIDUALS, OFFSETS, IVF, IVF_OFFSETS]
DECODE_CHUNK = 1024
"""Candidates decoded at a time: at 180 tokens of dim 128, 94 MB of float32, however large ndocs is."""


class QueryTooLongError(TdRayError):
    """A query has more token vectors than the student's query_maxlen, which the index was built for."""


def default_centroids(tokens: int) -> int:
    """PLAID's rule of thumb: 2^floor(log2(16 sqrt(tokens))) centroids for a collection of `tokens` token vectors."""
    return 2 ** int(np.floor(np.log2(16 * np.sqrt(max(tokens, 1)))))


def codec_factory(centroids: int, dim: int, nbits: int) -> str:
    if nbits not in NBITS:
        raise ValueError(f"nbits must be one of {NBITS}, got {nbits}")
    return f"IVF{centroids},SQ8" if nbits == 8 else f"IVF{centroids},PQ{dim}x{nbits}"


class ResidualCodec:
    """Token vector <-> (centroid id, residual code). `low` and `high` are the per-dimension range of the residuals
    it was trained on: inside it, each decoded dimension is within `error_bound` of the original."""

    def __init__(self, index: faiss.Index, low: np.ndarray, high: np.ndarray):
        self.index, self.low, self.high = index, low, high
        self.ivf = faiss.extract_index_ivf(index)
        self.id_bytes = int(self.ivf.coarse_code_size())
        self.code_bytes = int(index.sa_code_size()) - self.id_bytes
        self.id_dtype = np.dtype(np.uint16 if self.ivf.nlist <= 2**16 else np.uint32)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def nlist(self) -> int:
        return int(self.ivf.nlist)

    @property
    def bytes_per_token(self) -> int:
        """Bytes stored per token: its centroid id and its residual code."""
        return self.id_dtype.itemsize + self.code_bytes

    @classmethod
    def train(cls, vectors: np.ndarray, centroids: int, nbits: int, niter: int = 4, seed: int = 0,
              gpu: bool = False) -> ResidualCodec:
        """k-means `centroids` on `vectors` (inner product, as ColBERT's unit vectors compare), then the residual
        quantiser on their residuals; k-means runs on the GPUs when `gpu`."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.index_factory(vectors.shape[1], codec_factory(centroids, vectors.shape[1], nbits),
                                    faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter, ivf.cp.seed = niter, seed
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False
        if gpu:
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(vectors.shape[1]))
        index.train(vectors)
        if gpu:
            ivf.clustering_index = None
        _, assigned = ivf.quantizer.search(vectors, 1)
        residuals = np.ascontiguousarray(vectors - ivf.quantizer.reconstruct_batch(assigned[:, 0]))
        if nbits == 8:  # FAISS trains the scalar quantiser's range on a subsample; the whole sample's range is tighter
            faiss.downcast_index(ivf).sq.train(residuals)
        return cls(index, residuals.min(axis=0), residuals.max(axis=0))

    def save(self, directory: Path) -> None:
        temporary = directory / f".{CODEC}.{os.getpid()}.tmp"
        faiss.write_index(self.index, str(temporary))
        os.replace(temporary, directory / CODEC)
        temporary = directory / f".{CODEC_RANGE}.{os.getpid()}.tmp.npy"
        np.save(temporary, np.stack([self.low, self.high]))
        os.replace(temporary, directory / CODEC_RANGE)

    @classmethod
    def load(cls, directory: Path) -> ResidualCodec:
        low, high = np.load(directory / CODEC_RANGE)
        return cls(faiss.read_index(str(directory / CODEC)), low, high)

    def centroids(self) -> np.ndarray:
        """The centroids [nlist, dim], a view of the codec's own (no copy: 256 MB at 2^19 and dim 128)."""
        flat = faiss.downcast_index(self.ivf.quantizer)
        return faiss.rev_swig_ptr(flat.get_xb(), self.nlist * self.dim).reshape(self.nlist, self.dim)

    def encode(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centroid ids [n] and residual codes [n, code_bytes] of `vectors` [n, dim]."""
        codes = self.index.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))
        ids = np.zeros(len(codes), dtype=np.uint32)
        for byte in range(self.id_bytes):  # FAISS writes the list number little-endian, in coarse_code_size bytes
            ids |= codes[:, byte].astype(np.uint32) << np.uint32(8 * byte)
        return ids.astype(self.id_dtype), np.ascontiguousarray(codes[:, self.id_bytes:])

    def decode(self, ids: np.ndarray, residuals: np.ndarray) -> np.ndarray:
        """Token vectors (centroid plus decoded residual, not renormalised) [n, dim]."""
        codes = np.empty((len(ids), self.id_bytes + self.code_bytes), dtype=np.uint8)
        wide = np.asarray(ids, dtype=np.uint32)
        for byte in range(self.id_bytes):
            codes[:, byte] = (wide >> np.uint32(8 * byte)) & np.uint32(0xFF)
        codes[:, self.id_bytes:] = residuals
        return self.index.sa_decode(codes)

    def levels(self) -> np.ndarray:
        """The values a decoded residual can take, per dimension, ascending [dim, levels]."""
        codec = faiss.downcast_index(self.ivf)
        if isinstance(codec, faiss.IndexIVFScalarQuantizer):
            trained = faiss.vector_to_array(codec.sq.trained).reshape(2, self.dim)  # vmin, vdiff (QT_8bit)
            steps = (np.arange(256, dtype=np.float32) + 0.5) / 255
            return trained[0][:, None] + steps[None, :] * trained[1][:, None]
        return np.sort(faiss.vector_to_array(codec.pq.centroids).reshape(self.dim, -1), axis=1)

    def error_bound(self) -> float:
        """The largest error of one decoded dimension, for residuals inside the trained range: half the widest gap
        between neighbouring levels, or the distance from the range's ends to the outermost levels."""
        levels = self.levels()
        gaps = np.diff(levels, axis=1).max(axis=1) / 2 if levels.shape[1] > 1 else np.zeros(self.dim)
        ends = np.maximum(levels[:, 0] - self.low, self.high - levels[:, -1])
        return float(np.maximum(gaps, ends).max())


# ------------------------------------------------------------------------------------------------ build
def per_passage_bytes(values: np.ndarray, counts: np.ndarray) -> pa.Array:
    """One binary value per passage: the rows of `values` (a passage's centroid ids or residual codes, its tokens in
    order) that its `counts` say are its own, as the codes table stores them."""
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return pa.array([values[a:b].tobytes() for a, b in zip(bounds[:-1], bounds[1:])], pa.large_binary())


@dataclass(frozen=True)
class Layout:
    """Shapes of a build's arrays, known once every passage is encoded (the driver allocates, shards fill)."""

    passages: int
    tokens: int
    code_bytes: int
    id_dtype: str
    nlist: int

    def allocate(self, directory: Path) -> None:
        """Create the token and offset arrays at their full size (sparse files: nothing is written yet)."""
        shapes = {CENTROID_IDS: ((self.tokens,), self.id_dtype), RESIDUALS: ((self.tokens, self.code_bytes), "uint8"),
                  OFFSETS: ((self.passages + 1,), "int64")}
        for name, (shape, dtype) in shapes.items():
            array = np.lib.format.open_memmap(directory / name, mode="w+", dtype=dtype, shape=shape)
            if name == OFFSETS:
                array[-1] = self.tokens
            array.flush()
            del array


def shard_ranges(passages: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous passage-number ranges, one per shard (some empty when there are more shards than passages)."""
    bounds = np.linspace(0, passages, shards + 1).astype(np.int64)
    return [(int(start), int(end)) for start, end in zip(bounds[:-1], bounds[1:])]


def _rows_in_range(table: Path, first: int, last: int) -> Iterator[pa.RecordBatch]:
    """The codes table's rows whose passage number (faiss_id) is in [first, last), reading only the row groups
    that can hold them."""
    parquet = pq.ParquetFile(table)
    column = parquet.schema_arrow.get_field_index("faiss_id")
    groups = []
    for group in range(parquet.num_row_groups):
        stats = parquet.metadata.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max or (stats.min < last and stats.max >= first):
            groups.append(group)
    for batch in parquet.iter_batches(row_groups=groups, batch_size=8192):
        ids = batch.column("faiss_id").to_numpy()
        keep = np.flatnonzero((ids >= first) & (ids < last))
        if len(keep):
            yield batch.take(pa.array(keep))


def _joined(column: pa.Array, dtype: np.dtype) -> np.ndarray:
    return np.frombuffer(b"".join(column.to_pylist()), dtype=dtype)


def write_shard(table: Path, directory: Path, shard: int, first: int, last: int, layout: Layout) -> Digest:
    """Fill passages [first, last) of the build's token and offset arrays from the codes table, and write this
    shard's inverted lists (``ivf-<shard>.npz``: passage numbers by centroid, and the count per centroid).
    Returns the digest of the passage numbers written; the tokens written are checked against the offsets."""
    ids_out = np.load(directory / CENTROID_IDS, mmap_mode="r+")
    residuals_out = np.load(directory / RESIDUALS, mmap_mode="r+")
    offsets_out = np.load(directory / OFFSETS, mmap_mode="r+")
    written, pairs = Digest(), []
    id_dtype = np.dtype(layout.id_dtype)
    for batch in _rows_in_range(table, first, last):
        numbers = batch.column("faiss_id").to_numpy()
        firsts = batch.column("first_token").to_numpy()
        counts = batch.column("tokens").to_numpy().astype(np.int64)
        rows = token_rows(firsts, counts)
        centroid_ids = _joined(batch.column("centroid_ids"), id_dtype)
        residuals = _joined(batch.column("residuals"), np.uint8).reshape(-1, layout.code_bytes)
        if len(rows) != len(centroid_ids) or len(rows) != len(residuals):
            raise ValueError(f"codes table rows {numbers[:3].tolist()}...: token counts do not match their codes")
        ids_out[rows], residuals_out[rows], offsets_out[numbers] = centroid_ids, residuals, firsts
        pairs.append(np.unique(centroid_ids.astype(np.int64) * layout.passages + np.repeat(numbers, counts)))
        written.add(numbers.astype(np.uint64))
    for array in (ids_out, residuals_out, offsets_out):
        array.flush()
    keys = np.unique(np.concatenate(pairs)) if pairs else np.zeros(0, np.int64)
    temporary = directory / f".ivf-{shard:03d}.{os.getpid()}.tmp.npz"
    np.savez(temporary, passages=(keys % max(layout.passages, 1)).astype(_passage_dtype(layout.passages)),
             counts=np.bincount(keys // max(layout.passages, 1), minlength=layout.nlist).astype(np.int64))
    os.replace(temporary, directory / f"ivf-{shard:03d}.npz")
    return written


def _passage_dtype(passages: int) -> np.dtype:
    return np.dtype(np.int32 if passages < 2**31 else np.int64)


def merge_lists(directory: Path, shards: int, layout: Layout) -> int:
    """Lay the shards' inverted lists out as one on disk (``ivf.npy``, ``ivf_offsets.npy``), shard by shard, so
    each centroid's passages ascend; holds one shard's lists and the per-centroid counts. Returns the entries."""
    counts = np.stack([np.load(directory / f"ivf-{shard:03d}.npz")["counts"] for shard in range(shards)])
    offsets = np.concatenate([[0], np.cumsum(counts.sum(axis=0))]).astype(np.int64)
    temporary = directory / f".{IVF}.{os.getpid()}.tmp.npy"
    lists = np.lib.format.open_memmap(temporary, mode="w+", dtype=_passage_dtype(layout.passages),
                                      shape=(int(offsets[-1]),))
    placed = np.zeros(layout.nlist, dtype=np.int64)
    for shard in range(shards):
        part = np.load(directory / f"ivf-{shard:03d}.npz")
        shard_counts, passages = part["counts"], part["passages"]
        starts = offsets[:-1] + placed
        within = np.arange(len(passages)) - np.repeat(np.cumsum(shard_counts) - shard_counts, shard_counts)
        lists[np.repeat(starts, shard_counts) + within] = passages
        placed += shard_counts
    lists.flush()
    del lists
    os.replace(temporary, directory / IVF)
    temporary = directory / f".{IVF_OFFSETS}.{os.getpid()}.tmp.npy"
    np.save(temporary, offsets)
    os.replace(temporary, directory / IVF_OFFSETS)
    for shard in range(shards):
        (directory / f"ivf-{shard:03d}.npz").unlink()
    return int(offsets[-1])


# ------------------------------------------------------------------------------------------------ search
@dataclass(frozen=True)
class SearchSettings:
    """PLAID's search knobs: centroids probed per query token, the centroid-score pruning threshold (None: off),
    and the candidates decoded and scored exactly."""

    ncells: int
    centroid_score_threshold: float | None
    ndocs: int

    @classmethod
    def for_depth(cls, k: int, ncells: int | None = None, centroid_score_threshold: float | None = None,
                  ndocs: int | None = None) -> SearchSettings:
        """PLAID's defaults for `k` passages (k <= 10: 1 cell, 0.5, 256; k <= 100: 2, 0.45, 1024; else 4, 0.4,
        max(4k, 4096)), each overridden when given; a threshold of -1 or less prunes nothing (cosines are >= -1)."""
        default = (1, 0.5, 256) if k <= 10 else (2, 0.45, 1024) if k <= 100 else (4, 0.4, max(4 * k, 4096))
        threshold = centroid_score_threshold if centroid_score_threshold is not None else default[1]
        return cls(ncells or default[0], threshold if threshold > -1 else None, ndocs or default[2])


class TokenIndex:
    """A built compressed token index, memory-mapped: searched query by query, passages ranked by MaxSim over
    their decoded tokens. Usable as the searcher of `maxp.rank_documents` (`ntotal`, `search`)."""

    def __init__(self, directory: Path, meta: dict, settings: SearchSettings):
        self.directory, self.settings = directory, settings
        self.codec = ResidualCodec.load(directory)
        self.centroid_vectors = self.codec.centroids()
        self.centroid_ids = np.load(directory / CENTROID_IDS, mmap_mode="r")
        self.residuals = np.load(directory / RESIDUALS, mmap_mode="r")
        self.offsets = np.load(directory / OFFSETS, mmap_mode="r")
        self.lists = np.load(directory / IVF, mmap_mode="r")
        self.list_offsets = np.load(directory / IVF_OFFSETS)
        self.ntotal = len(self.offsets) - 1
        self.query_maxlen = int(meta["query_maxlen"])
        found = {"passages": self.ntotal, "tokens": len(self.centroid_ids), "dim": self.codec.dim,
                 "centroids": self.codec.nlist}
        stale = {name: (value, meta.get(name)) for name, value in found.items() if meta.get(name) != value}
        if stale or int(self.offsets[-1]) != len(self.centroid_ids) or len(self.list_offsets) != self.codec.nlist + 1:
            raise StaleIndexError(f"the token index in {directory} does not match its metadata ({stale or 'offsets'}); "
                                  "re-run the index stage")

    def _rows(self, passages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The token rows of `passages`, in order, and each passage's token count."""
        starts = np.asarray(self.offsets[passages], dtype=np.int64)
        counts = np.asarray(self.offsets[passages + 1], dtype=np.int64) - starts
        return token_rows(starts, counts), counts

    def decode_passages(self, passages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The decoded, unit-length token vectors of `passages` and their offsets [len(passages) + 1]."""
        rows, counts = self._rows(passages)
        vectors = self.codec.decode(self.centroid_ids[rows], self.residuals[rows])
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors, np.concatenate([[0], np.cumsum(counts)])

    def candidates(self, centroid_scores: np.ndarray) -> np.ndarray:
        """The passages listed under each query token's `ncells` best centroids, ascending."""
        ncells = min(self.settings.ncells, self.codec.nlist)
        cells = np.unique(np.argpartition(-centroid_scores, ncells - 1, axis=1)[:, :ncells])
        starts, ends = self.list_offsets[cells], self.list_offsets[cells + 1]
        return np.unique(self.lists[token_rows(starts, ends - starts)]).astype(np.int64)

    def approximate_scores(self, centroid_scores: np.ndarray, passages: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """MaxSim with each token replaced by its centroid (PLAID's centroid interaction); with a threshold, the
        centroids no query token scores that high count 0 (pruning)."""
        threshold = self.settings.centroid_score_threshold
        if threshold is not None:
            centroid_scores = np.where(centroid_scores.max(axis=0) >= threshold, centroid_scores, 0.0)
        out = np.empty(len(passages), dtype=np.float32)
        for begin in range(0, len(passages), chunk):
            rows, counts = self._rows(passages[begin:begin + chunk])
            similarity = centroid_scores[:, self.centroid_ids[rows]]
            segments = np.concatenate([[0], np.cumsum(counts)[:-1]])
            out[begin:begin + chunk] = np.maximum.reduceat(similarity, segments, axis=1).sum(axis=0)
        return out

    def search_one(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top `k` passages of one query [Lq, dim] by MaxSim over decoded tokens: scores and numbers."""
        query = np.ascontiguousarray(query, dtype=np.float32)
        if query.ndim != 2 or query.shape[1] != self.codec.dim:
            raise ValueError(f"a query must be [tokens, {self.codec.dim}], got {list(query.shape)}")
        if len(query) > self.query_maxlen:
            raise QueryTooLongError(f"a query of {len(query)} token vectors is longer than the student's "
                                    f"query_maxlen ({self.query_maxlen}); encode it with the student, which cuts it")
        centroid_scores = query @ self.centroid_vectors.T
        candidates = self.candidates(centroid_scores)
        ndocs = max(self.settings.ndocs, k)
        if len(candidates) > ndocs:
            approximate = self.approximate_scores(centroid_scores, candidates)
            candidates = candidates[np.lexsort((candidates, -approximate))[:ndocs]]
        exact = np.concatenate([np.zeros(0, np.float32)] + [
            maxsim_scores(query, *self.decode_passages(part), np.arange(len(part)))
            for part in np.array_split(candidates, max(1, -(-len(candidates) // DECODE_CHUNK)))])
        order = np.lexsort((candidates, -exact))[:k]
        return exact[order], candidates[order]

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and passage numbers [n, k], best first; -inf and -1 pad when fewer passages are found."""
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for row, query in enumerate(queries):
            found_scores, found = self.search_one(query, k)
            scores[row, :len(found)], ids[row, :len(found)] = found_scores, found
        return scores, ids
