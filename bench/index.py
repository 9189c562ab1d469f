"""Benchmark of td-ray's dense index machinery against bare FAISS, on clustered vectors with real structure.

Vectors come from a mixture of Gaussian clusters (topics) of uneven sizes, with unit norm (as a cosine student
writes them), queries from the same clusters. In one run, per size (100 k and 1 M by default):

1. ground truth: bare FAISS, exact inner-product search (IndexFlatIP) of the queries;
2. each index type (IVF-PQ, IVF-SQ8, HNSW, Flat) built by td-ray (`td_ray.index.build_from_table`: training in a Ray
   task, one Ray task per shard, IVF shards merged on disk) and searched by td-ray (`Searcher`, the shipped search
   defaults): recall at 10 and 100 against exact, bytes per vector, and build seconds by shard count;
3. the same index searched by bare `index.search`: td-ray's queries per second over bare FAISS's;
4. peak RSS of the building and of the searching process (each in its own process, so the figures are theirs)
   at 10x the vectors over 1x;
5. a projection for NeuCLIR Chinese under the shipped paper config.

    .venv/bin/python bench/index.py                  # 100 k and 1 M vectors at dim 128: about 16 minutes
    .venv/bin/python bench/index.py --help
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import RESULTS, ROOT, ProcessTree, contention, machine_info, meets, search_against_bare, write_report

logger = logging.getLogger("bench.index")

GOALS = {"recall_at_10_vs_flat": (">=", 0.95), "sharded_vs_single": (">=", 1.0),
         "driver_peak_rss_ratio_10x": ("<=", 1.2), "search_qps_vs_bare": (">=", 0.9)}
FACTORIES = {"ivf_pq": "IVF{nlist},PQ{m}", "ivf_sq8": "IVF{nlist},SQ8", "hnsw": "HNSW32", "flat": "Flat"}
NEUCLIR_ZH = {"documents": 3_179_209, "passages_per_document": 4.7, "dim": 1024, "config": "configs/msmarco-zh.yaml"}
"""NeuCLIR 2022 Chinese, its passages at 180/90 XLM-R tokens (about 15 M: RECIPE.md; 4.7 a document), the
xlm-roberta-large student's dimension, and the shipped config whose index it projects."""


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around `clusters` random centres of Zipf-like sizes, with noise of a third of the spread."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.8
    which = rng.choice(clusters, size=n, p=weights / weights.sum())
    vectors = centres[which] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_table(vectors: np.ndarray, path: Path, shards: int, rows_per_group: int = 16_384) -> None:
    """The index stage's vector table: one row group per batch, one shard per row group."""
    from td_ray import schemas

    with pq.ParquetWriter(path, schemas.EMBEDDINGS) as writer:
        for group, start in enumerate(range(0, len(vectors), rows_per_group)):
            part = vectors[start:start + rows_per_group]
            ids = np.arange(start, start + len(part))
            writer.write_table(pa.table({
                "docid": pa.array(ids.astype(str)), "passage": pa.array(np.zeros(len(part), np.int32)),
                "faiss_id": ids, "shard": pa.array(np.full(len(part), group % shards, np.int32)),
                "vector": pa.LargeListArray.from_arrays(np.arange(0, part.size + 1, part.shape[1]), part.reshape(-1)),
            }, schema=schemas.EMBEDDINGS))


