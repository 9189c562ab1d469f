"""fast-plaid's arm of the head to head in `bench/colbert_index.py`: build its index on the same token embeddings and
search it on CPU, with the same threads.

Run by the python of the venv that `common.fast_plaid_python()` makes (fast-plaid 1.7 needs its own torch 2.11), so
it imports nothing but the standard library, numpy, torch and fast_plaid:

    PY=$(cd bench && ../.venv/bin/python -c "import common; print(common.fast_plaid_python())")
    $PY bench/fast_plaid_arm.py build --tokens-dir D --index DIR --nbits 2 --threads 2 [--centroids K]
    $PY bench/fast_plaid_arm.py search --index DIR --queries Q.npy --k 100 --threads 2 \\
        --n-ivf-probe 8 --n-full-scores 4096 --out OUT.json

`build` reads D/chunk-*.npz (arrays `counts`, passages' token counts, and `tokens`, [sum(counts), 128] float32 or
float16) and writes DIR/td_ray_bench_manifest.json; it keeps an index whose manifest matches its tokens, passages,
nbits and centroids. Passage numbers in `search`'s ids are positions in the build's list of documents (chunk order).

The number of centroids: fast-plaid's `create` has no argument for it; its `compute_kmeans` takes one
(`num_partitions`) and otherwise picks 2^floor(log2(16 sqrt(T))), T the tokens estimated from a sample of
min(1 + 16 sqrt(120 D), D) of the D documents (PLAID's rule, on an estimate of T). `--centroids` passes it.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import resource
import time
from importlib import metadata
from pathlib import Path

logger = logging.getLogger("bench.fast_plaid_arm")
MANIFEST = "td_ray_bench_manifest.json"


def limit_threads(threads: int) -> None:
    """N threads for torch (intra-op), OpenMP/MKL and fast-plaid's Rust (rayon); call before importing torch."""
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[variable] = str(threads)
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)


