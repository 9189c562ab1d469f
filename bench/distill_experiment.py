"""Translate-Distill against Translate-Train in miniature, on the demo collection and the tiny models.

1. The tiny cross-encoder teacher is fine-tuned on generated English training queries and their qrels (that is
   part of ``build_tiny_models``); its own quality is measured on the evaluation collection, which it never saw.
2. A fifth of the collection's training queries is held out. From one random student init per seed, two
   students are trained for the same steps, batch size and learning rate, on the other training queries plus
   generated ones like them, with English queries and synthetic-language passages:
   - TD: the teacher's scores (English query x English passage) over each query's candidates, KL loss,
     ``only_top`` sampler;
   - TT: the qrels positive against negatives drawn from its non-relevant candidates, contrastive loss.
3. Each student, before and after training, is scored by its Kendall tau-b with the teacher's ranking of each
   held-out query's candidates (English query x synthetic-language passage, averaged over queries) and by
   nDCG@10 of exact dot-product search over the synthetic-language evaluation collection.

The main comparison gives each query all its candidates (``--nway``, 10); a second one uses the paper's nway
of 6 (``--paper-nway``), where ``only_top`` shows TD only the teacher's 6 best.

No Ray: a single-process loop over the library's pure functions (``group_by_query``, ``train_step``,
``make_loss``, the samplers, ``DualEncoder``, ``CrossEncoderTeacher``, the index and evaluate helpers), which is
what each Ray Train worker runs.

    .venv/bin/python bench/distill_experiment.py          # about 6 minutes on 2 busy CPU cores
    .venv/bin/python bench/distill_experiment.py --help   # steps, seeds, learning rate, nway

Prints a table and writes ``bench/results/distill_experiment.json``.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from scipy.stats import kendalltau
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    get_linear_schedule_with_warmup,
)

from td_ray.assets.demo_data import (
    DemoSizes,
    english_training_examples,
    write_demo_collection,
)
from td_ray.assets.tiny_models import TEACHER_TRAINING, build_tiny_models
from td_ray.config import DistillConfig
from td_ray.distill.data import group_by_query
from td_ray.encoders.dense import DualEncoder
from td_ray.distill.train import Student, TrainingTexts, make_loss, train_step
from td_ray.evaluate.core import evaluate_run, run_table
from td_ray.score.core import CrossEncoderTeacher

from common import write_report

logger = logging.getLogger("bench.distill_experiment")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "distill_experiment.json"
MEASURE = "nDCG@10"
TEACHER_MAX_LENGTH = 128
SPLIT_SEED = 0
"""Seed of the held-out split: the same queries are held out for every training seed."""
FIGURES = ("kendall_tau_before", "kendall_tau_after", "ndcg_before", "ndcg_after")


# ------------------------------------------------------------------------------------------------ data
def read_tsv(path: Path) -> dict[str, str]:
    """id -> text of a two-column TSV file."""
    with open(path, encoding="utf-8") as f:
        return dict(line.rstrip("\n").split("\t", 1) for line in f if line.strip())


def read_candidates(path: Path) -> dict[str, list[str]]:
    """qid -> pids in rank order, from a TREC run."""
    ranked: dict[str, list[tuple[int, str]]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            qid, _, pid, position, *_ = line.split()
            ranked.setdefault(qid, []).append((int(position), pid))
    return {qid: [pid for _, pid in sorted(rows)] for qid, rows in ranked.items()}


def read_qrels(path: Path) -> pa.Table:
    """A TREC qrels file as the (qid, docid, relevance) table ``evaluate_run`` reads."""
    rows: dict[str, list] = {"qid": [], "docid": [], "relevance": []}
    with open(path, encoding="utf-8") as f:
        for line in f:
            qid, _, docid, relevance = line.split()
            rows["qid"].append(qid)
            rows["docid"].append(docid)
            rows["relevance"].append(int(relevance))
    return pa.table(rows)


def add_extra_queries(n: int, queries: dict[str, str], candidates: dict[str, list[str]], positives: dict[str, str],
                      passages: dict[str, str], exclude: set[str]) -> int:
    """Add ``n`` more generated English training queries (qids ``x0``...), drawn as the collection's are.

    They come from ``english_training_examples``, whose first queries are exactly the collection's; the teacher
    was fine-tuned on the same ones. An extra query whose text is in ``exclude`` (a held-out query's) is
    dropped. Returns how many were added.
    """
    pid_of = {text: pid for pid, text in passages.items()}
    generated = english_training_examples(DemoSizes(), extra_queries=n)
    added = 0
    for i, example in enumerate(generated[len(generated) - n:]):
        if example.query in exclude:
            continue
        qid = f"x{i}"
        queries[qid] = example.query
        candidates[qid] = [pid_of[text] for text in example.candidates]
        positives[qid] = pid_of[example.positive]
        added += 1
    return added


def id_text(texts: dict[str, str]) -> pa.Table:
    return pa.table({"id": list(texts), "text": list(texts.values())})


def score_pairs(teacher: CrossEncoderTeacher, queries: list[str], passages: list[str], batch_size: int = 128) -> np.ndarray:
    """The teacher's raw logits over (query, passage) pairs."""
    return np.concatenate([teacher.score(queries[i:i + batch_size], passages[i:i + batch_size])
                           for i in range(0, len(queries), batch_size)])


def score_table(teacher: CrossEncoderTeacher, queries: dict[str, str], candidates: dict[str, list[str]],
                passages: dict[str, str]) -> pa.Table:
    """The score stage's table (qid, pid, score): the teacher over every candidate, English x English."""
    pairs = [(qid, pid) for qid in sorted(candidates) for pid in candidates[qid]]
    scores = score_pairs(teacher, [queries[q] for q, _ in pairs], [passages[p] for _, p in pairs])
    return pa.table({"qid": [q for q, _ in pairs], "pid": [p for _, p in pairs], "score": scores})


def td_rows(scores: pa.Table, qids: list[str], queries: dict[str, str], passages: dict[str, str]) -> list[dict]:
    """Translate-Distill examples as the distill stage builds them (candidates best-scored first), plus the query
    and passage text the held-out measures read."""
    grouped = {row["qid"]: row for row in group_by_query(scores.filter(pc.is_in(scores["qid"], pa.array(qids))))
               .to_pylist()}
    return [grouped[qid] | {"query": queries[qid], "passages": [passages[pid] for pid in grouped[qid]["pids"]]}
            for qid in qids]


def tt_rows(qids: list[str], candidates: dict[str, list[str]], positives: dict[str, str]) -> list[dict]:
    """Translate-Train examples as the distill stage builds them with ``positives: qrels``: the candidates and
    the judged positive; each step draws the positive and nway - 1 negatives from the unjudged candidates."""
    return [{"qid": qid, "pids": candidates[qid], "teacher_scores": [0.0] * len(candidates[qid]),
             "positives": [positives[qid]]} for qid in qids]


def other_topic_share(rows: list[dict], positives: dict[str, str], nway: int | None) -> float:
    """Share of passages from another topic than the positive's among each query's ``nway`` best-scored (None: all).

    Demo passage ``p<i>`` belongs to topic ``i % n_topics``; the evaluation qrels grade relevance by topic.
    """
    def topic(pid: str) -> int:
        return int(pid[1:]) % DemoSizes().n_topics

    return float(np.mean([topic(pid) != topic(positives[row["qid"]]) for row in rows for pid in row["pids"][:nway]]))


def batches(rows: list[dict], batch_size: int, rng: np.random.Generator):
    """Endless column batches of ``batch_size`` examples, reshuffled every epoch, the last partial batch dropped."""
    while True:
        order = rng.permutation(len(rows))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chosen = [rows[i] for i in order[start:start + batch_size]]
            yield {key: [row[key] for row in chosen] for key in ("qid", "pids", "teacher_scores", "positives")}


# ------------------------------------------------------------------------------------------------ models
def new_student(student_dir: Path, seed: int, pooling: str) -> DualEncoder:
    """A random-init student of the tiny student's architecture (BertModel without pooler), seeded."""
    torch.manual_seed(seed)
    return DualEncoder(AutoModel.from_config(AutoConfig.from_pretrained(student_dir), add_pooling_layer=False), pooling)


def encode(model: DualEncoder, tokenizer, texts: list[str], max_length: int, batch_size: int = 128) -> np.ndarray:
    """float32 vectors, as ``StudentEncoder.encode`` computes them, from an in-memory model."""
    model.eval()
    vectors = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length,
                                padding=True, return_tensors="pt")
            vectors.append(model.encode(encoded["input_ids"], encoded["attention_mask"]).float().numpy())
    return np.concatenate(vectors)


