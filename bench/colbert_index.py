"""Benchmark of td-ray's compressed ColBERT-X token index (`td_ray.retrieval.plaid`) against exact MaxSim and against
fast-plaid, the peer, in the same run.

1. Synthetic token sets at dim 128 with real structure: passages of 30 to 120 tokens, each drawn around three
   of 2,000 topic directions of Zipf-like popularity, generated chunk by chunk from a seed. At 1x (about 1 M
   tokens, 4,096 centroids: `--centroids`), for 1, 2, 4 and 8 bits: bytes a token, and ms a query and passages'
   overlap at 10 with exact MaxSim over the original vectors, at PLAID's defaults for 100 passages and wider.
2. Head to head with fast-plaid 1.7 (its own venv under the bench cache, `common.fast_plaid_python`) on the same
   10 M tokens (`--h2h-tokens`, the 10x set), threads (`--threads`) and centroids (`--h2h-centroids`, both): build
   seconds, bytes a token, ms a query and overlap@10 with exact MaxSim at PLAID's defaults (2 cells, 1,024) and at
   fast-plaid's (8 probes, 4,096 full scores). fast-plaid's index is built once and kept in the cache. td-ray's
   build is the index stage's (uniform sample of 40 tokens a centroid, codec and compression in torch, Ray shard
   tasks, lists merged on disk); then the lists' seconds by shard count, the peak RSS of a search process at 10x
   over 1x, and the seconds to append 10 % more passages over the build's.
3. The demo collection through the real index and evaluate stages, with two ColBERT students of dim 128 (the tiny
   one untrained, and a lexical one that ranks by content), at 2 and 8 bits, against exact MaxSim (MaxP).
4. `paper_projection`: per paper collection, tokens, bytes, the codec task's memory, and the build hours and ms a
   query on 8 H100s, projected from the work of each step (marked so: no GPU ran them).

    .venv/bin/python bench/colbert_index.py        # about 45 minutes on 2 cores, 25 of them fast-plaid's first build
    .venv/bin/python bench/colbert_index.py --help
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

from common import (
    RESULTS,
    ROOT,
    ProcessTree,
    bench_cache,
    contention,
    fast_plaid_python,
    machine_info,
    meets,
    write_report,
)

logger = logging.getLogger("bench.colbert_index")

GOALS = {"bytes_per_token_2": ("<=", 36), "bytes_per_token_1": ("<=", 20), "overlap_at_10_vs_exact": (">=", 0.9),
         "ndcg_at_20_delta_vs_exact": ("<=", 0.01), "evaluate_peak_rss_ratio_10x": ("<=", 1.3),
         "search_ms_vs_fast_plaid": ("<=", 1.0), "build_seconds_vs_fast_plaid": ("<=", 1.0),
         "append_10_percent_vs_build": ("<=", 0.15)}
NEUCLIR_ZH = {"documents": 3_179_209, "passages_per_document": 4.7, "tokens_per_passage": 180, "dim": 128,
              "nbits": 2}
"""NeuCLIR 2022 Chinese at 180/90 passages (about 15 M: RECIPE.md; 4.7 a document) of about 180 document tokens
each (the window and its markers, punctuation kept): about 2.7 G token vectors at ColBERT-X's dim 128."""
CHUNK_PASSAGES = 8192
SEARCH_SETTINGS = {"plaid_defaults": {}, "wide": {"ncells": 8, "centroid_score_threshold": -1, "ndocs": 4096}}
"""PLAID's defaults for 100 passages (2 cells, threshold 0.45, 1,024 decoded), and a wider search."""


# ------------------------------------------------------------------------------------------------ synthetic
def topic_centres(topics: int, dim: int) -> np.ndarray:
    return np.random.default_rng(12345).standard_normal((topics, dim)).astype(np.float32)


