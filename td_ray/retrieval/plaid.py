"""ColBERT-X's compressed token index, after PLAID (Santhanam et al., CIKM 2022) and PLAID-X.

Each token vector is stored as the id of its nearest centroid plus its residual (vector minus centroid) quantised
to `nbits` per dimension; inverted lists map each centroid to the passages holding a token there, and each passage
to its distinct centroids. The codec is saved in FAISS's IVF residual format (``codec.faiss``, which `sa_encode`
and `sa_decode` read), but trained, encoded and decoded in torch (`td_ray.retrieval.token_math`) on the device and
threads the task reserved:

- 1, 2 and 4 bits: ``IVF{k},PQ{dim}x{nbits}``, one 1-D codebook of 2^nbits levels per dimension, fitted by
  k-means on every residual of the training sample (PLAID's per-dimension buckets, fitted per dimension);
- 8 bits: ``IVF{k},SQ8``, 256 uniform levels per dimension over the sample's range.

A build directory holds, memory-mapped at search (`TokenIndex`) unless they fit its RAM budget:

- ``codec.faiss`` (centroids and residual quantiser) and ``codec_range.npy`` (per-dimension range of the training
  residuals, for the error bound);
- ``centroid_ids.npy`` [tokens] (uint16 up to 65,536 centroids, else uint32) and ``residuals.npy``
  [tokens, dim x nbits / 8] uint8: token t of passage p is row ``offsets[p] + i``, so one passage's tokens decode
  without reading any other's;
- ``offsets.npy`` [passages + 1] int64: each passage's first token row;
- ``ivf.npy`` (passage numbers, grouped by centroid, ascending within a centroid) and ``ivf_offsets.npy``
  [centroids + 1] int64: where search finds its candidates;
- ``passage_cells.npy`` (each passage's distinct centroid ids, ascending) and ``passage_cell_offsets.npy``
  [passages + 1] int64: what approximate scoring reads, each repeated centroid once;
- ``deleted.npy``, once documents were appended: the passages of changed or removed documents, left out of results.

Documents added later are appended (`Layout.resize`, then the same shard fill and a merge after the built lists)
with the built codec, so their passages take the next numbers and nothing built is encoded again.

The arrays are pre-allocated by the driver and filled by shard tasks, each writing its own contiguous range of
passages (a retried task rewrites the same bytes); each shard also writes its part of the lists, which
`merge_lists` lays out on disk in shard order, so a list ascends by passage number however many shards built it.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from td_ray.errors import StaleIndexError, TdRayError
from td_ray.keys import Digest
from td_ray.retrieval import token_math
from td_ray.retrieval.layout import DELETED
from td_ray.retrieval.maxsim import token_rows

logger = logging.getLogger(__name__)

NBITS = (1, 2, 4, 8)
CODEC = "codec.faiss"
CODEC_RANGE = "codec_range.npy"
CENTROID_IDS = "centroid_ids.npy"
RESIDUALS = "residuals.npy"
OFFSETS = "offsets.npy"
IVF = "ivf.npy"
IVF_OFFSETS = "ivf_offsets.npy"
PASSAGE_CELLS = "passage_cells.npy"
PASSAGE_CELL_OFFSETS = "passage_cell_offsets.npy"
FILES = [CODEC, CODEC_RANGE, CENTROID_IDS, RESIDUALS, OFFSETS, IVF, IVF_OFFSETS, PASSAGE_CELLS, PASSAGE_CELL_OFFSETS]
DECODE_CHUNK = 1024
"""Candidates decoded at a time: at 180 tokens of dim 128, 94 MB of float32, however large ndocs is."""
LEVEL_ITERATIONS = 8
"""Lloyd iterations of each dimension's residual levels (1-D k-means converges in a few)."""


class QueryTooLongError(TdRayError):
    """A query has more token vectors than the student's query_maxlen, which the index was built for."""