def mean_tau(model: DualEncoder, tokenizer, heldout: list[dict], config: DistillConfig) -> float:
    """Mean over held-out queries of Kendall tau-b between teacher and student scores of its candidates."""
    queries = encode(model, tokenizer, [row["query"] for row in heldout], config.query_maxlen)
    passages = encode(model, tokenizer, [text for row in heldout for text in row["passages"]], config.passage_maxlen)
    taus, start = [], 0
    for row, query in zip(heldout, queries):
        student = passages[start:start + len(row["passages"])] @ query
        start += len(row["passages"])
        tau = kendalltau(row["teacher_scores"], student).statistic
        taus.append(0.0 if np.isnan(tau) else float(tau))  # a constant score list agrees with no ranking
    return float(np.mean(taus))


def measure(model: DualEncoder, tokenizer, heldout: list[dict], evaluation: dict, config: DistillConfig) -> dict:
    """The student's mean Kendall tau with the teacher and its nDCG@10."""
    return {"kendall_tau": mean_tau(model, tokenizer, heldout, config),
            "ndcg": student_ndcg(model, tokenizer, evaluation, config)}


def run_ndcg(run: pa.Table, qrels: pa.Table) -> float:
    return evaluate_run(run, qrels, [MEASURE])[0][MEASURE]