def passage_chunk(seed: int, chunk: int, passages: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token counts and unit token vectors of `passages` passages: each passage's tokens lie around three topics
    (Zipf-like popularity) with noise; chunk `chunk` of a set is the same in every call."""
    rng = np.random.default_rng([seed, chunk])
    counts = rng.integers(30, 121, size=passages)
    weights = 1.0 / np.arange(1, len(centres) + 1) ** 0.8
    topics = rng.choice(len(centres), size=(passages, 3), p=weights / weights.sum())
    which = topics[np.repeat(np.arange(passages), counts), rng.integers(0, 3, counts.sum())]
    tokens = centres[which] + 0.6 * rng.standard_normal((counts.sum(), centres.shape[1])).astype(np.float32)
    return counts, tokens / np.linalg.norm(tokens, axis=1, keepdims=True)


def chunks_for(tokens: int) -> int:
    """Chunks holding at least `tokens` tokens (75 a passage on average)."""
    return max(1, -(-tokens // (75 * CHUNK_PASSAGES)))


def write_codes(table: Path, codec, chunks, numbering=None):
    """Compress each (counts, tokens) of `chunks` into the stage's codes table at `table` (one row group a chunk,
    numbered as the stage numbers its batches, from `numbering`'s next passage and token); returns the numbering."""
    from td_ray import schemas
    from td_ray.index.core import TokenNumbering
    from td_ray.retrieval import plaid

    numbering = numbering or TokenNumbering()
    with pq.ParquetWriter(table, schemas.TOKEN_CODES) as writer:
        for counts, tokens in chunks:
            ids, residuals = codec.encode(tokens)
            batch = pa.table({"docid": pa.array((numbering.next_id + np.arange(len(counts))).astype(str)),
                              "passage": pa.array(np.zeros(len(counts), np.int32)),
                              "tokens": counts.astype(np.int32), "centroid_ids": plaid.per_passage_bytes(ids, counts),
                              "residuals": plaid.per_passage_bytes(residuals, counts)})
            for part in numbering(batch):
                writer.write_table(part)
    return numbering


def read_chunks(paths: list[Path]):
    """(counts, tokens) of each saved chunk, one at a time."""
    for path in paths:
        with np.load(path) as chunk:
            yield chunk["counts"], chunk["tokens"]


def prepare_synthetic(build: Path, seed: int, chunks: int, centres: np.ndarray, nbits: int, train_sample: int,
                      centroids: int) -> dict:
    """The stage's first steps: the codec trained on a sample, every chunk compressed into the codes table.
    Returns the figures."""
    from td_ray.retrieval import plaid

    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    started = time.perf_counter()
    sample = []
    for chunk in range(chunks):
        sample.append(passage_chunk(seed, chunk, CHUNK_PASSAGES, centres)[1])
        if sum(len(part) for part in sample) >= train_sample:
            break
    sample = np.concatenate(sample)[:train_sample]
    codec = plaid.ResidualCodec.train(sample, centroids, nbits)
    codec.save(build)
    trained = time.perf_counter() - started
    numbering = write_codes(build / "codes.parquet", codec,
                            (passage_chunk(seed, chunk, CHUNK_PASSAGES, centres) for chunk in range(chunks)))
    passages, tokens = numbering.next_id, numbering.next_token
    return {"passages": passages, "tokens": tokens, "centroids": codec.nlist, "nbits": nbits,
            "code_bytes": codec.code_bytes, "id_dtype": codec.id_dtype.str,
            "train_seconds": round(trained, 2), "compress_seconds": round(time.perf_counter() - started - trained, 2),
            "bytes_per_token": codec.bytes_per_token, "error_bound": round(codec.error_bound(), 5)}


def build_synthetic(build: Path, prepared: dict, shards: int) -> dict:
    """td-ray's build from the codes table (`td_ray.index.build_token_index`: Ray shard tasks, lists merged on
    disk); returns the build's figures and the index metadata search needs."""
    from td_ray.index import build_token_index
    from td_ray.retrieval import plaid

    started = time.perf_counter()
    layout = plaid.Layout(prepared["passages"], prepared["tokens"], prepared["code_bytes"], prepared["id_dtype"],
                          prepared["centroids"])
    _, entries = build_token_index(build, layout, shards)
    seconds = time.perf_counter() - started
    size = sum((build / name).stat().st_size for name in plaid.FILES)
    meta = {"passages": prepared["passages"], "tokens": prepared["tokens"], "dim": 128,
            "centroids": prepared["centroids"], "query_maxlen": 32}
    return {"shards": shards, "build_seconds": round(seconds, 2),
            "index_bytes_per_token": round(size / prepared["tokens"], 2),
            "ivf_entries_per_token": round(entries / prepared["tokens"], 3)}, meta


def make_queries(seed: int, centres: np.ndarray, count: int) -> np.ndarray:
    """Queries of 32 tokens, each near tokens of one stored passage (from the first chunk)."""
    counts, tokens = passage_chunk(seed, 0, CHUNK_PASSAGES, centres)
    rng = np.random.default_rng(7)
    starts = np.concatenate([[0], np.cumsum(counts)])
    chosen = rng.choice(len(counts), size=count, replace=False)
    picked = np.stack([tokens[starts[p] + rng.integers(0, counts[p], 32)] for p in chosen])
    picked = picked + 0.3 * rng.standard_normal(picked.shape).astype(np.float32)
    return (picked / np.linalg.norm(picked, axis=2, keepdims=True)).astype(np.float32)


def exact_top(seed: int, chunks: int, centres: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact MaxSim of every passage (chunk by chunk): the top k passage numbers per query, and ms per query."""
    from td_ray.retrieval.maxsim import exhaustive_search

    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    seconds, first = 0.0, 0
    for chunk in range(chunks):
        counts, tokens = passage_chunk(seed, chunk, CHUNK_PASSAGES, centres)
        started = time.perf_counter()
        scores, ids = exhaustive_search(tokens, np.concatenate([[0], np.cumsum(counts)]), queries, k)
        all_scores, all_ids = np.concatenate([best_scores, scores], 1), np.concatenate([best_ids, ids + first], 1)
        order = np.lexsort((all_ids, -all_scores), axis=1)[:, :k]
        best_scores, best_ids = np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_ids, order, 1)
        seconds += time.perf_counter() - started
        first += len(counts)
    return best_ids, 1000 * seconds / len(queries)


def search_worker(spec: dict) -> dict:
    """Process body: search the queries in a built index, with PLAID's defaults for `k` passages, or wider."""
    from td_ray.retrieval import plaid

    import torch

    torch.set_num_threads(spec.get("threads") or os.cpu_count())
    queries = np.load(spec["queries"])
    settings = plaid.SearchSettings.for_depth(spec["k"], **spec.get("settings", {}))
    index = plaid.TokenIndex(Path(spec["build"]), spec["meta"], settings)
    index.search(queries[:2], spec["k"])
    started = time.perf_counter()
    index.work.clear()
    _, ids = index.search(queries, spec["k"])
    np.save(spec["out_ids"], ids)
    return {"ms_per_query": 1000 * (time.perf_counter() - started) / len(queries),
            "work_per_query": {name: count / len(queries) for name, count in index.work.items()}}


def run_search(spec: dict, work: Path) -> tuple[dict, ProcessTree]:
    spec_path = work / f"search-{spec['name']}.json"
    out = spec_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps(spec))
    process = subprocess.Popen([sys.executable, __file__, "--worker", str(spec_path), str(out)], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    tree = ProcessTree(process.pid, interval=0.05)
    tree.start()
    code = process.wait()
    tree.stop()
    if code:
        raise RuntimeError(f"search worker failed for {spec['name']} (exit {code})")
    return json.loads(out.read_text()), tree


def overlap(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(found.tolist(), truth.tolist())]))


