"""The heavy arithmetic of the compressed token index, in torch, so it runs on the GPU a task reserved or on every
CPU thread it reserved: nearest centroids by chunked matmul, spherical k-means, per-dimension residual levels,
bit packing as FAISS packs PQ codes, and per-passage (segment) maxima.

Every function bounds its working memory by chunks, whatever the number of vectors: a chunk's score matrix holds at
most `SCORE_ELEMENTS` floats.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

SCORE_ELEMENTS = 2**25
"""Floats of one chunk's vectors-by-centroids score matrix (128 MB): 64 vectors a chunk against 2^19 centroids."""


def chunk_rows(columns: int, budget: int = SCORE_ELEMENTS) -> int:
    """Rows per chunk so that a [rows, columns] float matrix stays within `budget` elements.

    >>> chunk_rows(2**19), chunk_rows(16), chunk_rows(10**9)
    (64, 2097152, 1)
    """
    return max(1, budget // max(columns, 1))


def as_tensor(array, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`array` (numpy, memory-mapped or not, or a tensor) as a tensor on `device`, copied only when needed."""
    if isinstance(array, torch.Tensor):
        return array.to(device=device, dtype=dtype)
    array = np.asarray(array)
    if not array.flags.writeable or not array.flags.c_contiguous:  # a memory-mapped slice: copy just that
        array = np.array(array, order="C")
    return torch.from_numpy(array).to(device=device, dtype=dtype)


def assigned_chunks(vectors, centroids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The chunks of `vectors` [n, dim] (numpy, memory-mapped or not, or a tensor), each moved to the centroids'
    device, with each row's best centroid by inner product (the first on ties): (first row, chunk, ids)."""
    step = chunk_rows(len(centroids))
    for begin in range(0, len(vectors), step):
        chunk = as_tensor(vectors[begin:begin + step], centroids.device)
        yield begin, chunk, (chunk @ centroids.T).argmax(dim=1)


def kmeans(sample, k: int, niter: int, seed: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """Spherical k-means (inner product, unit-length centroids, as PLAID normalises its centroids) of `sample`
    [n, dim] into `k` centroids on `device`. The sample stays where it is and moves a chunk at a time; an empty
    cluster is reseeded with a sample vector."""
    n, dim = sample.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means of {n} vectors into {k} centroids: k must be between 1 and the sample size")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=generator)[:k].sort().values.numpy()
    centroids = torch.nn.functional.normalize(as_tensor(sample[chosen], device), dim=1)
    for _ in range(niter):
        sums = torch.zeros(k, dim, device=device)
        counts = torch.zeros(k, device=device)
        for _, chunk, ids in assigned_chunks(sample, centroids):
            sums.index_add_(0, ids, chunk)
            counts += torch.bincount(ids, minlength=k).to(counts.dtype)
        empty = counts == 0
        if empty.any():
            reseed = torch.randint(0, n, (int(empty.sum()),), generator=generator).sort().values.numpy()
            sums[empty] = as_tensor(sample[reseed], device)
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids


def fit_levels(residuals, levels: int, niter: int = 8, device: str | torch.device = "cpu") -> torch.Tensor:
    """Per-dimension 1-D k-means of `residuals` [n, dim] into `levels` values each, ascending [dim, levels]:
    started at the quantiles of up to 65,536 residuals, then fitted on all of them a chunk at a time."""
    n, dim = residuals.shape
    head = as_tensor(residuals[:min(n, 2**16)], device)
    quantiles = (torch.arange(levels, device=device, dtype=torch.float32) + 0.5) / levels
    fitted = torch.quantile(head, quantiles, dim=0).T.contiguous()  # [dim, levels]
    step = chunk_rows(dim * 4)
    for _ in range(niter):
        bounds = (fitted[:, 1:] + fitted[:, :-1]) / 2
        sums = torch.zeros(dim, levels, device=device)
        counts = torch.zeros(dim, levels, device=device)
        for begin in range(0, n, step):
            chunk = as_tensor(residuals[begin:begin + step], device).T.contiguous()  # [dim, rows]
            which = torch.searchsorted(bounds, chunk)
            sums.scatter_add_(1, which, chunk)
            counts.scatter_add_(1, which, torch.ones_like(chunk))
        fitted = torch.where(counts > 0, sums / counts.clamp(min=1), fitted).sort(dim=1).values
    return fitted


def nearest_levels(residuals: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each residual dimension's nearest level (squared distance, first on ties, as FAISS's PQ encoder picks),
    [n, dim] uint8; `levels` [dim, L]."""
    out = torch.empty(residuals.shape, dtype=torch.uint8, device=residuals.device)
    step = chunk_rows(residuals.shape[1] * levels.shape[1])
    for begin in range(0, len(residuals), step):
        chunk = residuals[begin:begin + step]
        out[begin:begin + len(chunk)] = ((chunk[:, :, None] - levels[None]) ** 2).argmin(dim=2).to(torch.uint8)
    return out


def pack_bits(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """[n, dim] codes of `nbits` each into [n, dim * nbits / 8] bytes, the first dimension in the lowest bits (as
    FAISS's PQ encoder writes them; `plaid.ResidualCodec.byte_values` decodes whole bytes).

    >>> pack_bits(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist()
    [[57]]
    """
    if nbits == 8:
        return codes.to(torch.uint8)
    per_byte = 8 // nbits
    grouped = codes.to(torch.int32).reshape(len(codes), -1, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * nbits
    return (grouped << shifts).sum(dim=2).to(torch.uint8)


def segment_max(values: torch.Tensor, lengths: torch.Tensor, floor: float | None = None) -> torch.Tensor:
    """Row-wise maximum of each run of `lengths[i]` consecutive rows of `values` [n, q] -> [len(lengths), q];
    an empty run gives `floor` (which also bounds every maximum from below when given).

    >>> segment_max(torch.tensor([[1.], [3.], [2.]]), torch.tensor([2, 0, 1]), floor=0.0).flatten().tolist()
    [3.0, 0.0, 2.0]
    """
    if floor is None:
        return torch.segment_reduce(values, "max", lengths=lengths, axis=0)
    return torch.segment_reduce(values, "max", lengths=lengths, axis=0, initial=floor)


def segment_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The sum of each run of `lengths[i]` consecutive values of `values` [n] -> [len(lengths)] (0 when empty).

    >>> segment_sum(torch.tensor([1, 1, 0, 1]), torch.tensor([3, 0, 1])).tolist()
    [2, 0, 1]
    """
    ends = torch.cumsum(lengths, 0)
    totals = torch.cat([values.new_zeros(1), torch.cumsum(values, 0)])
    return totals[ends] - totals[ends - lengths]
