"""GPU smoke check of td-ray's heavy steps, under 8 minutes on one H100, writing bench/results/gpu_smoke.json.

On the GPU the process holds (random data and random-init models of realistic shapes, so nothing is downloaded):

1. the codec trained on a token sample (`plaid.ResidualCodec.train`: spherical k-means, PLAID's 4 iterations, then
   the 2-bit residual levels on the whole sample);
2. compression of token vectors into centroid ids and 2-bit residual codes (`plaid.ResidualCodec.encode`), checked
   against the same codec's CPU codes;
3. search of the compressed tokens (`plaid.TokenIndex` on the GPU), checked against its CPU search;
4. the students under bf16 autocast against fp32 (`devices.autocast`): an XLM-R-large-shaped ColBERT student and a
   dense one, passages a second and the top-10 agreement;
5. FAISS on the GPU when this FAISS build has it (`faiss_index.train`: IVF k-means, and an IVF-HNSW index, whose
   coarse quantizer FAISS cannot clone, through `gpu_plan`'s clustering-only path).

    python bench/gpu_smoke.py                 # on a GPU machine
    python bench/gpu_smoke.py --small --out /tmp/gpu_smoke.json   # the same steps, tiny, on any CPU

Every figure is the device's own: nothing here compares with another run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from td_ray import devices  # noqa: E402
from td_ray.retrieval import plaid  # noqa: E402

logger = logging.getLogger("bench.gpu_smoke")

SIZES = {  # full: about 6 minutes on an H100; small: seconds on 2 CPU cores
    "full": {"sample": 2_000_000, "centroids": 65_536, "tokens": 20_000_000, "passages_tokens": 180, "queries": 64,
             "encode_passages": 2048, "layers": 24, "hidden": 1024, "vocab": 250_002, "faiss_vectors": 1_000_000},
    "small": {"sample": 20_000, "centroids": 256, "tokens": 60_000, "passages_tokens": 60, "queries": 4,
              "encode_passages": 8, "layers": 2, "hidden": 64, "vocab": 1000, "faiss_vectors": 20_000},
}


def timed(device: str, work) -> tuple[object, float]:
    """`work()`'s result and its seconds, the device synchronised on both sides."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = work()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def unit_vectors(rows: int, dim: int, seed: int) -> np.ndarray:
    """Clustered unit vectors, as a student's token vectors are."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1024, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), rows)] + 0.6 * rng.standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def compression(device: str, size: dict, work: Path) -> dict:
    """k-means, compression and search of the token index on `device`, checked against the CPU."""
    sample = unit_vectors(size["sample"], 128, 0)
    codec, train_seconds = timed(device, lambda: plaid.ResidualCodec.train(sample, size["centroids"], 2, 4, 0, device,
                                                                           in_place=True))
    tokens = unit_vectors(size["tokens"], 128, 1)
    (ids, codes), encode_seconds = timed(device, lambda: codec.encode(tokens, device))
    check = slice(0, min(len(tokens), 100_000))
    cpu_ids, cpu_codes = codec.encode(tokens[check], "cpu")
    passages = len(tokens) // size["passages_tokens"]
    counts = np.full(passages, size["passages_tokens"], dtype=np.int64)
    meta = write_index(work / "index", codec, ids[:passages * size["passages_tokens"]],
                       codes[:passages * size["passages_tokens"]], counts)
    queries = unit_vectors(size["queries"] * 32, 128, 2).reshape(size["queries"], 32, 128)
    settings = plaid.SearchSettings.for_depth(100)
    gpu_index = plaid.TokenIndex(work / "index", meta, settings, device=device)
    gpu_index.search(queries[:2], 100)
    (_, found), search_seconds = timed(device, lambda: gpu_index.search(queries, 100))
    _, cpu_found = plaid.TokenIndex(work / "index", meta, settings).search(queries[:4], 100)
    return {"codec_train": {"sample": len(sample), "centroids": size["centroids"], "seconds": round(train_seconds, 3),
                            "kmeans_flops_per_second": 2 * 5 * len(sample) * size["centroids"] * 128 / train_seconds},
            "compress": {"tokens": len(tokens), "seconds": round(encode_seconds, 3),
                         "tokens_per_second": round(len(tokens) / encode_seconds),
                         "flops_per_second": 2 * len(tokens) * size["centroids"] * 128 / encode_seconds,
                         "ids_equal_cpu": float(np.mean(ids[check] == cpu_ids)),
                         "codes_equal_cpu": float(np.mean(np.all(codes[check] == cpu_codes, axis=1)))},
            "search": {"passages": passages, "tokens": int(counts.sum()), "queries": len(queries),
                       "ms_per_query": round(1000 * search_seconds / len(queries), 3),
                       "top10_equal_cpu": float(np.mean(found[:4, :10] == cpu_found[:, :10]))}}


def write_index(directory: Path, codec: plaid.ResidualCodec, ids: np.ndarray, codes: np.ndarray,
                counts: np.ndarray) -> dict:
    """A token index of passages with `counts` tokens whose codes are given, in one shard (the stage's steps)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    codec.save(directory)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    pq.write_table(pa.table({"faiss_id": np.arange(len(counts)), "first_token": offsets[:-1],
                             "tokens": counts.astype(np.int32), "centroid_ids": plaid.per_passage_bytes(ids, counts),
                             "residuals": plaid.per_passage_bytes(codes, counts)}), directory / "codes.parquet",
                   row_group_size=8192)
    layout = plaid.Layout(len(counts), int(counts.sum()), codec.code_bytes, codec.id_dtype.str, codec.nlist)
    layout.allocate(directory)
    plaid.write_shard(directory / "codes.parquet", directory, 0, 0, len(counts), layout)
    plaid.merge_lists(directory, [0], layout)
    return {"passages": layout.passages, "tokens": layout.tokens, "dim": codec.dim, "centroids": codec.nlist,
            "query_maxlen": 32}