def synthetic(args: argparse.Namespace, work: Path) -> dict:
    centres = topic_centres(2000, 128)
    small = chunks_for(args.tokens)
    queries = make_queries(0, centres, args.queries)
    np.save(work / "queries.npy", queries)
    truth, exact_ms = exact_top(0, small, centres, queries, 100)
    out: dict = {"nbits": {}, "exact_ms_per_query": round(exact_ms, 1)}
    metas = {}
    for nbits in (1, 2, 4, 8):
        build = work / f"1x-{nbits}"
        built = prepare_synthetic(build, 0, small, centres, nbits, args.train_sample, args.centroids)
        figures, metas[build.name] = build_synthetic(build, built, 2)
        built |= figures
        for name, settings in SEARCH_SETTINGS.items():
            searched, _ = run_search({"name": build.name, "build": str(build), "meta": metas[build.name],
                                      "queries": str(work / "queries.npy"), "out_ids": str(work / "ids.npy"),
                                      "k": 100, "settings": settings}, work)
            built[name] = {"overlap_at_10_vs_exact": round(overlap(np.load(work / "ids.npy"), truth), 4),
                           "search_ms_per_query": round(searched["ms_per_query"], 1), "settings": settings}
        logger.info("1x %d bits: %s", nbits, built)
        out["nbits"][str(nbits)] = built
        if nbits != 2:
            shutil.rmtree(build)
    out["meta_1x_2"] = metas["1x-2"]
    return out


# ------------------------------------------------------------------------------------------------ head to head
def write_token_chunks(directory: Path, seed: int, chunks: int, centres: np.ndarray) -> Path:
    """The synthetic passages as ``chunk-*.npz`` (counts, float32 tokens): the token embeddings both engines index,
    kept under the bench cache between runs (they are deterministic)."""
    directory.mkdir(parents=True, exist_ok=True)
    for chunk in range(chunks):
        path = directory / f"chunk-{chunk:05d}.npz"
        if not path.exists():
            counts, tokens = passage_chunk(seed, chunk, CHUNK_PASSAGES, centres)
            temporary = path.with_name(f".{path.stem}.tmp.npz")
            np.savez(temporary, counts=counts, tokens=tokens)
            os.replace(temporary, path)
    return directory


def fast_plaid(command: str, *arguments: str) -> None:
    subprocess.run([str(fast_plaid_python()), str(ROOT / "bench" / "fast_plaid_arm.py"), command, *arguments],
                   check=True)


