"""Each heavy stage against its bare engine, in one run, with the same model, threads, batches and loss.

- score: the stage (a CPU step that looks texts up and tokenizes, the teacher actor that runs forward passes and
  commits blocks) against a plain ``model(**batch)`` loop over the same token-budget batches: pairs/s;
- distill: Ray Train with one worker against a plain PyTorch loop with the same Student, loss, AdamW and micro-batches
  (made ready before the clock starts): steps/s;
- index encoding: the index stage's encoder actors against `StudentEncoder.encode` in one process: passages/s;
- search: td-ray's `Searcher` over the index the stage built against bare FAISS on it: queries/s.

Each pace is the steady state, from a stage's first output (block, step, batch) to its last. The models are random
BERTs of released shapes (google/bert_uncased_L-4_H-256_A-4 for the teacher, L-2_H-128_A-2 for the student): of the
shapes td-ray trains at scale they are the ones two CPU cores run through this size in minutes, and with less model
work per call they are the harder test of the machinery's overhead. Beside each ratio: the CPU milliseconds a call or
step spends in series with the model, and its host-device syncs. A projection to an H100 divides that overhead by
overhead + the FLOP time of the paper's models at a stated rate: it is projected, not measured.

    .venv/bin/python bench/stages.py            # about 12 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from common import RESULTS, contention, machine_info, meets, search_against_bare, write_report
from scale import generate

logger = logging.getLogger("bench.stages")

GOALS = {name: (">=", 0.9) for name in ("score_vs_bare", "distill_vs_bare", "index_encode_vs_bare", "search_vs_bare")}
SHAPES = {"teacher": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024},
          "student": {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512}}
H100_FLOPS = 989e12 * 0.4
"""The stated H100 rate: 989 TFLOP/s of dense bf16 (SXM) at an assumed 40 % model FLOP utilisation."""
PAPER = {"teacher": {"model": "castorini/monot5-3b-msmarco-10k (encoder and one decoder step)", "params": 1.5e9,
                     "tokens_per_pair": 160},
         "student": {"model": "xlm-roberta-large (without its embeddings)", "params": 3.0e8, "query_tokens": 32,
                     "passage_tokens": 180, "queries_per_step": 8, "nway": 6}}
"""The paper's models as the projection counts them: about 2 x params FLOPs per token forward, 6 x with backward."""
DEFINITIONS = {
    "score_vs_bare": "the score stage's steady teacher pairs/s over a plain model(**batch) loop's, same token-budget "
    "batches of the same blocks, the same torch threads",
    "distill_vs_bare": "Ray Train (1 worker)'s steady steps/s over a plain loop's (forward, loss, backward, gradient "
    "norm, AdamW) on micro-batches made ready before its clock starts",
    "index_encode_vs_bare": "the index stage's steady passages/s over StudentEncoder.encode's in one process",
    "search_vs_bare": "bare FAISS's search seconds over td-ray's Searcher's, same index and queries",
    "host_ms_in_series": "CPU milliseconds a call (score: a block; index: a batch) or a step spends beside the model's "
    "own work, which a GPU would wait out",
    "syncs": "host-device synchronisations per call or step",
    "projected_gpu_overhead": "host_ms_in_series / (host_ms_in_series + the FLOP time of the paper's model for the same "
    "call at the stated H100 rate): projected",
}