def peak_rss() -> int:
    """This process's peak RSS in bytes (Linux counts ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def read_documents(tokens_dir: Path) -> list:
    """Every passage's token tensor, in chunk order. fast-plaid's `create` takes the whole list of per-document
    tensors (its k-means samples documents from it, then the Rust side compresses it in batches), so all chunks are
    held at once: each passage is a view into its chunk's array (no second copy), in the dtype stored. The build's
    peak RSS is this, torch's libraries (about 0.6 GB) and k-means' distances: [51,200 x min(centroids, 10,240)]
    float32 a step, about 1.8 GB at 4,096 centroids."""
    import numpy as np
    import torch

    documents = []
    for path in sorted(tokens_dir.glob("chunk-*.npz")):
        with np.load(path) as chunk:
            counts, tokens = chunk["counts"], torch.from_numpy(chunk["tokens"])
        documents.extend(torch.split(tokens, counts.tolist()))
    return documents


def index_files(index: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in sorted(index.iterdir())
            if path.is_file() and path.name != MANIFEST}


def build(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from fast_plaid import search
    from fast_plaid.search import fast_plaid as fast_plaid_module

    counts = np.concatenate([np.load(path)["counts"] for path in sorted(args.tokens_dir.glob("chunk-*.npz"))])
    tokens = int(counts.sum())
    wanted = {"tokens": tokens, "passages": len(counts), "nbits": args.nbits, "centroids_asked": args.centroids}
    manifest_path = args.index / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if all(manifest.get(key) == value for key, value in wanted.items()):
            logger.info("kept the index in %s (%d passages, %d tokens, %d bits)", args.index, len(counts), tokens,
                        args.nbits)
            return manifest
    started = time.perf_counter()
    documents = read_documents(args.tokens_dir)
    read_seconds = time.perf_counter() - started
    logger.info("read %d passages, %d tokens (%s) in %.1f s", len(documents), tokens, documents[0].dtype,
                read_seconds)
    kmeans_seconds = []
    compute_kmeans = fast_plaid_module.compute_kmeans

    @functools.wraps(compute_kmeans)
    def timed_kmeans(*positional, **keywords):  # looked up at call time by `FastPlaid.create`
        kmeans_started = time.perf_counter()
        centroids = compute_kmeans(*positional, **keywords, num_partitions=args.centroids)
        kmeans_seconds.append(time.perf_counter() - kmeans_started)
        return centroids

    fast_plaid_module.compute_kmeans = timed_kmeans
    manifest_path.unlink(missing_ok=True)
    started = time.perf_counter()
    with torch.inference_mode():
        # start_from_scratch=0: below that many documents, create also keeps a raw copy of every embedding (for a
        # later `update` to rebuild from); the index proper is the same.
        search.FastPlaid(index=str(args.index), device="cpu").create(
            documents_embeddings=documents, nbits=args.nbits, start_from_scratch=0)
    build_seconds = time.perf_counter() - started
    files = index_files(args.index)
    centroids = np.load(args.index / "centroids.npy", mmap_mode="r").shape[0]
    manifest = {**wanted, "build_seconds": round(build_seconds, 2),
                "kmeans_seconds": round(sum(kmeans_seconds), 2), "read_seconds": round(read_seconds, 2),
                "threads": args.threads, "centroids": int(centroids), "index_bytes": sum(files.values()),
                "bytes_per_token": round(sum(files.values()) / tokens, 2),
                "files_bytes_per_token": {name: round(size / tokens, 3) for name, size in files.items()},
                "build_peak_rss_bytes": peak_rss(), "fast_plaid_version": metadata.version("fast-plaid"),
                "torch_version": torch.__version__}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    logger.info("built %s: %s", args.index, {key: manifest[key] for key in (
        "build_seconds", "kmeans_seconds", "centroids", "bytes_per_token", "build_peak_rss_bytes")})
    return manifest


def search_queries(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from fast_plaid import search

    queries = torch.from_numpy(np.load(args.queries))
    options = {"top_k": args.k, "n_ivf_probe": args.n_ivf_probe, "n_full_scores": args.n_full_scores,
               "n_processes": args.n_processes, "show_progress": False}
    started = time.perf_counter()
    index = search.FastPlaid(index=str(args.index), device="cpu")
    load_seconds = time.perf_counter() - started
    index.search(queries_embeddings=queries[:2], **options)
    load_average, cpu_started, started = os.getloadavg()[0], time.process_time(), time.perf_counter()
    results = index.search(queries_embeddings=queries, **options)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    # With 2 threads on 2 cores, another busy process slows this search many times over (its OpenMP threads wait
    # for each other): the load average and CPU time beside the wall time tell such a run apart.
    out = {"ms_per_query": round(1000 * seconds / len(queries), 3),
           "cpu_ms_per_query": round(1000 * cpu_seconds / len(queries), 3), "queries": len(queries),
           "load_average_1m_at_start": load_average,
           "load_seconds": round(load_seconds, 3), "peak_rss_bytes": peak_rss(), "threads": args.threads,
           **{key: value for key, value in options.items() if key != "show_progress"},
           "ids": [[passage for passage, _ in result] for result in results]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out) + "\n")
    logger.info("searched %d queries: %.2f ms a query, peak RSS %.0f MB -> %s", len(queries), out["ms_per_query"],
                out["peak_rss_bytes"] / 1e6, args.out)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    building = commands.add_parser("build", help="build (or keep) fast-plaid's index of the passages' tokens")
    building.add_argument("--tokens-dir", type=Path, required=True, help="folder of chunk-*.npz (counts, tokens)")
    building.add_argument("--index", type=Path, required=True)
    building.add_argument("--nbits", type=int, default=2)
    building.add_argument("--centroids", type=int, help="centroids (default: fast-plaid's rule)")
    searching = commands.add_parser("search", help="search the queries (CPU), timed after a warm-up on 2")
    searching.add_argument("--index", type=Path, required=True)
    searching.add_argument("--queries", type=Path, required=True, help=".npy of [queries, query tokens, dim]")
    searching.add_argument("--k", type=int, default=100)
    searching.add_argument("--n-ivf-probe", type=int, default=8)
    searching.add_argument("--n-full-scores", type=int, default=4096)
    searching.add_argument("--n-processes", type=int, default=1,
                           help="fast-plaid's joblib threads over the queries, each using --threads (1: one call)")
    searching.add_argument("--out", type=Path, required=True)
    for command in (building, searching):
        command.add_argument("--threads", type=int, default=os.cpu_count())
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    limit_threads(args.threads)
    (build if args.command == "build" else search_queries)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