def td_ray_build(build: Path, tokens_dir: Path, centroids: int, nbits: int, train_sample: int, threads: int,
                 shards: int) -> tuple[dict, dict]:
    """td-ray's build of the token chunks, as the index stage makes it: a uniform sample of the sampled documents'
    tokens (PLAID's document share, at most `train_sample` tokens) trains the codec, every chunk is compressed into
    the codes table, Ray shard tasks fill the arrays and a task merges the lists. Returns figures and metadata."""
    import torch

    from td_ray.index import build_token_index
    from td_ray.index.core import TokenReservoir, sample_fraction
    from td_ray.retrieval import plaid

    torch.set_num_threads(threads)
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    paths = sorted(tokens_dir.glob("chunk-*.npz"))
    started = time.perf_counter()
    reservoir, rng = TokenReservoir(train_sample), np.random.default_rng(0)
    for counts, tokens in read_chunks(paths):
        chosen = rng.random(len(counts)) < sample_fraction(len(counts) * len(paths))
        starts = np.concatenate([[0], np.cumsum(counts)])
        reservoir.add(np.concatenate([tokens[starts[p]:starts[p + 1]] for p in np.flatnonzero(chosen)]))
    codec = plaid.ResidualCodec.train(reservoir.sample, centroids, nbits, in_place=True)
    codec.save(build)
    trained = time.perf_counter() - started
    numbering = write_codes(build / "codes.parquet", codec, read_chunks(paths))
    compressed = time.perf_counter() - started - trained
    layout = plaid.Layout(numbering.next_id, numbering.next_token, codec.code_bytes, codec.id_dtype.str, codec.nlist)
    _, entries = build_token_index(build, layout, shards, task_cpus=threads)
    seconds = time.perf_counter() - started
    size = sum((build / name).stat().st_size for name in plaid.FILES)
    meta = {"passages": layout.passages, "tokens": layout.tokens, "dim": codec.dim, "centroids": codec.nlist,
            "query_maxlen": 32, "ivf_entries": entries}
    figures = {"build_seconds": round(seconds, 2), "codec_seconds": round(trained, 2),
               "compress_seconds": round(compressed, 2), "sample_tokens": len(reservoir.sample),
               "bytes_per_token": round(size / layout.tokens, 2), "codes_bytes_per_token": codec.bytes_per_token,
               "flops_per_second_compress": round(2 * layout.tokens * codec.nlist * codec.dim / compressed, 1)}
    return figures, meta | {"layout": layout}


def td_ray_append(build: Path, meta: dict, tokens_dir: Path, share: float, threads: int,
                  shards: int) -> tuple[float, int]:
    """Seconds (and tokens) to append `share` of the collection again (the last chunks' passages, as new passages)
    to the built index with its codec, as the index stage appends: compress, grow the arrays, fill, and merge after
    the built lists."""
    import torch

    from td_ray.index import build_token_index
    from td_ray.index.core import TokenNumbering
    from td_ray.retrieval import plaid

    torch.set_num_threads(threads)
    paths = sorted(tokens_dir.glob("chunk-*.npz"))
    paths = paths[-max(1, round(share * len(paths))):]
    codec = plaid.ResidualCodec.load(build)
    previous = plaid.Layout(meta["passages"], meta["tokens"], codec.code_bytes, codec.id_dtype.str, codec.nlist)
    started = time.perf_counter()
    numbering = write_codes(build / "append.parquet", codec, read_chunks(paths),
                            TokenNumbering(previous.passages, previous.tokens))
    layout = plaid.Layout(numbering.next_id, numbering.next_token, codec.code_bytes, codec.id_dtype.str, codec.nlist)
    build_token_index(build, layout, shards, task_cpus=threads, previous=previous, table="append.parquet")
    return time.perf_counter() - started, layout.tokens - previous.tokens


def td_ray_search(build: Path, meta: dict, queries: Path, k: int, settings: dict, threads: int, work: Path,
                  name: str) -> tuple[dict, np.ndarray]:
    searched, _ = run_search({"name": name, "build": str(build), "meta": meta, "queries": str(queries),
                              "out_ids": str(work / f"{name}.npy"), "k": k, "settings": settings,
                              "threads": threads}, work)
    return searched, np.load(work / f"{name}.npy")


