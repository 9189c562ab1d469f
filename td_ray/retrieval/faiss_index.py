"""FAISS indexes built as faiss' own recipe for indexes that do not fit in RAM does it (contrib/ondisk.py,
benchs/distributed_ondisk): train once on a sample, add each shard to a copy of the trained index anywhere, then
merge the IVF shards' inverted lists into one on-disk file that search memory-maps. Flat and HNSW indexes, which
cannot be merged that way, stay as shards that search maps once each and reads in turn, merging their top k.

Every index is chosen by a FAISS factory string and compares by inner product (a cosine student's vectors are
unit length, so inner product is cosine). Vectors are keyed by their faiss id, the row of the passage table.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from td_ray import devices
from td_ray.errors import TdRayError
from td_ray.keys import Digest

logger = logging.getLogger(__name__)

FACTORY_EXAMPLES = ("Flat", "HNSW32", "IVF4096,Flat", "IVF4096,SQ8", "IVF4096,PQ64", "OPQ64,IVF65536_HNSW32,PQ64")
MIN_POINTS_PER_CENTROID = 39
"""FAISS's k-means wants at least 39 training points per centroid (it warns below, and fails below one)."""


class IndexSettingsError(TdRayError):
    """An index setting FAISS cannot build (a factory string, a PQ size, too few training points)."""


@dataclass(frozen=True)
class IndexPlan:
    """What a factory string builds at a dimension: whether it is IVF (and its lists), whether it needs training
    and on how many points at least, and whether its shards merge on disk."""

    factory: str
    dim: int
    nlist: int | None
    needs_training: bool
    min_train: int

    @property
    def merges_on_disk(self) -> bool:
        return self.nlist is not None


def _divisors(dim: int) -> list[int]:
    return [m for m in range(1, dim + 1) if dim % m == 0]


def plan_index(factory: str, dim: int, dim_known: bool = True) -> IndexPlan:
    """Check `factory` at `dim` and say what it builds; raises IndexSettingsError naming the fix. `dim_known` False:
    `dim` only stands in for a dimension not known yet, and messages do not name it."""
    for match in re.finditer(r"(?<![A-Za-z])(OPQ|PQ)(\d+)", factory):
        size = int(match.group(2))
        if match.group(1) == "PQ" and dim % size:
            raise IndexSettingsError(
                f"index.factory {factory!r}: PQ{size} needs the dimension ({dim}) to be a multiple of {size}; use "
                f"one of its divisors: {', '.join(f'PQ{m}' for m in _divisors(dim) if m >= 4)}"
            )
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        reason = re.split(r"failed:|\.cpp:\d+: ", str(error).splitlines()[-1])[-1].strip()[:160]
        raise IndexSettingsError(
            f"index.factory {factory!r} is not a FAISS factory string{f' at dimension {dim}' if dim_known else ''} "
            f"({reason}); use one such "
            f"as {', '.join(FACTORY_EXAMPLES)}"
        ) from None
    ivf = faiss.try_extract_index_ivf(index)
    min_train = 0
    if ivf is not None:
        min_train = MIN_POINTS_PER_CENTROID * ivf.nlist
    codebook = _codebook_size(index)
    if codebook:
        min_train = max(min_train, codebook)
    return IndexPlan(factory, dim, ivf.nlist if ivf is not None else None, not index.is_trained, min_train)