def default_centroids(tokens: int) -> int:
    """PLAID's rule of thumb: 2^floor(log2(16 sqrt(tokens))) centroids for a collection of `tokens` token vectors.

    >>> default_centroids(1_000_000), default_centroids(2_700_000_000)
    (8192, 524288)
    """
    return 2 ** int(np.floor(np.log2(16 * np.sqrt(max(tokens, 1)))))


def codec_factory(centroids: int, dim: int, nbits: int) -> str:
    if nbits not in NBITS:
        raise ValueError(f"nbits must be one of {NBITS}, got {nbits}")
    return f"IVF{centroids},SQ8" if nbits == 8 else f"IVF{centroids},PQ{dim}x{nbits}"


def codec_task_bytes(train_sample: int, dim: int, centroids: int) -> int:
    """Peak memory of the codec task beyond its encoder: the sample buffer (float32, turned into residuals in
    place), k-means' centroids, sums and next centroids (float32), and one chunk's scores with their copies
    (`token_math.SCORE_ELEMENTS` floats, three times).

    >>> round(codec_task_bytes(20_971_520, 128, 2**19) / 1e9, 2)
    11.95
    """
    return train_sample * 4 * dim + 3 * centroids * dim * 4 + 3 * token_math.SCORE_ELEMENTS * 4