def head_to_head(args: argparse.Namespace, work: Path, synthetic_meta: dict) -> dict:
    """td-ray against fast-plaid on the same token embeddings (at least 10 M), threads and centroid count
    (`--h2h-centroids` for both: fast-plaid's rule would give 2^15 at 10 M tokens, whose build takes hours on 2
    cores): build seconds, bytes a token, and ms a query and overlap@10 with exact MaxSim at PLAID's defaults for 100
    passages and at fast-plaid's (8 probes, 4,096 full scores). fast-plaid's index is built once and kept under the
    bench cache, outside the repository."""
    from td_ray.index import build_token_index

    centres = topic_centres(2000, 128)
    chunks = chunks_for(args.h2h_tokens)
    tokens_dir = write_token_chunks(bench_cache() / f"colbert-tokens-seed0-{chunks}x{CHUNK_PASSAGES}", 0, chunks,
                                    centres)
    fp_index = bench_cache() / f"fast-plaid-index-seed0-{chunks}x{CHUNK_PASSAGES}-{args.nbits}bit-{args.h2h_centroids}"
    fast_plaid("build", "--tokens-dir", str(tokens_dir), "--index", str(fp_index), "--nbits", str(args.nbits),
               "--threads", str(args.threads), "--centroids", str(args.h2h_centroids))
    fp_build = json.loads((fp_index / "td_ray_bench_manifest.json").read_text())
    centroids = fp_build["centroids"]
    queries = make_queries(0, centres, args.queries)
    np.save(work / "h2h-queries.npy", queries)
    truth, exact_ms = exact_top(0, chunks, centres, queries, 100)
    build = work / "h2h-td-ray"
    td_build, meta = td_ray_build(build, tokens_dir, centroids, args.nbits, 40 * centroids, args.threads, 2)
    layout = meta.pop("layout")
    out: dict = {"tokens": meta["tokens"], "passages": meta["passages"], "centroids": centroids, "nbits": args.nbits,
                 "threads": args.threads, "queries": args.queries, "exact_ms_per_query": round(exact_ms, 1),
                 "td_ray": {"build": td_build}, "fast_plaid": {"build": fp_build}}
    knobs = {"plaid_defaults": ({}, {"n_ivf_probe": 2, "n_full_scores": 1024}),
             "fast_plaid_defaults": ({"ncells": 8, "centroid_score_threshold": -1, "ndocs": 4096},
                                     {"n_ivf_probe": 8, "n_full_scores": 4096})}
    unpruned = {"ncells": 2, "centroid_score_threshold": -1, "ndocs": 1024}  # what PLAID's pruning costs
    for name, (ours, theirs) in knobs.items():
        searched, found = td_ray_search(build, meta, work / "h2h-queries.npy", 100, ours, args.threads, work,
                                        f"h2h-{name}")
        out["td_ray"][name] = {"ms_per_query": round(searched["ms_per_query"], 2),
                               "work_per_query": searched["work_per_query"],
                               "overlap_at_10_vs_exact": round(overlap(found, truth), 4), "settings": ours}
        result = work / f"fast-plaid-{name}.json"
        fast_plaid("search", "--index", str(fp_index), "--queries", str(work / "h2h-queries.npy"), "--k", "100",
                   "--threads", str(args.threads), "--n-ivf-probe", str(theirs["n_ivf_probe"]), "--n-full-scores",
                   str(theirs["n_full_scores"]), "--out", str(result))
        theirs_out = json.loads(result.read_text())
        found = np.array([ids[:10] + [-1] * (10 - len(ids[:10])) for ids in theirs_out.pop("ids")])
        out["fast_plaid"][name] = {"ms_per_query": theirs_out["ms_per_query"],
                                   "overlap_at_10_vs_exact": round(overlap(found, truth), 4), "settings": theirs,
                                   "load_average_1m_at_start": theirs_out["load_average_1m_at_start"]}
        logger.info("head to head, %s: td-ray %s, fast-plaid %s", name, out["td_ray"][name], out["fast_plaid"][name])
    searched, found = td_ray_search(build, meta, work / "h2h-queries.npy", 100, unpruned, args.threads, work,
                                    "h2h-unpruned")
    out["td_ray"]["plaid_defaults_without_pruning"] = {
        "ms_per_query": round(searched["ms_per_query"], 2), "work_per_query": searched["work_per_query"],
        "overlap_at_10_vs_exact": round(overlap(found, truth), 4), "settings": unpruned}
    rss = {}
    for name, (directory, index_meta) in {"1x": (work / "1x-2", synthetic_meta), "10x": (build, meta)}.items():
        searched, tree = run_search({"name": f"rss-{name}", "build": str(directory), "meta": index_meta,
                                     "queries": str(work / "h2h-queries.npy"), "out_ids": str(work / "ids.npy"),
                                     "k": 100, "threads": args.threads}, work)
        rss[name] = {"peak_rss_mb": round(tree.root_peak_rss / 2**20, 1),
                     "peak_private_mb": round(tree.root_peak_private / 2**20, 1),
                     "ms_per_query": round(searched["ms_per_query"], 1)}
    out["search_rss"] = rss
    out["evaluate_peak_rss_ratio_10x"] = round(rss["10x"]["peak_rss_mb"] / rss["1x"]["peak_rss_mb"], 3)
    out["evaluate_peak_private_ratio_10x"] = round(rss["10x"]["peak_private_mb"] / rss["1x"]["peak_private_mb"], 3)
    out["lists_seconds_by_shards"] = {}
    for shards in args.shard_counts:  # the same codes table, its arrays filled and lists merged by each count
        started = time.perf_counter()
        build_token_index(build, layout, shards, task_cpus=args.threads)
        out["lists_seconds_by_shards"][str(shards)] = round(time.perf_counter() - started, 2)
    (build / "codes.parquet").unlink()
    append_seconds, appended = td_ray_append(build, meta, tokens_dir, 0.1, args.threads, 2)
    out["td_ray"]["append_10_percent_seconds"] = round(append_seconds, 2)
    out["td_ray"]["appended_share_of_tokens"] = round(appended / meta["tokens"], 4)
    out["append_10_percent_vs_build"] = round(append_seconds / td_build["build_seconds"], 3)
    out["search_ms_vs_fast_plaid"] = {name: round(out["td_ray"][name]["ms_per_query"]
                                                  / out["fast_plaid"][name]["ms_per_query"], 3) for name in knobs}
    out["build_seconds_vs_fast_plaid"] = round(td_build["build_seconds"] / fp_build["build_seconds"], 3)
    out["overlap_at_10_vs_exact"] = {name: {"td_ray": out["td_ray"][name]["overlap_at_10_vs_exact"],
                                            "fast_plaid": out["fast_plaid"][name]["overlap_at_10_vs_exact"]}
                                     for name in knobs}
    out["bytes_per_token"] = {"td_ray": td_build["bytes_per_token"], "fast_plaid": fp_build["bytes_per_token"]}
    shutil.rmtree(build)
    shutil.rmtree(work / "1x-2")
    return out