def factory_for(kind: str, n: int, dim: int) -> str:
    nlist = int(4 * np.sqrt(n) // 64 * 64) or 64  # FAISS's rule of thumb, 4 sqrt(n) lists
    return FACTORIES[kind].format(nlist=nlist, m=dim // 4)


# ------------------------------------------------------------------------------------------------ workers
def build_worker(spec: dict) -> dict:
    """Process body: build one index with td-ray from the vector table; returns its figures."""
    import ray

    from td_ray.index import build_from_table
    from td_ray.retrieval.faiss_index import plan_index
    from td_ray.workspace import Workspace

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    try:
        build = Path(spec["build"])
        plan = plan_index(spec["factory"], spec["dim"])
        started = time.perf_counter()
        files, _, trained_on = build_from_table(Workspace(str(build.parent)).mirror(build.name), plan, spec["n"],
                                                spec["shards"], spec["train_sample"], "cpu")
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    extra = ["index.ivfdata"] if plan.merges_on_disk else []
    size = sum((build / name).stat().st_size for name in files + extra)
    return {"seconds": seconds, "files": files, "bytes": size, "trained_on": trained_on}


def search_worker(spec: dict) -> dict:
    """Process body: search the queries with td-ray's Searcher and with bare `index.search` on the same index."""
    from td_ray.retrieval.faiss_index import default_search_params, plan_index

    params = default_search_params(plan_index(spec["factory"], spec["dim"]))
    searched = search_against_bare(Path(spec["build"]), spec["files"], params, spec["dim"], np.load(spec["queries"]),
                                   100)
    np.save(spec["out_ids"], searched.pop("ids"))
    return searched | {"params": params}


def run_worker(kind: str, spec: dict, work: Path) -> tuple[dict, ProcessTree]:
    """Run a worker body in a fresh process, sampling its memory."""
    spec_path = work / f"{kind}-{spec['name']}.json"
    out = spec_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps(spec))
    process = subprocess.Popen([sys.executable, __file__, "--worker", kind, str(spec_path), str(out)], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    tree = ProcessTree(process.pid, interval=0.2)
    tree.start()
    code = process.wait()
    tree.stop()
    if code:
        raise RuntimeError(f"{kind} worker failed for {spec['name']} (exit {code})")
    return json.loads(out.read_text()), tree


# ------------------------------------------------------------------------------------------------ main
def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(row[:k]) & set(exact[:k])) / k for row, exact in zip(found, truth)]))