def encoders(device: str, size: dict) -> dict:
    """bf16 autocast against fp32 for random-init students of XLM-R-large's shape: passages a second and how far
    the vectors and the top 10 move."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from td_ray.encoders.colbert import ColBERTEncoder
    from td_ray.encoders.dense import DualEncoder

    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                              num_attention_heads=max(1, size["hidden"] // 64), intermediate_size=4 * size["hidden"],
                              max_position_embeddings=514)
    backbone = XLMRobertaModel(config, add_pooling_layer=False).to(device).eval()
    ids = torch.randint(5, size["vocab"], (size["encode_passages"], size["passages_tokens"]), device=device)
    mask = torch.ones_like(ids)
    out = {}
    for name, model in (("colbert", ColBERTEncoder(backbone, 128).to(device).eval()),
                        ("dense", DualEncoder(backbone, "cls", "cosine").to(device).eval())):
        def encode(bf16: bool):
            with torch.inference_mode(), devices.autocast(device) if bf16 else contextlib.nullcontext():
                vectors = model.encode(ids, mask, mask) if name == "colbert" else model.encode(ids, mask)
            return vectors.float().reshape(len(ids), -1)

        fp32, fp32_seconds = timed(device, lambda: encode(False))
        bf16, bf16_seconds = timed(device, lambda: encode(True))
        queries = fp32[:8]
        top_fp32 = (queries @ fp32.T).topk(min(10, len(ids)), dim=1).indices
        top_bf16 = (queries @ bf16.T).topk(min(10, len(ids)), dim=1).indices
        overlap = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(top_fp32.tolist(), top_bf16.tolist())])
        out[name] = {"passages_per_second_fp32": round(len(ids) / fp32_seconds, 1),
                     "passages_per_second_bf16": round(len(ids) / bf16_seconds, 1),
                     "bf16_speedup": round(fp32_seconds / bf16_seconds, 2),
                     "cosine_bf16_fp32": float(torch.nn.functional.cosine_similarity(fp32, bf16).min()),
                     "top10_overlap": float(overlap)}
    return out


def faiss_gpu(size: dict) -> dict:
    """FAISS on the GPU: an IVF-PQ index trained on it, and an IVF-HNSW one through the clustering-only path."""
    import faiss

    from td_ray.retrieval import faiss_index

    if not (hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus()):
        return {"skipped": "this FAISS build has no GPU (install faiss-gpu-cu12 on the GPU node)"}
    vectors = unit_vectors(size["faiss_vectors"], 128, 3)
    out = {}
    for factory in ("IVF4096,PQ32", "IVF4096_HNSW32,PQ32"):
        plan = faiss_index.plan_index(factory, 128)
        index, seconds = timed("cuda", lambda: faiss_index.train(plan, vectors, "cuda"))
        out[factory] = {"gpu_plan": faiss_index.gpu_plan(faiss_index.empty_index(plan)), "train_seconds": seconds,
                        "trained": bool(index.is_trained)}
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes: the same steps in seconds on a CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_smoke.json")
    args = parser.parse_args(argv)
    size = SIZES["small" if args.small else "full"]
    device = devices.resolve_device("auto")
    report: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                    "torch": torch.__version__, "sizes": size}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        report["token_index"] = compression(device, size, Path(work))
    logger.info("token index: %s", report["token_index"])
    report["encoders"] = encoders(device, size)
    logger.info("encoders: %s", report["encoders"])
    try:
        report["faiss"] = faiss_gpu(size)
    except ImportError as error:
        report["faiss"] = {"skipped": f"no FAISS here ({error})"}
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    logger.info("wrote %s in %.0f s", args.out, report["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