# ------------------------------------------------------------------------------------------------ demo
def lexical_student(out: Path, tiny: Path) -> Path:
    """A ColBERT student with no transformer layer: each token its word's random embedding, projected."""
    from td_ray.assets.tiny_models import build_lexical_student
    from td_ray.encoders.colbert import ColBERTSpec, load_colbert

    model, tokenizer = load_colbert(build_lexical_student(tiny, out / "words"), ColBERTSpec(dim=128))
    model.save_pretrained(out / "student", tokenizer)
    return out / "student"


def tiny_student(out: Path, tiny: Path) -> Path:
    import torch

    from td_ray.encoders.colbert import ColBERTSpec, load_colbert

    torch.manual_seed(0)
    model, tokenizer = load_colbert(tiny, ColBERTSpec(dim=128))
    model.save_pretrained(out / "student", tokenizer)
    return out / "student"


def demo(work: Path) -> dict:
    """The index and evaluate stages on the demo collection against exact MaxSim, per student and nbits."""
    import ray

    from td_ray import evaluate, index
    from td_ray.encoders.colbert import ColBERTStudentEncoder
    from td_ray.evaluate.core import document_run, evaluate_run
    from td_ray.pipeline import demo_config, prepare_demo_assets
    from td_ray.retrieval.maxp import maxp
    from td_ray.retrieval.maxsim import exhaustive_search
    from td_ray.workspace import EVAL_DOCS, EVAL_QRELS, EVAL_TOPICS, RUN, Workspace

    root = work / "demo"
    shutil.rmtree(root, ignore_errors=True)
    prepare_demo_assets(demo_config(str(root)))
    tiny = root / "tiny-models" / "student"
    students = {"tiny_untrained": tiny_student(root / "tiny", tiny), "lexical": lexical_student(root / "lexical", tiny)}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    out: dict = {}
    try:
        for name, student in students.items():
            for nbits in (2, 8):
                config = demo_config(str(root))
                raw = config.model_dump(mode="json")
                raw["demo_assets"] = False
                raw["index"] |= {"model": str(student), "colbert": {"nbits": nbits}}
                config = type(config).model_validate(raw)
                started = time.perf_counter()
                built = index.run(config)
                index_seconds = time.perf_counter() - started
                result = evaluate.run(config)
                workspace = Workspace(config.workspace)
                docs, topics = workspace.read_table(EVAL_DOCS), workspace.read_table(EVAL_TOPICS)
                encoder = ColBERTStudentEncoder(student, max_length=config.index.max_length)
                encoded = encoder.encode_documents(docs["text"].to_pylist())
                offsets = np.concatenate([[0], np.cumsum([len(vectors) for vectors in encoded])])
                queries = encoder.encode_queries(topics["text"].to_pylist())
                docids = np.asarray(docs["id"].to_pylist(), dtype=object)
                depth = config.evaluate.depth
                exact = maxp(*exhaustive_search(np.concatenate(encoded), offsets, queries, depth),
                             lambda found: docids[found], depth)
                qids = topics["id"].to_pylist()
                exact_metrics, _ = evaluate_run(document_run(qids, exact), workspace.read_table(EVAL_QRELS),
                                                ["nDCG@20"])
                run = workspace.read_table(RUN).to_pylist()
                found = [[row["docid"] for row in run if row["qid"] == qid][:10] for qid in qids]
                shared = np.mean([len(set(a) & {d for d, _ in b[:10]}) / 10 for a, b in zip(found, exact)])
                out[f"{name}_{nbits}bit"] = {
                    "overlap_at_10_vs_exact": round(float(shared), 4),
                    "ndcg_at_20": round(result.metrics["nDCG@20"], 4),
                    "exact_ndcg_at_20": round(exact_metrics["nDCG@20"], 4),
                    "ndcg_at_20_delta_vs_exact": round(exact_metrics["nDCG@20"] - result.metrics["nDCG@20"], 4),
                    "tokens": int(built.metrics["tokens"]), "centroids": int(built.metrics["centroids"]),
                    "bytes_per_token_with_lists": round(built.metrics["bytes_per_token"], 2),
                    "index_stage_seconds": round(index_seconds, 1)}
                logger.info("demo %s %d bits: %s", name, nbits, out[f"{name}_{nbits}bit"])
    finally:
        ray.shutdown()
    return out