def student_ndcg(model: DualEncoder, tokenizer, evaluation: dict, config: DistillConfig) -> float:
    """nDCG@10 of exact inner-product search (FAISS) over the evaluation documents."""
    doc_ids, topic_ids = list(evaluation["docs"]), list(evaluation["topics"])
    vectors = encode(model, tokenizer, list(evaluation["docs"].values()), config.passage_maxlen)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    vectors = encode(model, tokenizer, list(evaluation["topics"].values()), config.query_maxlen)
    return run_ndcg(run_table(dict(enumerate(doc_ids)), topic_ids, *index.search(vectors, min(100, index.ntotal))),
                    evaluation["qrels"])


def teacher_ndcg(teacher: CrossEncoderTeacher, topics: dict[str, str], docs: dict[str, str], qrels: pa.Table) -> float:
    """nDCG@10 of the teacher reranking every document for every topic."""
    rows: dict[str, list] = {"qid": [], "docid": [], "score": []}
    for qid, topic in topics.items():
        rows["qid"] += [qid] * len(docs)
        rows["docid"] += list(docs)
        rows["score"] += score_pairs(teacher, [topic] * len(docs), list(docs.values())).tolist()
    return run_ndcg(pa.table(rows), qrels)


def reciprocal_rank(pids: list[str], positive: str) -> float:
    return 1.0 / (1 + pids.index(positive))