# ------------------------------------------------------------------------------------------------ set-up
def random_bert(template: Path, out: Path, shape: dict, classifier: bool) -> Path:
    """A random BERT of `shape` with `template`'s tokenizer, saved as td-ray loads a teacher (one logit) or a student."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    tokenizer = AutoTokenizer.from_pretrained(template)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, num_labels=1, **shape)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config) if classifier else BertModel(config, add_pooling_layer=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def pipeline_config(work: Path, data: Path, models: dict[str, Path], args: argparse.Namespace):
    from td_ray.config import parse_config

    return parse_config({
        # 3 logical CPUs on the 2 cores: the teacher's and the encoder's actors reserve a whole CPU each (so they run
        # one torch thread, as the bare loops do) and Ray Data's read tasks still find the one they reserve
        "workspace": str(work / "ws"), "ray": {"num_cpus": 3},
        "data": {"passages": {"format": "tsv", "path": str(data / "passages.tsv")},
                 "train_queries": {"format": "tsv", "path": str(data / "queries.tsv")},
                 "candidates": {"format": "trec_run", "path": str(data / "candidates.trec")},
                 "eval_docs": {"format": "tsv", "path": str(data / "eval_docs.zh.tsv")},
                 "eval_topics": {"format": "tsv", "path": str(data / "topics.tsv")},
                 "eval_qrels": {"format": "trec_qrels", "path": str(data / "qrels.txt")}},
        "translate": {"targets": [{"lang": "zh", "pretranslated": {"format": "tsv",
                                                                   "path": str(data / "passages.zh.tsv")}}]},
        "score": {"teacher": str(models["teacher"]), "top_k": args.top_k, "max_length": 64, "batch_size": 4096,
                  "num_actors": 1, "num_cpus_per_actor": 1, "tokenizers": 1, "num_cpus_per_tokenizer": 0.5},
        "distill": {"student": str(models["student"]), "passage_lang": "en", "nway": 6, "batch_size": 8,
                    "steps": args.steps, "lr": 1e-5, "checkpoint_every": args.steps, "log_every": 20,
                    "num_workers": 1, "cpus_per_worker": 1, "passage_maxlen": 128, "query_maxlen": 32},
        # one vector per document (cut at max_length): 50 k NeuCLIR-long documents in MaxP passages would be 460 k
        "index": {"model": str(models["student"]), "num_shards": 2, "max_length": 128, "batch_size": 256,
                  "num_actors": 1, "num_cpus_per_actor": 1, "passages": None},
    }, source="bench/stages.py")


def params_without_embeddings(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)


def projected(host_ms: float, flops: float) -> dict:
    flop_ms = 1000 * flops / H100_FLOPS
    return {"host_ms": round(host_ms, 2), "h100_flop_ms": round(flop_ms, 2),
            "projected_gpu_overhead": round(host_ms / (host_ms + flop_ms), 4) if host_ms + flop_ms else None}


# ------------------------------------------------------------------------------------------------ score
def bench_score(config, args: argparse.Namespace) -> dict:
    from transformers import AutoModelForSequenceClassification

    from td_ray import score
    from td_ray.score.core import CrossEncoderPairs, padded, token_budget_batches
    from td_ray.workspace import CANDIDATES, PASSAGES_EN, TRAIN_QUERIES_EN, Workspace

    stage = score.run(config).metrics
    workspace = Workspace(config.workspace)
    pairs = workspace.read_table(CANDIDATES).filter(pc.less_equal(pc.field("rank"), config.score.top_k))
    queries = dict(zip(*(workspace.read_table(TRAIN_QUERIES_EN)[c].to_pylist() for c in ("id", "text"))))
    passages = dict(zip(*(workspace.read_table(PASSAGES_EN)[c].to_pylist() for c in ("id", "text"))))
    tokens = CrossEncoderPairs(config.score.teacher, config.score.max_length)
    model = AutoModelForSequenceClassification.from_pretrained(config.score.teacher).eval()
    torch.set_num_threads(int(config.score.num_cpus_per_actor))
    blocks, padded_tokens = [], 0
    for start in range(0, pairs.num_rows, config.score.batch_size):  # the stage's blocks, made ready off the clock
        block = pairs.slice(start, config.score.batch_size)
        encoded = tokens.encode([queries[q] for q in block["qid"].to_pylist()],
                                [passages[p] for p in block["pid"].to_pylist()])
        batches = []
        for batch in token_budget_batches([len(row) for row in encoded["input_ids"]], 16384):
            ids, mask = padded([encoded["input_ids"][i] for i in batch], 0)
            types = padded([encoded["token_type_ids"][i] for i in batch], 0)[0]
            batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
            padded_tokens += ids.numel()
        blocks.append((block.num_rows, batches))
    with torch.inference_mode():
        model(**blocks[0][1][0])  # warm
        started = time.perf_counter()
        for _, batches in blocks:
            torch.cat([model(**batch).logits[:, 0] for batch in batches]).cpu()  # one read-back a block, as the stage
        seconds = time.perf_counter() - started
    bare = pairs.num_rows / seconds
    host_ms = stage["host_ms_per_block"]
    tokens_per_block = padded_tokens / len(blocks)
    paper = PAPER["teacher"]
    return {
        "pairs": pairs.num_rows, "blocks": len(blocks), "model_shape": SHAPES["teacher"],
        "stage_pairs_per_s": round(stage["teacher_steady_pairs_per_s"], 1), "bare_pairs_per_s": round(bare, 1),
        "score_vs_bare": round(stage["teacher_steady_pairs_per_s"] / bare, 3),
        "host_ms_in_series_per_block": round(host_ms, 2), "syncs_per_block": 1,
        "projection": {
            "this_model": projected(host_ms, 2 * params_without_embeddings(model) * tokens_per_block),
            "paper_teacher": {"model": paper["model"]} | projected(
                host_ms, 2 * paper["params"] * paper["tokens_per_pair"] * config.score.batch_size)},
    }


# ------------------------------------------------------------------------------------------------ distill
def bench_distill(config, args: argparse.Namespace) -> dict:
    from td_ray import distill
    from td_ray.distill.train import (
        Precision,
        Student,
        TrainingTexts,
        make_loss,
        micro_batch_loss,
        prepare,
        seeded,
    )
    from td_ray.workspace import PASSAGES_EN, SCORES, TRAIN_QUERIES_EN, Workspace

    stage = distill.run(config).metrics
    options, workspace = config.distill, Workspace(config.workspace)
    scores = workspace.read_table(SCORES).sort_by([("qid", "ascending"), ("score", "descending")])
    queries = dict(zip(*(workspace.read_table(TRAIN_QUERIES_EN)[c].to_pylist() for c in ("id", "text"))))
    passages = dict(zip(*(workspace.read_table(PASSAGES_EN)[c].to_pylist() for c in ("id", "text"))))
    texts = TrainingTexts(lambda ids: [queries[i] for i in ids], {"en": lambda ids: [passages[i] for i in ids]})
    grouped: dict[str, tuple[list, list]] = {}
    for qid, pid, value in zip(*(scores[c].to_pylist() for c in ("qid", "pid", "score"))):
        grouped.setdefault(qid, ([], []))[0].append(pid)
        grouped[qid][1].append(value)
    rows = [(qid, pids, values) for qid, (pids, values) in grouped.items() if len(pids) >= options.nway]
    torch.set_num_threads(int(options.cpus_per_worker))
    student = Student(options, options.student)
    micro, timed_tokens, prepare_seconds = [], 0, 0.0
    for step in range(options.steps):  # made ready off the clock: the bare loop is the model's work alone
        chosen = [rows[(step * options.batch_size + i) % len(rows)] for i in range(options.batch_size)]
        batch = {"qid": [r[0] for r in chosen], "pids": [r[1] for r in chosen], "teacher_scores": [r[2] for r in chosen],
                 "positives": [[] for _ in chosen]}
        rng, seed = seeded(options, 0, step, 0)
        started = time.perf_counter()
        made = prepare(student, texts, batch, options, rng, step, seed)
        prepare_seconds += time.perf_counter() - started  # what a loop without the prefetch thread adds in series
        micro.append(made)
        buckets = made.passages["buckets"] if "buckets" in made.passages else [made.passages]
        timed_tokens += made.query["input_ids"].numel() + sum(part["input_ids"].numel() for part in buckets)
    prepare_ms = 1000 * prepare_seconds / len(micro)
    model, loss_fn, device = student.model, make_loss(options), torch.device("cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr)
    precision = Precision(options.mixed_precision, device)
    model.train()
    warm = 10
    for index, made in enumerate(micro):
        if index == warm:
            started = time.perf_counter()
        optimizer.zero_grad()
        precision.backward(micro_batch_loss(model, loss_fn, made, options, device))
        precision.step(optimizer, model.parameters(), options.max_grad_norm)
    seconds = time.perf_counter() - started
    bare = (len(micro) - warm) / seconds
    paper = PAPER["student"]
    paper_tokens = paper["queries_per_step"] * (paper["query_tokens"] + paper["nway"] * paper["passage_tokens"])
    host_ms = stage.get("host_wait_ms_per_step", 0.0)
    return {
        "steps": options.steps, "model_shape": SHAPES["student"], "length_buckets": options.length_buckets,
        "stage_steps_per_s": round(stage["steps_per_s"], 3), "bare_steps_per_s": round(bare, 3),
        "distill_vs_bare": round(stage["steps_per_s"] / bare, 3),
        "host_ms_in_series_per_step": round(host_ms, 2),
        "host_ms_per_step_made_ready_in_the_prefetch_thread": round(prepare_ms, 2),
        "syncs_per_step": round(stage["host_syncs_per_step"], 4),
        "projection": {
            "this_model": projected(host_ms, 6 * params_without_embeddings(model) * timed_tokens / len(micro)),
            "paper_student": {"model": paper["model"], "per_gpu_step": f"{paper['queries_per_step']} queries x nway "
                              f"{paper['nway']}"} | projected(host_ms, 6 * paper["params"] * paper_tokens)},
    }


# ------------------------------------------------------------------------------------------------ index, search
def bench_index_and_search(config, args: argparse.Namespace) -> tuple[dict, dict]:
    import json

    from td_ray import index
    from td_ray.encoders.dense import StudentEncoder
    from td_ray.encoders.passages import split_passages
    from td_ray.workspace import EVAL_DOCS, INDEX_META, TRAIN_QUERIES_EN, Workspace

    stage = index.run(config).metrics
    workspace = Workspace(config.workspace)
    options = config.index
    torch.set_num_threads(int(options.num_cpus_per_actor))
    encoder = StudentEncoder(options.model, max_length=options.max_length, batch_size=options.batch_size)
    documents = workspace.read_table(EVAL_DOCS)["text"].slice(0, args.bare_docs).to_pylist()
    texts = [part for parts in split_passages(encoder.tokenizer, documents, options.passages.length,
                                              options.passages.stride) for part in parts] if options.passages else documents
    encoder.encode(texts[: options.batch_size])  # warm
    started = time.perf_counter()
    encoder.encode(texts)
    bare = len(texts) / (time.perf_counter() - started)
    batches = [texts[start:start + options.batch_size] for start in range(0, len(texts), options.batch_size)][:20]
    started = time.perf_counter()
    for batch in batches:  # what tokenizing a batch takes, in series with the encoder
        encoder.tokenizer(batch, truncation=True, max_length=options.max_length, padding=True, return_tensors="pt")
    tokenize_ms = 1000 * (time.perf_counter() - started) / len(batches)
    paper = PAPER["student"]
    encoded = {
        "documents": int(stage["encoded_documents"]), "passages": int(stage["passages"]),
        "bare_documents": len(documents), "bare_passages": len(texts),
        "stage_passages_per_s": round(stage["encode_steady_passages_per_s"], 1), "bare_passages_per_s": round(bare, 1),
        "index_encode_vs_bare": round(stage["encode_steady_passages_per_s"] / bare, 3),
        "host_ms_in_series_per_batch": round(tokenize_ms, 2), "syncs_per_batch": 1,
        "projection": {"paper_student": {"model": paper["model"]} | projected(
            tokenize_ms, 2 * paper["params"] * paper["passage_tokens"] * options.batch_size)},
    }
    meta = json.loads(workspace.read_text(INDEX_META))
    queries = encoder.encode(workspace.read_table(TRAIN_QUERIES_EN)["text"].slice(0, args.queries).to_pylist())
    searched = search_against_bare(Path(workspace.path(meta["build"])), meta["files"], meta["search_params"], meta["dim"],
                                   np.ascontiguousarray(queries, dtype=np.float32), 100)
    search = {"queries": len(queries), "factory": meta["factory"], "search_params": meta["search_params"],
              "queries_per_s": round(len(queries) / searched["seconds"], 1),
              "bare_queries_per_s": round(len(queries) / searched["bare_seconds"], 1),
              "search_vs_bare": round(searched["bare_seconds"] / searched["seconds"], 3)}
    return encoded, search


# ------------------------------------------------------------------------------------------------ main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fraction", type=float, default=0.004, help="MS MARCO fraction (training side)")
    parser.add_argument("--top-k", type=int, default=10, help="candidates scored per query (pairs = queries x this)")
    parser.add_argument("--steps", type=int, default=310, help="distill steps (the first 10 are not timed)")
    parser.add_argument("--documents", type=int, default=50_000, help="evaluation documents the index encodes")
    parser.add_argument("--bare-docs", type=int, default=10_000, help="documents the bare encoder encodes")
    parser.add_argument("--queries", type=int, default=2000, help="queries searched")
    parser.add_argument("--work", type=Path, default=Path("/tmp/td-ray-stages-bench"))
    parser.add_argument("--out", type=Path, default=RESULTS / "stages.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    from td_ray.assets.tiny_models import build_tiny_models

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    report = {"machine": machine_info(), "goals": GOALS, "definitions": DEFINITIONS,
              "settings": {key: str(value) for key, value in vars(args).items()},
              "h100_rate_flops": H100_FLOPS, "h100_rate": "989 TFLOP/s dense bf16 (H100 SXM) x 0.4 assumed utilisation"}
    shutil.rmtree(args.work, ignore_errors=True)
    tiny = build_tiny_models(args.work / "tiny-models")
    models = {"teacher": random_bert(tiny.root / "cross_encoder", args.work / "teacher", SHAPES["teacher"], True),
              "student": random_bert(tiny.root / "student", args.work / "student", SHAPES["student"], False)}
    sizes = generate(args.work / "data", args.fraction, args.documents, eval_docs=args.documents)
    logger.info("generated %s", sizes)
    config = pipeline_config(args.work, args.work / "data", models, args)
    stages = {"score": bench_score(config, args)}
    logger.info("score: %s", stages["score"])
    stages["distill"] = bench_distill(config, args)
    logger.info("distill: %s", stages["distill"])
    stages["index_encode"], stages["search"] = bench_index_and_search(config, args)
    logger.info("index: %s; search: %s", stages["index_encode"], stages["search"])
    report["stages"] = stages
    report["summary"] = {"score_vs_bare": stages["score"]["score_vs_bare"],
                         "distill_vs_bare": stages["distill"]["distill_vs_bare"],
                         "index_encode_vs_bare": stages["index_encode"]["index_encode_vs_bare"],
                         "search_vs_bare": stages["search"]["search_vs_bare"]}
    report["machine"]["contention_at_end"] = contention()
    write_report(report, args.out)
    for name, value in report["summary"].items():
        print(f"{name:<22} {value:>7.3f}  goal >= 0.9  {meets(GOALS, name, value)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