H100 = {"bf16_flops": 989e12, "fp32_flops": 67e12, "memory_bytes_per_second": 3.35e12, "utilisation": 0.5}
"""Published H100 SXM peaks (dense bf16 tensor cores, fp32 CUDA cores, HBM3 bandwidth); projections assume half."""
COLLECTIONS = {"zh": 3_179_209, "fa": 2_232_016, "ru": 4_627_543, "mtd": 10_038_768}
"""NeuCLIR 2022 documents per paper config's collection (the MTD configs index the three merged)."""
XLMR_LARGE_FLOPS_PER_TOKEN = 2 * 24 * 12 * 1024**2 + 2 * 24 * 2 * 180 * 1024
"""xlm-roberta-large's forward FLOP a token: its 24 layers' weights (12 d^2 each) and attention over 180 tokens."""


def projection(synthetic_figures: dict, head: dict | None) -> dict:
    """Per paper collection at 2 bits: tokens, index bytes, RAM at search, and the build and search on 8 H100s,
    projected (marked so) from the work each step does: FLOP at half the published peak for the matmuls (the student
    in bf16, k-means and compression in fp32), and for the lists and search the rates measured here at 10 M tokens
    (bytes a second, per CPU thread)."""
    from td_ray.retrieval.plaid import codec_task_bytes, default_centroids

    entries = synthetic_figures["nbits"]["2"]["ivf_entries_per_token"]
    out = {}
    for name, documents in COLLECTIONS.items():
        passages = int(documents * NEUCLIR_ZH["passages_per_document"])
        tokens = passages * NEUCLIR_ZH["tokens_per_passage"]
        centroids = default_centroids(tokens)
        sample = 40 * centroids
        codes = NEUCLIR_ZH["dim"] * NEUCLIR_ZH["nbits"] // 8 + (2 if centroids <= 2**16 else 4)
        index_bytes = tokens * (codes + 2 * 4 * entries) + 16 * passages
        fp32, bf16 = (H100["utilisation"] * H100[key] for key in ("fp32_flops", "bf16_flops"))
        encode = XLMR_LARGE_FLOPS_PER_TOKEN * (tokens + sample) / (8 * bf16)
        kmeans = 2 * 5 * sample * centroids * NEUCLIR_ZH["dim"] / fp32  # one GPU: 4 iterations and the residuals
        compress = 2 * tokens * centroids * NEUCLIR_ZH["dim"] / (8 * fp32)
        figures = {"passages": passages, "tokens": tokens, "centroids": centroids, "bytes_per_token": codes,
                   "index_bytes": int(index_bytes), "codec_task_bytes": codec_task_bytes(sample, 128, centroids),
                   "projected_build_hours_8_h100": {"encode": round(encode / 3600, 2),
                                                    "kmeans": round(kmeans / 3600, 2),
                                                    "compress": round(compress / 3600, 2)}}
        if head is not None:  # the lists: the shard fill and merge run at the rate measured here, 8 tasks of 8 CPUs
            measured = head["td_ray"]["build"]
            rate = head["tokens"] / max(measured["build_seconds"] - measured["codec_seconds"]
                                        - measured["compress_seconds"], 1e-9) / head["threads"]
            figures["projected_build_hours_8_h100"]["lists"] = round(tokens / (rate * 64) / 3600, 2)
            figures["projected_search_ms_a_query"] = search_projection(head, tokens, centroids)
        figures["projected_build_hours_8_h100"]["total"] = round(sum(
            figures["projected_build_hours_8_h100"].values()), 2)
        out[name] = figures
    return {"collections": out, "h100": H100, "note": "projected, not measured: no GPU ran these figures. Build: "
            "the student, k-means and compression at half the published H100 peak, the lists at this machine's "
            "measured rate. Search: one task at this machine's measured cost a cell and a decoded token (2 threads; "
            "its gathers run on the host, so a GPU shortens only its matmuls); 8 tasks search 8 queries at a time"}