def _codebook_size(index: faiss.Index) -> int:
    """Centroids of a product quantizer inside `index` (FAISS fails with fewer training points), else 0."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    pq = getattr(index, "pq", None)
    return int(pq.ksub) if pq is not None else 0


def check_training_points(plan: IndexPlan, available: int, train_sample: int, where: str) -> None:
    """Fail, before any work, when the sample (or the vectors available) cannot train the index."""
    if not plan.needs_training:
        return
    usable = min(train_sample, available)
    if usable < plan.min_train:
        what = f"IVF{plan.nlist} needs {MIN_POINTS_PER_CENTROID} x {plan.nlist}" if plan.nlist else "its codebook needs"
        raise IndexSettingsError(
            f"index.factory {plan.factory!r}: {what} = {plan.min_train} training vectors, but {where} gives "
            f"{usable} (train_sample {train_sample}, {available} available); raise index.train_sample, or use fewer "
            f"IVF lists (at most IVF{max(1, usable // MIN_POINTS_PER_CENTROID)}), or an index that needs no "
            "training (Flat, HNSW32)"
        )


def empty_index(plan: IndexPlan) -> faiss.Index:
    """A new index of the plan; non-IVF indexes are wrapped to take explicit ids (IVF ones take them natively).

    IVF-PQ's polysemous training (a code permutation for Hamming-distance filtering, which td-ray never searches
    by) is turned off: it made training 240 vectors take 30 s, and grows with the sample.
    """
    factory = plan.factory if plan.merges_on_disk else f"IDMap2,{plan.factory}"
    index = faiss.index_factory(plan.dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
        faiss.downcast_index(ivf).do_polysemous_training = False
    return index


def on_gpu(device: str) -> bool:
    """Whether to train and add on GPUs: `cuda`, or `auto` when this FAISS build sees a GPU (the gpu extra) that this
    process may use: any outside Ray; in a Ray task only one it reserved (Ray then makes exactly those visible, so
    cloning onto every visible GPU takes only the reserved ones)."""
    if device == "cpu":
        return False
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    allowed = devices.gpus_allowed()
    if device == "cuda" and not (gpus and allowed):
        reason = ("this FAISS build sees no GPU; install the gpu extra (faiss-gpu-cu12) on a GPU node" if allowed
                  else "this Ray task reserved no GPU; give the stage GPUs (index.num_gpus_per_actor)")
        raise IndexSettingsError(f"index.device is cuda but {reason}, or set index.device: auto")
    return gpus > 0 and allowed


GpuPlan = Literal["clone", "clustering_only", "cpu"]


def gpu_plan(index: faiss.Index) -> GpuPlan:
    """What of `index` can run on a GPU. ``clone``: all of it, as FAISS's GPU cloner copies an IVF index whose coarse
    quantizer is flat and whose codes are flat, SQ or 8-bit PQ. ``clustering_only``: any other IVF index (an HNSW
    coarse quantizer, which the cloner refuses; 4-bit or fast-scan PQ): only the coarse k-means runs on the GPU,
    the index stays on the CPU, and vectors are added there. ``cpu``: no IVF (Flat needs no training, HNSW has no
    GPU form)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return "cpu"
    ivf = faiss.downcast_index(ivf)
    flat_quantizer = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlat)
    codes = type(ivf) in (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer) or (
        type(ivf) is faiss.IndexIVFPQ and ivf.pq.nbits == 8)
    return "clone" if flat_quantizer and codes else "clustering_only"


def _kmeans_assigner(ivf: faiss.IndexIVF) -> faiss.Index:
    """The flat index FAISS's own CPU k-means assigns with when it trains `ivf`'s coarse quantizer: an L2 one for
    quantizers that train alone (HNSW), else one of the index's metric; on the GPU it gives the CPU's centroids."""
    trains_alone = ivf.quantizer_trains_alone
    if (ord(trains_alone) if isinstance(trains_alone, str) else trains_alone) == 2:
        return faiss.IndexFlatL2(ivf.d)
    return faiss.IndexFlat(ivf.d, ivf.metric_type)


def train(plan: IndexPlan, vectors: np.ndarray, device: str = "auto") -> faiss.Index:
    """The plan's empty index, trained on `vectors`, back on the CPU; on the GPUs when `device` allows, as much of it
    as `gpu_plan` says."""
    index = empty_index(plan)
    if not plan.needs_training:
        return index
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    how = gpu_plan(index)
    if how != "cpu" and not on_gpu(device):
        how = "cpu"
    if how == "clone":
        trained = faiss.index_cpu_to_all_gpus(index)
        trained.train(vectors)
        return faiss.index_gpu_to_cpu(trained)
    if how == "clustering_only":
        ivf = faiss.downcast_index(faiss.try_extract_index_ivf(index))
        assigner = faiss.index_cpu_to_all_gpus(_kmeans_assigner(ivf))
        ivf.clustering_index = assigner
        try:
            index.train(vectors)
        finally:
            ivf.clustering_index = None  # FAISS does not own it: no pointer to a freed GPU index is left behind
        return index
    index.train(vectors)
    return index