def measure_size(n: int, args: argparse.Namespace, work: Path) -> dict:
    import faiss

    vectors = clustered(n, args.dim, args.clusters, seed=0)
    rng = np.random.default_rng(1)  # queries: near stored vectors, so from the same clusters
    queries = vectors[rng.choice(n, size=args.queries, replace=False)] + 0.2 * rng.standard_normal(
        (args.queries, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    np.save(work / "queries.npy", queries)
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(vectors)
    started = time.perf_counter()
    _, truth = exact.search(queries, 100)
    flat_bare_seconds = time.perf_counter() - started
    figures: dict = {"n": n, "dim": args.dim, "bare_flat_search_seconds": flat_bare_seconds, "types": {}}
    for kind in args.types:
        factory = factory_for(kind, n, args.dim)
        shard_counts = args.shard_counts if kind == "ivf_pq" else [2]
        entry: dict = {"factory": factory, "build_seconds": {}}
        for shards in shard_counts:
            build = work / f"{kind}-{n}-{shards}"
            shutil.rmtree(build, ignore_errors=True)
            build.mkdir(parents=True)
            write_table(vectors, build / "embeddings.parquet", shards)
            spec = {"name": f"{kind}-{n}-{shards}", "build": str(build), "factory": factory, "dim": args.dim, "n": n,
                    "shards": shards, "train_sample": args.train_sample}
            built, tree = run_worker("build", spec, work)
            entry["build_seconds"][shards] = round(built["seconds"], 2)
            entry["build_driver_peak_rss_mb"] = round(tree.root_peak_rss / 2**20, 1)
            entry["build_worker_peak_rss_mb"] = round(tree.largest_child_rss / 2**20, 1)
            entry["bytes_per_vector"] = round(built["bytes"] / n, 2)
            if shards != shard_counts[-1]:
                shutil.rmtree(build)
        (build / "embeddings.parquet").unlink()
        searched, tree = run_worker("search", spec | {"files": built["files"], "queries": str(work / "queries.npy"),
                                                      "out_ids": str(work / "ids.npy")}, work)
        ids = np.load(work / "ids.npy")
        entry |= {"recall_at_10_vs_flat": round(recall(ids, truth, 10), 4),
                  "recall_at_100_vs_flat": round(recall(ids, truth, 100), 4),
                  "search_params": searched["params"], "search_qps": round(args.queries / searched["seconds"], 1),
                  "search_peak_rss_mb": round(tree.root_peak_rss / 2**20, 1)}
        if searched["bare_seconds"]:
            entry["search_qps_vs_bare"] = round(searched["bare_seconds"] / searched["seconds"], 3)
        if len(shard_counts) > 1:
            single = entry["build_seconds"][shard_counts[0]]
            entry["sharded_vs_single"] = {str(count): round(single / seconds, 3)
                                          for count, seconds in entry["build_seconds"].items()}
        shutil.rmtree(build)
        logger.info("n=%d %s: %s", n, factory, {key: value for key, value in entry.items() if key != "factory"})
        figures["types"][kind] = entry
    return figures


def projection(report: dict) -> dict:
    """NeuCLIR Chinese under the paper config's index: passages, bytes, and build hours at the measured rate."""
    from td_ray.retrieval.faiss_index import plan_index

    import yaml

    passages = int(NEUCLIR_ZH["documents"] * NEUCLIR_ZH["passages_per_document"])
    shipped = yaml.safe_load((ROOT / NEUCLIR_ZH["config"]).read_text())
    plan = plan_index(shipped["index"]["factory"], NEUCLIR_ZH["dim"])
    code = faiss_code_bytes(plan) + 8  # each vector's code and its 8-byte id in its inverted list
    largest = max(report["sizes"].values(), key=lambda size: size["n"])
    pq_build = largest["types"].get("ivf_pq", {}).get("build_seconds", {})
    rate = largest["n"] / min(pq_build.values()) if pq_build else None  # vectors a second on this machine, dim 128
    dim_factor = NEUCLIR_ZH["dim"] / largest["dim"]
    return {"config": NEUCLIR_ZH["config"], "passages": passages, "factory": plan.factory, "nlist": plan.nlist, "index_bytes": passages * code,
            "flat_bytes": passages * NEUCLIR_ZH["dim"] * 4,
            "build_hours_on_this_machine": round(passages / rate * dim_factor / 3600, 2) if rate else None,
            "note": "building cost is projected linearly in vectors and dimension from the measured IVF-PQ build; the "
            "encoding of 15 M passages by xlm-roberta-large (GPU hours) is not included"}


def faiss_code_bytes(plan) -> int:
    """Bytes of one vector's code in the plan's inverted lists (its IVF's `code_size`)."""
    import faiss

    from td_ray.retrieval.faiss_index import empty_index

    return faiss.extract_index_ivf(empty_index(plan)).code_size


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--train-sample", type=int, default=131_072)
    parser.add_argument("--types", default=",".join(FACTORIES))
    parser.add_argument("--shard-counts", default="1,2,4")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "td-ray-index-bench")
    parser.add_argument("--out", type=Path, default=RESULTS / "index.json")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    if args.worker:
        kind, spec, out = args.worker
        body = build_worker if kind == "build" else search_worker
        Path(out).write_text(json.dumps(body(json.loads(Path(spec).read_text()))))
        return 0
    args.types = args.types.split(",")
    args.shard_counts = [int(count) for count in args.shard_counts.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(), "goals": GOALS, "settings": {key: str(value) for key, value in
                                                                      vars(args).items() if key != "worker"},
              "sizes": {}}
    for n in (int(size) for size in args.sizes.split(",")):
        report["sizes"][str(n)] = measure_size(n, args, args.work)
        write_report(report, args.out)
    sizes = sorted(report["sizes"].values(), key=lambda size: size["n"])
    small, large = sizes[0], sizes[-1]
    summary = {}
    for kind in args.types:
        big, little = large["types"].get(kind, {}), small["types"].get(kind, {})
        summary[kind] = {name: big.get(name) for name in ("factory", "recall_at_10_vs_flat", "recall_at_100_vs_flat",
                                                          "bytes_per_vector", "search_qps_vs_bare",
                                                          "sharded_vs_single", "build_seconds")}
        if large is not small:
            summary[kind]["driver_peak_rss_ratio_10x"] = {
                "index": round(big["build_driver_peak_rss_mb"] / little["build_driver_peak_rss_mb"], 3),
                "evaluate": round(big["search_peak_rss_mb"] / little["search_peak_rss_mb"], 3)}
    report["summary"] = summary
    report["neuclir_zh_projection"] = projection(report)
    report["machine"]["contention_at_end"] = contention()
    write_report(report, args.out)
    for kind, entry in summary.items():
        recall_10 = entry["recall_at_10_vs_flat"]
        print(f"{kind:8} {entry['factory']:22} recall@10 {recall_10} {meets(GOALS, 'recall_at_10_vs_flat', recall_10):3} "
              f"bytes/vector {entry['bytes_per_vector']} qps vs bare {entry['search_qps_vs_bare']} "
              f"rss 10x {entry.get('driver_peak_rss_ratio_10x')}")
    print(json.dumps(report["neuclir_zh_projection"], indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