def search_projection(head: dict, tokens: int, centroids: int) -> float:
    """ms a query for a paper collection at PLAID's defaults for 2,500 passages (the paper configs' passage_depth: 4
    cells, 10,000 kept, 2,500 decoded), on one search task as this machine runs it: a cost a centroid cell scored
    and a cost a token decoded, fitted to the two searches measured at 10 M tokens; the cells grow with the passages a
    centroid lists (tokens / centroids) and the cells probed."""
    runs = [head["td_ray"][name] for name in ("plaid_defaults", "fast_plaid_defaults")]
    work = np.array([[run["work_per_query"]["cells"], run["work_per_query"]["decoded_tokens"]] for run in runs])
    cost = np.linalg.lstsq(work, np.array([run["ms_per_query"] for run in runs]), rcond=None)[0]
    if (cost < 0).any():  # noise: charge everything to the cells, the larger term
        cost = np.array([runs[1]["ms_per_query"] / work[1, 0], 0.0])
    scale = (tokens / centroids) / (head["tokens"] / head["centroids"]) * (4 / 2)
    cells = scale * runs[0]["work_per_query"]["cells"]
    return round(float(cost[0] * cells + cost[1] * 2500 * NEUCLIR_ZH["tokens_per_passage"]), 1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="tokens at 1x (10x is ten times)")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--train-sample", type=int, default=262_144)
    parser.add_argument("--centroids", type=int, default=4096,
                        help="synthetic builds' centroids at both sizes (PLAID's rule would give 2^14 and 2^15 here: "
                        "on 2 cores, assigning 10 M tokens to them takes most of an hour)")
    parser.add_argument("--shard-counts", default="1,2,4")
    parser.add_argument("--h2h-tokens", type=int, default=10_000_000, help="tokens of the head to head")
    parser.add_argument("--h2h-centroids", type=int, default=4096, help="centroids of both engines' head to head")
    parser.add_argument("--nbits", type=int, default=2, help="bits of the head to head")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of both engines")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "td-ray-colbert-bench")
    parser.add_argument("--out", type=Path, default=RESULTS / "colbert_index.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    if args.worker:
        spec, out = args.worker
        Path(out).write_text(json.dumps(search_worker(json.loads(Path(spec).read_text()))))
        return 0
    args.shard_counts = [int(count) for count in args.shard_counts.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine_info(), "goals": GOALS,
                    "settings": {key: str(value) for key, value in vars(args).items() if key != "worker"}}
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    try:
        figures = synthetic(args, args.work)
        head = head_to_head(args, args.work, figures.pop("meta_1x_2"))
    finally:
        ray.shutdown()
    report["synthetic"] = figures
    report["bytes_per_token"] = {bits: entry["bytes_per_token"] for bits, entry in figures["nbits"].items()}
    report["index_bytes_per_token"] = {bits: entry["index_bytes_per_token"] for bits, entry in figures["nbits"].items()}
    report["search_ms_per_query"] = {"exact": figures["exact_ms_per_query"],
                                     **{f"{bits}bit_{name}": entry[name]["search_ms_per_query"]
                                        for bits, entry in figures["nbits"].items() for name in SEARCH_SETTINGS}}
    report["synthetic_overlap_at_10_vs_exact"] = {f"{bits}bit_{name}": entry[name]["overlap_at_10_vs_exact"]
                                                  for bits, entry in figures["nbits"].items()
                                                  for name in SEARCH_SETTINGS}
    report["fast_plaid_head_to_head"] = head
    for key in ("search_ms_vs_fast_plaid", "build_seconds_vs_fast_plaid", "append_10_percent_vs_build",
                "evaluate_peak_rss_ratio_10x", "evaluate_peak_private_ratio_10x"):
        report[key] = head[key]
    report["head_to_head_overlap_at_10_vs_exact"] = head["overlap_at_10_vs_exact"]
    report["lists_seconds_by_shards_10x"] = head["lists_seconds_by_shards"]
    write_report(report, args.out)
    if not args.skip_demo:
        report["demo"] = demo(args.work)
        report["overlap_at_10_vs_exact"] = {key: entry["overlap_at_10_vs_exact"] for key, entry in report["demo"].items()}
        report["ndcg_at_20_delta_vs_exact"] = {key: entry["ndcg_at_20_delta_vs_exact"]
                                               for key, entry in report["demo"].items()}
    report["paper_projection"] = projection(figures, head)
    report["machine"]["contention_at_end"] = contention()
    write_report(report, args.out)
    for bits in ("1", "2"):
        value = report["bytes_per_token"][bits]
        print(f"bytes/token at {bits} bit: {value} {meets(GOALS, f'bytes_per_token_{bits}', value)}")
    for key in ("overlap_at_10_vs_exact", "ndcg_at_20_delta_vs_exact", "search_ms_vs_fast_plaid"):
        for name, value in report.get(key, {}).items():
            print(f"{key} {name}: {value} {meets(GOALS, key, value)}")
    for key in ("build_seconds_vs_fast_plaid", "append_10_percent_vs_build", "evaluate_peak_rss_ratio_10x"):
        print(f"{key}: {report[key]} {meets(GOALS, key, report[key])}")
    for name, pair in report["head_to_head_overlap_at_10_vs_exact"].items():
        print(f"head to head overlap@10 {name}: td-ray {pair['td_ray']}, fast-plaid {pair['fast_plaid']}")
    print(f"search ms/query: {report['search_ms_per_query']}; lists seconds by shards: "
          f"{report['lists_seconds_by_shards_10x']}")
    print(json.dumps(report["paper_projection"], indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