def write_atomic(index: faiss.Index, path: Path) -> None:
    """Write an index through a temporary name, so a retried task rewrites the same whole file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    faiss.write_index(index, str(temporary))
    os.replace(temporary, path)


def add_shard(trained: Path, batches: Iterable[tuple[np.ndarray, np.ndarray]], out: Path,
              device: str = "auto") -> Digest:
    """Add (vectors, ids) batches to a copy of the trained index (on the GPUs when `device` allows and `gpu_plan`
    says ``clone``, else on the CPU's threads) and write it to `out`; returns the digest of the ids it added (each id
    its own hash), so the shards together can be checked against 0 .. passages - 1."""
    index = faiss.read_index(str(trained))
    summary = Digest()
    target = faiss.index_cpu_to_all_gpus(index) if gpu_plan(index) == "clone" and on_gpu(device) else index
    for vectors, ids in batches:
        target.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
        summary.add(np.asarray(ids, dtype=np.uint64))
    if target is not index:
        index = faiss.index_gpu_to_cpu(target)
    write_atomic(index, out)
    return summary


@contextlib.contextmanager
def _in_folder(folder: Path) -> Iterator[None]:
    """Run the block with `folder` as the working directory (FAISS resolves an on-disk lists file's name there)."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


MERGED, MERGED_LISTS = "index.faiss", "index.ivfdata"
"""A merged IVF index and its on-disk inverted lists, side by side in one folder."""


def merge_on_disk(trained: Path, shards: list[Path], index_path: Path, data_path: Path) -> int:
    """Merge IVF shards into `index_path`, its inverted lists in one `data_path` file beside it (never all in RAM, as
    in faiss.contrib.ondisk.merge_ondisk); returns the vectors held. The index file names the data file by its bare
    name, so the pair opens from any folder (`Searcher`, a node's copy); both are written under their final names
    inside the build's own directory, which is only used once complete."""
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.read_index(str(trained))
    data_path.unlink(missing_ok=True)  # a killed merge's partial lists
    with _in_folder(data_path.parent):
        merge_ondisk(index, [str(path.resolve()) for path in shards], data_path.name)
    write_atomic(index, index_path)
    return int(index.ntotal)


class Searcher:
    """Search over a built index: the merged IVF index (its inverted lists memory-mapped by FAISS), or the Flat/HNSW
    shards (memory-mapped), and the shards of later appends, each searched in turn and their top k merged. Every
    file is opened once, here, and every search reuses it. `params` is a FAISS ParameterSpace string (``nprobe=64``,
    ``efSearch=128``); the faiss ids in `excluded` (passages of changed or removed documents) are never returned."""

    def __init__(self, paths: list[Path], params: str | None, excluded: np.ndarray | None = None):
        self.paths, self.params = paths, params
        self.indexes = [self._open(path) for path in paths]
        self.ntotal = sum(index.ntotal for index in self.indexes)
        self.dim = self.indexes[0].d
        self.excluded = None
        if excluded is not None and len(excluded):
            self.excluded = np.ascontiguousarray(excluded, dtype=np.int64)
            self.selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self.excluded))  # kept: FAISS holds a pointer
            self.search_parameters = [_parameters_with(index, self.selector) for index in self.indexes]

    def _open(self, path: Path) -> faiss.Index:
        # IO_FLAG_MMAP maps a Flat/HNSW shard's vectors; an on-disk IVF index maps its lists itself (and FAISS
        # 1.15 crashes searching one read with IO_FLAG_MMAP)
        merged = path.with_suffix(".ivfdata").is_file()
        with _in_folder(path.parent):  # the index names its lists file relative to its own folder
            index = faiss.read_index(path.name, faiss.IO_FLAG_READ_ONLY if merged else faiss.IO_FLAG_MMAP)
        if self.params:
            faiss.ParameterSpace().set_index_parameters(index, self.params)
        return index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and faiss ids [n, k], best first; -inf and -1 pad when fewer than k vectors match."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for number, index in enumerate(self.indexes):
            width = min(k, max(index.ntotal, 1))
            if self.excluded is None:
                found_scores, found_ids = index.search(queries, width)
            else:
                found_scores, found_ids = index.search(queries, width, params=self.search_parameters[number])
            found_scores[found_ids < 0] = -np.inf
            scores, ids = _merge_top(scores, ids, found_scores, found_ids, k)
        return scores, ids


def _parameters_with(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters that keep `index`'s own nprobe or efSearch and filter by `selector`."""
    inner = faiss.downcast_index(index)
    while isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        inner = faiss.downcast_index(inner.index)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        parameters = faiss.SearchParametersIVF()
        parameters.nprobe = ivf.nprobe
    elif isinstance(inner, faiss.IndexHNSW):
        parameters = faiss.SearchParametersHNSW()
        parameters.efSearch = inner.hnsw.efSearch
    else:
        parameters = faiss.SearchParameters()
    parameters.sel = selector
    return parameters


def _merge_top(scores: np.ndarray, ids: np.ndarray, more_scores: np.ndarray, more_ids: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of two [n, *] candidate lists per row (ties: the smaller id first)."""
    all_scores = np.concatenate([scores, more_scores], axis=1)
    all_ids = np.concatenate([ids, more_ids], axis=1)
    order = np.lexsort((np.where(all_ids < 0, np.iinfo(np.int64).max, all_ids), -all_scores), axis=1)[:, :k]
    return np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_ids, order, 1)


def default_search_params(plan: IndexPlan) -> str | None:
    """Shipped search defaults: nprobe = nlist / 16 (at least 16, at most nlist) for IVF, efSearch 128 for HNSW."""
    parts = []
    if plan.nlist:
        parts.append(f"nprobe={min(plan.nlist, max(16, plan.nlist // 16))}")
    if "HNSW" in plan.factory:
        parts.append("efSearch=128")
    return ",".join(parts) or None