def train(model: DualEncoder, student_dir: Path, texts: TrainingTexts, rows: list[dict], config: DistillConfig) -> list[float]:
    """The Ray Train worker's loop in one process: AdamW, linear warm-up and decay, sampling seeded by (seed, step)."""
    torch.manual_seed(config.seed)
    student = Student(config, str(student_dir))
    student.model = model  # the seeded random init, not the saved weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    loss_fn = make_loss(config)
    stream = batches(rows, config.batch_size, np.random.default_rng(config.seed))
    losses = []
    model.train()
    for step in range(config.steps):
        rng = np.random.default_rng([config.seed, 0, step])
        loss = train_step(model, loss_fn, student, texts, next(stream), config, torch.device("cpu"), rng,
                          step / config.steps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def compare(nway: int, seeds: list[int], args: argparse.Namespace, student_dir: Path, tokenizer, texts: TrainingTexts,
            examples: dict,
            heldout: list[dict], evaluation: dict, before: dict[int, dict]) -> dict:
    """TD and TT students at ``nway``, per seed: the four figures, losses and training time.

    ``before`` caches the untrained students' figures by seed (every student of a seed starts from the same init).
    """
    common = {"student": str(student_dir), "passage_lang": "syn", "nway": nway, "batch_size": args.batch_size,
              "steps": args.steps, "lr": args.lr, "warmup_steps": args.warmup_steps, "passage_maxlen": args.maxlen,
              "pooling": args.pooling}
    per_seed: dict[str, list[dict]] = {"td": [], "tt": []}
    for seed in seeds:
        configs = {"td": DistillConfig(**common, seed=seed, loss="kl", sampler="only_top"),
                   "tt": DistillConfig(**common, seed=seed, loss="contrastive", positives="qrels", sampler="random")}
        for name, config in configs.items():
            model = new_student(student_dir, seed, config.pooling)
            if seed not in before:
                before[seed] = measure(model, tokenizer, heldout, evaluation, config)
            began = time.perf_counter()
            losses = train(model, student_dir, texts, examples[name], config)
            seconds = time.perf_counter() - began
            after = measure(model, tokenizer, heldout, evaluation, config)
            run = {"seed": seed, "kendall_tau_before": before[seed]["kendall_tau"],
                   "kendall_tau_after": after["kendall_tau"], "ndcg_before": before[seed]["ndcg"],
                   "ndcg_after": after["ndcg"], "loss_first": losses[0], "loss_last10": float(np.mean(losses[-10:])),
                   "train_seconds": seconds}
            per_seed[name].append(run)
            logger.info("nway %d seed %d %s: tau %.3f -> %.3f, nDCG@10 %.3f -> %.3f, loss %.3f -> %.3f (%.0f s)",
                        nway, seed, name, run["kendall_tau_before"], run["kendall_tau_after"], run["ndcg_before"],
                        run["ndcg_after"], losses[0], run["loss_last10"], seconds)
    out: dict = {"nway": nway}
    for name, runs in per_seed.items():
        out[name] = {figure: float(np.mean([run[figure] for run in runs])) for figure in FIGURES}
        out[name].update({figure + "_std": float(np.std([run[figure] for run in runs])) for figure in FIGURES})
        out[name]["per_seed"] = runs
    out["td_ge_tt"] = {figure: out["td"][figure] >= out["tt"][figure] for figure in ("ndcg_after", "kendall_tau_after")}
    out["seeds_td_ge_tt"] = {figure: sum(a[figure] >= b[figure] for a, b in zip(per_seed["td"], per_seed["tt"]))
                             for figure in ("ndcg_after", "kendall_tau_after")}
    return out


# ------------------------------------------------------------------------------------------------ report
def describe(comparison: dict, label: str) -> str:
    """One clause: whether TD >= TT holds in ``comparison``, with means and seed counts."""
    td, tt, wins, n = comparison["td"], comparison["tt"], comparison["seeds_td_ge_tt"], len(comparison["td"]["per_seed"])
    parts = []
    for figure, name in (("ndcg_after", "nDCG@10"), ("kendall_tau_after", "tau")):
        parts.append(f"{name} {td[figure]:.3f} vs {tt[figure]:.3f} ({wins[figure]}/{n} seeds)")
    held = comparison["td_ge_tt"]
    word = "holds on both measures" if all(held.values()) else "fails on both" if not any(held.values()) else "is mixed"
    return f"{label}, TD >= TT {word}: {', '.join(parts)}"


def interpretation(main_cmp: dict, paper_cmp: dict | None, shares: dict, candidates_per_query: int) -> str:
    """The ``td_ge_tt`` sentence: both comparisons, and how rarely the teacher's best are from another topic."""
    seen = ("all candidates, the same passages for both" if main_cmp["nway"] >= candidates_per_query
            else "only_top for TD")
    sentence = describe(main_cmp, f"With nway {main_cmp['nway']} ({seen})")
    if paper_cmp is not None:
        nway = paper_cmp["nway"]
        sentence += "; " + describe(paper_cmp, f"with the paper's nway {nway} (only_top for TD)")
        sentence += (f"; the teacher's top {nway} hold {shares[nway]:.1%} other-topic passages against "
                     f"{shares['all']:.1%} of all candidates, and the evaluation qrels grade relevance by topic")
    return sentence + "."


def table(report: dict) -> str:
    lines = [f"{'nway':<6}{'student':<10}{'tau before':>11}{'tau after':>11}{'nDCG before':>13}{'nDCG after':>12}"]
    for comparison in report["comparisons"].values():
        for name in ("td", "tt"):
            s = comparison[name]
            lines.append(f"{comparison['nway']:<6}{name.upper() + ' mean':<10}{s['kendall_tau_before']:>11.3f}"
                         f"{s['kendall_tau_after']:>11.3f}{s['ndcg_before']:>13.3f}{s['ndcg_after']:>12.3f}")
            for run in s["per_seed"]:
                lines.append(f"{'':<6}{'  seed ' + str(run['seed']):<10}{run['kendall_tau_before']:>11.3f}"
                             f"{run['kendall_tau_after']:>11.3f}{run['ndcg_before']:>13.3f}{run['ndcg_after']:>12.3f}")
    teacher = report["teacher"]
    lines.append(f"teacher nDCG@10 reranking the evaluation collection: English docs {teacher['ndcg_eval_en']:.3f}, "
                 f"synthetic-language docs {teacher['ndcg_eval_syn']:.3f}")
    lines.append(f"teacher MRR@10 of the qrels positive, held-out training queries: {teacher['mrr_heldout']:.3f} "
                 f"(lexical candidate order {teacher['mrr_heldout_candidate_order']:.3f})")
    lines.append(report["td_ge_tt"]["interpretation"])
    lines.append(f"wall time {report['wall_time_s']:.0f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per student")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds (student init, example order, dropout, negative sampling)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--warmup-steps", type=int, default=20, help="linear warm-up steps")
    parser.add_argument("--batch-size", type=int, default=8, help="queries per step")
    parser.add_argument("--nway", type=int, default=10, help="passages per query per step, main comparison")
    parser.add_argument("--paper-nway", type=int, default=6, help="nway of the second comparison (0: skip it)")
    parser.add_argument("--paper-seeds", type=int, default=1,
                        help="how many of --seeds the second comparison uses (all three: about 2 minutes more)")
    parser.add_argument("--holdout", type=float, default=0.2, help="share of the collection's training queries held out")
    parser.add_argument("--extra-queries", type=int, default=TEACHER_TRAINING.extra_queries,
                        help="generated English training queries added (default: as many as the teacher saw)")
    parser.add_argument("--pooling", choices=["cls", "mean"], default="mean", help="student pooling")
    parser.add_argument("--maxlen", type=int, default=96, help="most passage tokens (training and encoding)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (on 2 busy cores 1 ran 5-8x faster per step than 2)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "td-ray-distill-experiment",
                        help="where the tiny models and the demo collection are built (models are reused)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON report")
    return parser


def main() -> None:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()

    models = build_tiny_models(args.cache / "tiny-models")
    files = write_demo_collection(args.cache / "demo")
    queries, english, syn = (read_tsv(files[key]) for key in ("train_queries", "passages", "passages_syn"))
    candidates = read_candidates(files["candidates"])
    positives = {row["qid"]: row["docid"] for row in read_qrels(files["train_qrels"]).to_pylist()}
    evaluation = {"docs": read_tsv(files["eval_docs_syn"]), "topics": read_tsv(files["eval_topics"]),
                  "qrels": read_qrels(files["eval_qrels"])}

    collection_qids = sorted(candidates)
    heldout_qids = sorted(np.random.default_rng(SPLIT_SEED).choice(
        collection_qids, round(args.holdout * len(collection_qids)), replace=False).tolist())
    added = add_extra_queries(args.extra_queries, queries, candidates, positives, english,
                              {queries[qid] for qid in heldout_qids})
    train_qids = [qid for qid in sorted(candidates) if qid not in set(heldout_qids)]

    logger.info("scoring %d candidate pairs with the teacher", sum(map(len, candidates.values())))
    teacher = CrossEncoderTeacher(str(models.cross_encoder), max_length=TEACHER_MAX_LENGTH, device="cpu")
    scores = score_table(teacher, queries, candidates, english)
    heldout = td_rows(scores, heldout_qids, queries, syn)
    teacher_quality = {
        "ndcg_eval_en": teacher_ndcg(teacher, evaluation["topics"], read_tsv(files["eval_docs"]), evaluation["qrels"]),
        "ndcg_eval_syn": teacher_ndcg(teacher, evaluation["topics"], evaluation["docs"], evaluation["qrels"]),
        "mrr_heldout": float(np.mean([reciprocal_rank(row["pids"], positives[row["qid"]]) for row in heldout])),
        "mrr_heldout_candidate_order": float(np.mean(
            [reciprocal_rank(candidates[qid], positives[qid]) for qid in heldout_qids])),
        "training": {"steps": TEACHER_TRAINING.steps, "lr": TEACHER_TRAINING.lr,
                     "queries_per_step": TEACHER_TRAINING.queries_per_step,
                     "training_queries": len(collection_qids) + TEACHER_TRAINING.extra_queries},
        "note": "ndcg_eval_*: the teacher reranks every evaluation document for each English topic; it never saw the "
                "evaluation collection, and it cannot read the synthetic language (hence TD scores English x English). "
                "mrr_*: the qrels positive among the held-out queries' 10 candidates; the students never see these "
                "queries but the teacher was fine-tuned on them (build_tiny_models uses every training query), so "
                "this shows its fit, not generalisation. candidate_order is the collection's lexical ranking.",
    }

    examples = {"td": td_rows(scores, train_qids, queries, syn), "tt": tt_rows(train_qids, candidates, positives)}
    texts = TrainingTexts(lambda ids: [queries[i] for i in ids], {"syn": lambda ids: [syn[i] for i in ids]})
    tokenizer = AutoTokenizer.from_pretrained(models.student)
    before: dict[int, dict] = {}
    comparisons = {"main": compare(args.nway, args.seeds, args, models.student, tokenizer, texts, examples, heldout,
                                   evaluation, before)}
    if args.paper_nway:
        comparisons["paper_nway"] = compare(args.paper_nway, args.seeds[:args.paper_seeds], args, models.student,
                                            tokenizer, texts, examples, heldout, evaluation, before)
    shares = {"all": other_topic_share(examples["td"], positives, None),
              **{c["nway"]: other_topic_share(examples["td"], positives, c["nway"]) for c in comparisons.values()}}

    main_cmp = comparisons["main"]
    report = {
        "experiment": "Translate-Distill (td) vs Translate-Train (tt) students on the demo collection, tiny models",
        **{name: {figure: main_cmp[name][figure] for figure in FIGURES} for name in ("td", "tt")},
        "td_ge_tt": {**main_cmp["td_ge_tt"], "seeds_td_ge_tt": main_cmp["seeds_td_ge_tt"],
                     "interpretation": interpretation(main_cmp, comparisons.get("paper_nway"), shares,
                                                      len(candidates[collection_qids[0]]))},
        "comparisons": comparisons,
        "teacher": teacher_quality,
        "other_topic_share_of_td_passages": {str(key): value for key, value in shares.items()},
        "settings": {**vars(args), "cache": str(args.cache), "out": str(args.out), "split_seed": SPLIT_SEED,
                     "collection_queries": len(collection_qids), "heldout_queries": len(heldout_qids),
                     "extra_queries_added": added, "train_queries": len(train_qids),
                     "candidates_per_query": len(candidates[collection_qids[0]]),
                     "eval_topics": len(evaluation["topics"]), "eval_docs": len(evaluation["docs"]),
                     "teacher_max_length": TEACHER_MAX_LENGTH},
        "method": [
            ("No Ray: one process runs the Ray Train worker's loop (td_ray.distill.train.train_step and make_loss, AdamW, "
            "linear warm-up and decay, sampling seeded by (seed, step)) over in-memory batches of examples shaped like "
            "distill/examples.parquet (qid, query, pids, passages, teacher_scores)."),
            ("Training queries: the collection's training queries not held out, plus generated ones drawn the same way "
            "(demo_data.english_training_examples; the teacher was fine-tuned on the same ones); with only the collection's "
            "queries, the random-init students memorised them and did not generalise."),
            ("Both students of a seed start from the same random init (the tiny student's architecture, "
            "torch.manual_seed(seed)), so their before figures are the same, and see the same examples in the same order; "
             "queries English, passages synthetic."),
            ("td: teacher logits (English query x English passage) over each query's 10 candidates, built by "
            "td_ray.distill.data.build_examples; DistillConfig loss=kl, sampler=only_top (the nway best-scored)."),
            ("tt: the train_qrels positive with pseudo-score 1 and the 9 non-relevant candidates with 0; DistillConfig "
            "loss=contrastive, sampler=random, keep_top=true: column 0 is the positive and nway-1 negatives are drawn "
            "uniformly at each step (at nway 10, all of them). No teacher."),
            ("kendall_tau: scipy.stats.kendalltau (tau-b) between the teacher's scores and the student's dot products "
            "(English query x synthetic passage) over each held-out query's 10 candidates, averaged over queries."),
            ("ndcg: nDCG@10 (ir_measures, via td_ray.evaluate.core.evaluate_run) of exact inner-product search "
            "(FAISS IndexFlatIP) of the English eval topics over eval_docs.syn.tsv."),
            ("Top-level td and tt hold the main comparison's means over seeds; comparisons holds per-seed values, "
            "standard deviations, losses, and the comparison at the paper's nway (on the first --paper-seeds seeds)."),
        ],
        "wall_time_s": time.perf_counter() - start,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                    "cpus": os.cpu_count(), "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
    }
    write_report(report, args.out)
    print(table(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