class ResidualCodec:
    """Token vector <-> (centroid id, residual code). `low` and `high` are the per-dimension range of the residuals
    it was trained on: inside it, each decoded dimension is within `error_bound` of the original."""

    def __init__(self, index: faiss.Index, low: np.ndarray, high: np.ndarray):
        self.index, self.low, self.high = index, low, high
        self.ivf = faiss.extract_index_ivf(index)
        self.id_bytes = int(self.ivf.coarse_code_size())
        self.code_bytes = int(index.sa_code_size()) - self.id_bytes
        self.id_dtype = np.dtype(np.uint16 if self.ivf.nlist <= 2**16 else np.uint32)
        codec = faiss.downcast_index(self.ivf)
        if isinstance(codec, faiss.IndexIVFScalarQuantizer):
            self.nbits = 8
            self._table = faiss.vector_to_array(codec.sq.trained).reshape(2, self.dim)  # vmin, vdiff
        else:
            self.nbits = int(codec.pq.nbits)
            self._table = faiss.vector_to_array(codec.pq.centroids).reshape(self.dim, -1)  # [dim, 2^nbits]
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._byte_tables: dict[str, torch.Tensor] = {}

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
    def from_parts(cls, centroids: np.ndarray, nbits: int, levels: np.ndarray | None, low: np.ndarray,
                   high: np.ndarray) -> ResidualCodec:
        """A codec in FAISS's format from trained parts: the centroids [nlist, dim], and the residual levels
        [dim, 2^nbits] (1, 2, 4 bits) or, at 8 bits, the residuals' range `low`..`high`."""
        nlist, dim = centroids.shape
        quantizer = faiss.IndexFlatIP(dim)
        quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
        if nbits == 8:
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
            faiss.copy_array_to_vector(np.concatenate([low, high - low]).astype(np.float32), index.sq.trained)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, dim, nbits, faiss.METRIC_INNER_PRODUCT)
            faiss.copy_array_to_vector(np.ascontiguousarray(levels, dtype=np.float32).ravel(), index.pq.centroids)
        index.is_trained = True
        owned = faiss.deserialize_index(faiss.serialize_index(index))  # owns its quantizer
        return cls(owned, np.asarray(low, np.float32), np.asarray(high, np.float32))

    @classmethod
    def train(cls, vectors: np.ndarray, centroids: int, nbits: int, niter: int = 4, seed: int = 0,
              device: str = "cpu", in_place: bool = False) -> ResidualCodec:
        """Spherical k-means of `vectors` into `centroids` (PLAID's), then the residual levels fitted on every
        residual, all on `device`. With `in_place`, `vectors` (a float32 array) is overwritten by its residuals,
        so the sample is held once."""
        if nbits not in NBITS:
            raise ValueError(f"nbits must be one of {NBITS}, got {nbits}")
        vectors = np.asarray(vectors, dtype=np.float32)
        centre = token_math.kmeans(vectors, centroids, niter, seed, device)
        residuals = vectors if in_place else np.empty_like(vectors)
        low = np.full(vectors.shape[1], np.inf, np.float32)
        high = np.full(vectors.shape[1], -np.inf, np.float32)
        for begin, chunk, assigned in token_math.assigned_chunks(vectors, centre):
            part = (chunk - centre[assigned]).cpu().numpy()
            residuals[begin:begin + len(part)] = part
            low, high = np.minimum(low, part.min(axis=0)), np.maximum(high, part.max(axis=0))
        levels = None if nbits == 8 else token_math.fit_levels(residuals, 2**nbits, LEVEL_ITERATIONS, device)
        levels = None if levels is None else levels.cpu().numpy()
        return cls.from_parts(centre.cpu().numpy(), nbits, levels, low, high)

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

    def tensors(self, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The centroids [nlist, dim] and the residual table on `device` (levels [dim, 2^nbits], or vmin and vdiff
        [2, dim] at 8 bits), made once per device."""
        if device not in self._tensors:
            self._tensors[device] = (torch.from_numpy(self.centroids()).to(device),
                                     torch.from_numpy(self._table).to(device))
        return self._tensors[device]

    def byte_values(self) -> np.ndarray:
        """What each byte of a residual code decodes to: [code_bytes x 256, 8 / nbits] float32, row
        ``position x 256 + byte`` holding the values of the dimensions that byte packs (the lowest bits first), so
        decoding is one gather of whole bytes instead of unpacking bits."""
        per_byte = 8 // self.nbits
        byte = np.arange(256)[:, None]
        codes = (byte >> (np.arange(per_byte) * self.nbits)) & ((1 << self.nbits) - 1)  # [256, per_byte]
        dims = np.arange(self.code_bytes)[:, None, None] * per_byte + np.arange(per_byte)  # [bytes, 1, per_byte]
        if self.nbits == 8:  # FAISS's SQ8 decoding: vmin + (code + 0.5) / 255 x vdiff, in float32
            place = (codes.astype(np.float32) + np.float32(0.5)) / np.float32(255)
            values = self._table[0][dims] + place[None] * self._table[1][dims]
        else:
            values = self._table[dims, codes[None]]
        return np.ascontiguousarray(values.reshape(-1, per_byte), dtype=np.float32)

    def _byte_table(self, device: str) -> torch.Tensor:
        if device not in self._byte_tables:
            self._byte_tables[device] = torch.from_numpy(self.byte_values()).to(device)
        return self._byte_tables[device]

    def encode(self, vectors, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
        """Centroid ids [n] and residual codes [n, code_bytes] of `vectors` [n, dim], computed on `device` a chunk
        at a time; the same bytes FAISS's `sa_encode` writes after the list number."""
        centre, table = self.tensors(device)
        ids = np.empty(len(vectors), dtype=self.id_dtype)
        codes = np.empty((len(vectors), self.code_bytes), dtype=np.uint8)
        for begin, chunk, assigned in token_math.assigned_chunks(vectors, centre):
            residual = chunk - centre[assigned]
            if self.nbits == 8:  # FAISS's SQ8: floor(255 x the residual's place in the range), clipped
                place = torch.where(table[1] != 0, (residual - table[0]) / table[1], torch.zeros_like(residual))
                packed = (255 * place.clamp(0, 1)).to(torch.int32).to(torch.uint8)
            else:
                packed = token_math.pack_bits(token_math.nearest_levels(residual, table), self.nbits)
            ids[begin:begin + len(chunk)] = assigned.cpu().numpy()
            codes[begin:begin + len(chunk)] = packed.cpu().numpy()
        return ids, codes

    def decode(self, ids, residuals, device: str = "cpu") -> torch.Tensor:
        """Token vectors (centroid plus decoded residual, not renormalised) [n, dim] on `device`."""
        centre, _ = self.tensors(device)
        ids = token_math.as_tensor(np.asarray(ids).astype(np.int64), device, torch.int64)
        packed = token_math.as_tensor(residuals, device, torch.int64)
        rows = (packed + torch.arange(self.code_bytes, device=device) * 256).reshape(-1)
        values = self._byte_table(device).index_select(0, rows).reshape(len(ids), self.dim)
        return centre.index_select(0, ids) + values

    def levels(self) -> np.ndarray:
        """The values a decoded residual can take, per dimension, ascending [dim, levels]."""
        if self.nbits == 8:
            steps = (np.arange(256, dtype=np.float32) + 0.5) / 255
            return self._table[0][:, None] + steps[None, :] * self._table[1][:, None]
        return np.sort(self._table, axis=1)

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

    def resize(self, directory: Path) -> None:
        """Set a built index's token and offset arrays to this layout's sizes in place: grown for appended
        passages (their rows zero until shard tasks fill them), or cut back to the committed size after an append
        that did not finish. The rows already there are kept."""
        for name, rows in ((CENTROID_IDS, self.tokens), (RESIDUALS, self.tokens), (OFFSETS, self.passages + 1)):
            resize_rows(directory / name, rows)
        offsets = np.load(directory / OFFSETS, mmap_mode="r+")
        offsets[-1] = self.tokens
        offsets.flush()


def resize_rows(path: Path, rows: int) -> None:
    """Give the .npy array at `path` `rows` rows in place: the header is rewritten in the same bytes (NumPy leaves
    room in it for the first axis to grow) and the file extended with zeros or cut."""
    with open(path, "r+b") as file:
        version = np.lib.format.read_magic(file)
        read, write = ((np.lib.format.read_array_header_1_0, np.lib.format.write_array_header_1_0) if version == (1, 0)
                       else (np.lib.format.read_array_header_2_0, np.lib.format.write_array_header_2_0))
        shape, fortran, dtype = read(file)
        start = file.tell()
        if fortran:
            raise ValueError(f"{path}: a Fortran-ordered array cannot grow by rows")
        file.seek(0)
        new_shape = (rows, *shape[1:])
        write(file, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": new_shape})
        if file.tell() != start:
            raise ValueError(f"{path}: the array header cannot be rewritten in place for {new_shape}")
        file.truncate(start + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


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


def lists_match(directory: Path, layout: Layout, entries: int) -> bool:
    """Whether the build's lists are those of `layout` with `entries` list entries (an append that stopped after
    merging its lists leaves others), its token arrays at least that long."""
    def rows(name: str) -> int:
        return int(np.load(directory / name, mmap_mode="r").shape[0])

    return (rows(IVF) == entries and rows(PASSAGE_CELL_OFFSETS) == layout.passages + 1
            and int(np.load(directory / IVF_OFFSETS)[-1]) == entries and rows(CENTROID_IDS) >= layout.tokens
            and rows(OFFSETS) >= layout.passages + 1)


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
        pairs.append(np.unique(np.repeat(numbers, counts) * layout.nlist + centroid_ids.astype(np.int64)))
        written.add(numbers.astype(np.uint64))
    for array in (ids_out, residuals_out, offsets_out):
        array.flush()
    # (passage, centroid) pairs, passage-major: the batches ascend by passage, so their concatenation is sorted
    keys = np.concatenate(pairs) if pairs else np.zeros(0, np.int64)
    passages, cells = keys // layout.nlist, (keys % layout.nlist).astype(id_dtype)
    by_cell = np.lexsort((passages, cells))
    temporary = directory / f".ivf-{shard:03d}.{os.getpid()}.tmp.npz"
    np.savez(temporary, passages=passages[by_cell].astype(_passage_dtype(layout.passages)),
             counts=np.bincount(cells, minlength=layout.nlist).astype(np.int64), cells=cells,
             cell_counts=np.bincount(passages - first, minlength=last - first).astype(np.int64))
    os.replace(temporary, directory / f"ivf-{shard:03d}.npz")
    return written


def _passage_dtype(passages: int) -> np.dtype:
    return np.dtype(np.int32 if passages < 2**31 else np.int64)


def merge_lists(directory: Path, shards: list[int], layout: Layout, previous: Layout | None = None) -> int:
    """Lay the lists out as one on disk: the centroid -> passages lists (``ivf.npy``, ``ivf_offsets.npy``) and the
    passage -> distinct centroids lists (``passage_cells.npy``, ``passage_cell_offsets.npy``), from the lists of
    the `previous` layout's passages already built (an append) and then each of `shards`' parts, in order, so each
    centroid's passages ascend. Holds one shard's lists and the per-centroid counts. Returns the entries."""
    parts = [directory / f"ivf-{shard:03d}.npz" for shard in shards]
    counts = np.stack([np.load(part)["counts"] for part in parts] + ([] if previous is None else [
        np.diff(np.load(directory / IVF_OFFSETS))]))
    offsets = np.concatenate([[0], np.cumsum(counts.sum(axis=0))]).astype(np.int64)
    entries = int(offsets[-1])
    lists = _open_output(directory, IVF, (entries,), _passage_dtype(layout.passages))
    cells = _open_output(directory, PASSAGE_CELLS, (entries,), np.dtype(layout.id_dtype))
    cell_offsets = _open_output(directory, PASSAGE_CELL_OFFSETS, (layout.passages + 1,), np.int64)
    placed = np.zeros(layout.nlist, dtype=np.int64)
    cell_offsets[0], written, first = 0, 0, 0
    if previous is not None:
        placed, written, first = _place_built_lists(directory, previous, lists, cells, cell_offsets, offsets)
    for part in parts:
        with np.load(part) as shard:
            shard_counts, passages = shard["counts"], shard["passages"]
            starts = offsets[:-1] + placed
            within = np.arange(len(passages)) - np.repeat(np.cumsum(shard_counts) - shard_counts, shard_counts)
            lists[np.repeat(starts, shard_counts) + within] = passages
            placed += shard_counts
            cells[written:written + len(shard["cells"])] = shard["cells"]
            per_passage = shard["cell_counts"]
            cell_offsets[first + 1:first + 1 + len(per_passage)] = written + np.cumsum(per_passage)
            written, first = written + len(shard["cells"]), first + len(per_passage)
    for array in (lists, cells, cell_offsets):
        array.flush()
    del lists, cells, cell_offsets
    for name in (IVF, PASSAGE_CELLS, PASSAGE_CELL_OFFSETS):
        os.replace(_temporary(directory, name), directory / name)
    temporary = _temporary(directory, IVF_OFFSETS)
    np.save(temporary, offsets)
    os.replace(temporary, directory / IVF_OFFSETS)
    for part in parts:
        part.unlink()
    return entries


def _place_built_lists(directory: Path, previous: Layout, lists: np.ndarray, cells: np.ndarray,
                       cell_offsets: np.ndarray, offsets: np.ndarray, chunk: int = 2**24):
    """Copy the built lists of the `previous` passages to the front of each new list, and their passage cells to
    the front of the new cells, `chunk` entries at a time; returns (entries placed per centroid, cells written,
    passages written)."""
    built, built_offsets = np.load(directory / IVF, mmap_mode="r"), np.load(directory / IVF_OFFSETS)
    built_counts = np.diff(built_offsets)
    first = 0
    while first < previous.nlist:  # centroid ranges of about `chunk` entries
        last = max(first + 1, int(np.searchsorted(built_offsets, built_offsets[first] + chunk, side="right")) - 1)
        last = min(last, previous.nlist)
        span = built_counts[first:last]
        within = np.arange(int(span.sum())) - np.repeat(np.cumsum(span) - span, span)
        lists[np.repeat(offsets[first:last], span) + within] = built[built_offsets[first]:built_offsets[last]]
        first = last
    built_cells = np.load(directory / PASSAGE_CELLS, mmap_mode="r")
    for begin in range(0, len(built_cells), chunk):
        part = built_cells[begin:begin + chunk]
        cells[begin:begin + len(part)] = part
    cell_offsets[:previous.passages + 1] = np.load(directory / PASSAGE_CELL_OFFSETS, mmap_mode="r")
    return built_counts.copy(), len(built_cells), previous.passages


def _temporary(directory: Path, name: str) -> Path:
    return directory / f".{name}.{os.getpid()}.tmp.npy"


def _open_output(directory: Path, name: str, shape: tuple[int, ...], dtype) -> np.memmap:
    """A new array file under its temporary name (`_temporary`), to be renamed once written."""
    return np.lib.format.open_memmap(_temporary(directory, name), mode="w+", dtype=dtype, shape=shape)


# ------------------------------------------------------------------------------------------------ search
@dataclass(frozen=True)
class SearchSettings:
    """PLAID's search knobs: centroids probed per query token, the centroid-score pruning threshold (None: off),
    and the candidates kept by the pruned approximate score (a quarter of them are decoded and scored exactly)."""

    ncells: int
    centroid_score_threshold: float | None
    ndocs: int

    @classmethod
    def for_depth(cls, k: int, ncells: int | None = None, centroid_score_threshold: float | None = None,
                  ndocs: int | None = None) -> SearchSettings:
        """PLAID's defaults for `k` passages (k <= 10: 1 cell, 0.5, 256; k <= 100: 2, 0.45, 1024; else 4, 0.4,
        max(4k, 4096)), each overridden when given; a threshold of -1 or less prunes nothing (cosines are >= -1).

        >>> SearchSettings.for_depth(100), SearchSettings.for_depth(2500, centroid_score_threshold=-1).ndocs
        (SearchSettings(ncells=2, centroid_score_threshold=0.45, ndocs=1024), 10000)
        """
        default = (1, 0.5, 256) if k <= 10 else (2, 0.45, 1024) if k <= 100 else (4, 0.4, max(4 * k, 4096))
        threshold = centroid_score_threshold if centroid_score_threshold is not None else default[1]
        return cls(ncells or default[0], threshold if threshold > -1 else None, ndocs or default[2])

    def decoded(self, k: int) -> int:
        """Candidates decoded for exact MaxSim: a quarter of ndocs (PLAID's), at least k."""
        return max(self.ndocs // 4, k)


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the `count` best scores, best first, ties by position (so by passage number, the candidates
    ascending): the same every run, whatever the threads.

    >>> top_indices(torch.tensor([0.5, 0.9, 0.5, 0.1, 0.5]), 3).tolist()
    [1, 0, 2]
    """
    if count >= len(scores):
        return torch.sort(-scores, stable=True).indices
    kth = torch.topk(scores, count).values[-1]
    above = torch.nonzero(scores > kth).flatten()
    tied = torch.nonzero(scores == kth).flatten()[:count - len(above)]
    chosen = torch.cat([above, tied]).sort().values
    return chosen[torch.sort(-scores[chosen], stable=True).indices]


def _load(path: Path, budget: list[int]):
    """An array file read into RAM while `budget[0]` bytes remain (and charged to it), else memory-mapped."""
    mapped = np.load(path, mmap_mode="r")
    if mapped.nbytes > budget[0]:
        return mapped
    budget[0] -= mapped.nbytes
    return np.ascontiguousarray(mapped)


class TokenIndex:
    """A built compressed token index, searched in PLAID's stages on the device and threads this process holds:

    1. candidates: the passages listed under each query token's `ncells` best centroids;
    2. approximate MaxSim over each candidate's distinct centroids, skipping those no query token scores at
       `centroid_score_threshold` (pruning), from a centroid-major score table; the best `ndocs` stay;
    3. the same without pruning; the best quarter stay;
    4. those are decoded and ranked by exact MaxSim.

    The centroid ids, offsets and lists are held in RAM while they fit `ram_bytes` (default: a quarter of the
    available memory), else memory-mapped; residual codes are always mapped and read only for decoded candidates.
    Usable as the searcher of `maxp.rank_documents` (`ntotal`, `search`)."""

    def __init__(self, directory: Path, meta: dict, settings: SearchSettings, device: str = "cpu",
                 ram_bytes: int | None = None):
        import psutil

        self.directory, self.settings, self.device = directory, settings, device
        self.codec = ResidualCodec.load(directory)
        self.centroid_vectors, _ = self.codec.tensors(device)
        budget = [psutil.virtual_memory().available // 4 if ram_bytes is None else ram_bytes]
        self.offsets = _load(directory / OFFSETS, budget)
        self.list_offsets = np.load(directory / IVF_OFFSETS)
        self.cell_offsets = _load(directory / PASSAGE_CELL_OFFSETS, budget)
        self.cells = _load(directory / PASSAGE_CELLS, budget)
        self.lists = _load(directory / IVF, budget)
        self.centroid_ids = _load(directory / CENTROID_IDS, budget)
        self.residuals = np.load(directory / RESIDUALS, mmap_mode="r")
        self.ntotal = len(self.offsets) - 1
        self.work: Counter = Counter()  # what searches read so far: queries, candidates, cells scored, tokens decoded
        self.deleted = np.zeros(self.ntotal, dtype=bool)
        if (directory / DELETED).is_file():
            self.deleted[np.load(directory / DELETED)] = True
        self.query_maxlen = int(meta["query_maxlen"])
        found = {"passages": self.ntotal, "tokens": len(self.centroid_ids), "dim": self.codec.dim,
                 "centroids": self.codec.nlist}
        stale = {name: (value, meta.get(name)) for name, value in found.items() if meta.get(name) != value}
        if (stale or int(self.offsets[-1]) != len(self.centroid_ids) or len(self.list_offsets) != self.codec.nlist + 1
                or len(self.cell_offsets) != self.ntotal + 1 or int(self.cell_offsets[-1]) != len(self.cells)):
            raise StaleIndexError(f"the token index in {directory} does not match its metadata ({stale or 'offsets'}); "
                                  "re-run the index stage")

    def _rows(self, passages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The token rows of `passages`, in order, and each passage's token count."""
        starts = np.asarray(self.offsets[passages], dtype=np.int64)
        counts = np.asarray(self.offsets[passages + 1], dtype=np.int64) - starts
        return token_rows(starts, counts), counts

    def decode_passages(self, passages: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """The decoded, unit-length token vectors of `passages` and each one's token count."""
        rows, counts = self._rows(passages)
        vectors = self.codec.decode(self.centroid_ids[rows], self.residuals[rows], self.device)
        return torch.nn.functional.normalize(vectors, dim=1), counts

    def candidates(self, centroid_scores: torch.Tensor) -> np.ndarray:
        """The passages listed under each query token's `ncells` best centroids ([Lq, nlist] scores), ascending,
        deleted ones left out."""
        ncells = min(self.settings.ncells, self.codec.nlist)
        cells = torch.topk(centroid_scores, ncells, dim=1).indices.unique().cpu().numpy()
        starts, ends = self.list_offsets[cells], self.list_offsets[cells + 1]
        found = np.unique(self.lists[token_rows(starts, ends - starts)]).astype(np.int64)
        return found[~self.deleted[found]]

    def approximate_scores(self, table: torch.Tensor, passages: np.ndarray, kept: torch.Tensor | None) -> torch.Tensor:
        """MaxSim with each token replaced by its centroid, over each passage's distinct centroids; `table` is the
        centroid-major score table [nlist, Lq]. With `kept` (a mask over centroids), the other centroids are
        skipped and count 0 (PLAID's pruning)."""
        starts = np.asarray(self.cell_offsets[passages], dtype=np.int64)
        counts = np.asarray(self.cell_offsets[passages + 1], dtype=np.int64) - starts
        cells = torch.from_numpy(np.asarray(self.cells[token_rows(starts, counts)], dtype=np.int64)).to(self.device)
        self.work["cells"] += len(cells)
        lengths = torch.from_numpy(counts).to(self.device)
        if kept is None:
            return token_math.segment_max(table.index_select(0, cells), lengths).sum(dim=1)
        keep = kept[cells]
        lengths = token_math.segment_sum(keep.to(torch.int64), lengths)
        return token_math.segment_max(table.index_select(0, cells[keep]), lengths, floor=0.0).sum(dim=1)

    def exact_scores(self, query: torch.Tensor, passages: np.ndarray) -> torch.Tensor:
        """MaxSim of `query` [Lq, dim] over the decoded tokens of `passages`, DECODE_CHUNK passages at a time."""
        parts = []
        for begin in range(0, len(passages), DECODE_CHUNK):
            vectors, counts = self.decode_passages(passages[begin:begin + DECODE_CHUNK])
            self.work["decoded_tokens"] += int(counts.sum())
            lengths = torch.from_numpy(counts).to(self.device)
            parts.append(token_math.segment_max(vectors @ query.T, lengths).sum(dim=1))
        return torch.cat(parts) if parts else torch.zeros(0, device=self.device)

    def _check(self, queries: torch.Tensor) -> None:
        if queries.ndim != 3 or queries.shape[2] != self.codec.dim:
            raise ValueError(f"queries must be [n, tokens, {self.codec.dim}], got {list(queries.shape)}")
        if queries.shape[1] > self.query_maxlen:
            raise QueryTooLongError(f"a query of {queries.shape[1]} token vectors is longer than the student's "
                                    f"query_maxlen ({self.query_maxlen}); encode it with the student, which cuts it")

    def search_one(self, query: torch.Tensor, centroid_scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top `k` passages of one query [Lq, dim], given its centroid scores [Lq, nlist]: scores, numbers."""
        candidates = self.candidates(centroid_scores)
        self.work.update(queries=1, candidates=len(candidates))
        table = centroid_scores.T.contiguous()  # centroid-major: one centroid's scores for every query token
        threshold = self.settings.centroid_score_threshold
        if len(candidates) > max(self.settings.ndocs, k):
            kept = table.max(dim=1).values >= threshold if threshold is not None else None
            approximate = self.approximate_scores(table, candidates, kept)
            candidates = candidates[top_indices(approximate, max(self.settings.ndocs, k)).cpu().numpy()]
            candidates.sort()
        decoded = self.settings.decoded(k)
        if len(candidates) > decoded:
            approximate = self.approximate_scores(table, candidates, None)
            candidates = candidates[top_indices(approximate, decoded).cpu().numpy()]
            candidates.sort()
        exact = self.exact_scores(query, candidates)
        best = top_indices(exact, k).cpu().numpy()
        return exact.cpu().numpy()[best], candidates[best]

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and passage numbers [n, k], best first; -inf and -1 pad when fewer passages are found. The
        queries' centroid scores are computed a batch at a time (one matmul), within `token_math`'s budget."""
        queries = token_math.as_tensor(queries, self.device)
        self._check(queries)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        step = max(1, token_math.chunk_rows(self.codec.nlist) // max(queries.shape[1], 1))
        with torch.inference_mode():
            for begin in range(0, len(queries), step):
                batch = queries[begin:begin + step]
                centroid_scores = batch @ self.centroid_vectors.T  # [batch, Lq, nlist]
                for row, query in enumerate(batch):
                    found_scores, found = self.search_one(query, centroid_scores[row], k)
                    scores[begin + row, :len(found)], ids[begin + row, :len(found)] = found_scores, found
        return scores, ids
