"""Scale harness: every stage's machinery at MS MARCO and NeuCLIR size, on one machine.

It generates an MS MARCO-shaped collection at a fraction of full size: passages whose word counts follow MS MARCO's
distribution (mean 56 words), a pre-translated Chinese-like target whose passages hold more UTF-8 bytes than the
English ones, 530 k training queries (scaled) with 50 ranked and scored candidates each, a ColBERT-X score file of
every pair, and a NeuCLIR-shaped evaluation collection of long documents with topics and graded qrels. Then it
runs the real stages over it, each in its own driver process (``td-ray <stage>``) with a local Ray cluster, on
the paths whose engine work is cheap, so that the machinery is what gets measured:

- translate: the pre-translated view over every passage, and the tiny Marian over the last 10 k passages against
  a store that already holds all the others (seeded as the actors would have committed them): the work list and
  the view are rebuilt at full size;
- score_import: a ColBERT-X score file of every pair;
- score_teacher: the tiny teacher on a slice of 20 k pairs, the other pairs' blocks seeded as a killed run
  would have left them: work list, text lookups, resume and the exactly-once table at full size;
- distill: a few hundred steps of the tiny student over the full text tables in two languages (zh and the MT
  target, mixed per passage);
- index and evaluate: the evaluation collection with the tiny student, up to ``--max-eval-docs`` documents.

Per stage and size it records wall time, the driver's peak RSS and the largest single worker's peak RSS
(sampled every 0.5 s), and per stage across sizes the growth exponent and the driver's RSS ratio (full over a
tenth). Results go to ``bench/results/scale.json``; each size's workspace is deleted after it is measured.

    .venv/bin/python bench/scale.py --sizes 0.001            # a smoke run: a few minutes
    .venv/bin/python bench/scale.py                          # 1/100, 1/10 and full MS MARCO: hours, ~60 GB disk
    .venv/bin/python bench/scale.py --sizes 1 --stages translate,score_import --add   # one more part, kept beside
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import yaml

from common import RESULTS, ROOT, ProcessTree, contention, machine_info, meets, write_report

from td_ray import schemas

logger = logging.getLogger("bench.scale")

FULL = {"passages": 8_841_823, "queries": 530_000, "candidates": 50, "eval_docs": 3_179_209, "topics": 50}
"""MS MARCO v1 passages; training queries with 50 candidates each, as the paper scores them (26.5 M pairs); NeuCLIR
2022 Chinese documents; topics per evaluation."""
MT_SLICE = 10_000
TEACHER_SLICE = 20_000
STAGES = ("translate", "score_import", "score_teacher", "distill", "index", "evaluate")
GOALS = {"growth_exponent": ("<=", 1.1), "driver_peak_rss_ratio": ("<=", 1.5)}
DEFINITIONS = {
    "seconds": "wall time of the stage's driver process (`td-ray <stage>`), Ray and MLflow start-up included",
    "driver_peak_rss_mb": "the driver's own peak RSS, sampled every 0.5 s",
    "worker_peak_rss_mb": "the peak RSS of the largest single descendant of the driver (Ray worker, raylet, GCS), "
    "sampled every 0.5 s. RSS counts file pages a process mapped (memory-mapped text lookups, shared by the node's "
    "workers through the page cache) and the object store pages it touched",
    "growth_exponent": "log(t_full / t_tenth) / log(n_full / n_tenth), n the rows the stage reads (evaluation "
    "documents for index and evaluate); 1 is linear",
    "driver_peak_rss_ratio": "the driver's peak RSS at the largest size over the size ten times smaller",
    "driver_peak_private_mb": "the driver's peak private memory: RSS less the shared pages it maps (files, Ray's "
    "object store), which the OS can drop or which the node holds once",
    "driver_peak_private_ratio": "driver_peak_private_mb at the largest size over the size ten times smaller",
}


# ------------------------------------------------------------------------------------------------ data
class Words:
    """Zipf-distributed pseudo-words (English-like) and CJK characters, drawn in bulk with numpy and joined by
    Arrow, so millions of passages are made in seconds."""

    def __init__(self, rng: np.random.Generator):
        syllables = ["ba", "ko", "ri", "tan", "mel", "su", "dor", "vi", "len", "pa", "zu", "ho", "ter", "mi", "gal",
                     "no", "fre", "sti", "qua", "ne", "lo", "rum", "ca", "vex"]
        words = {"".join(rng.choice(syllables, size=int(rng.integers(1, 4)))) for _ in range(80_000)}
        self.english = pa.array(sorted(words))
        self.english_cdf = self._zipf_cdf(len(self.english))
        self.chinese = pa.array([chr(0x4E00 + i) for i in range(4_000)])
        self.chinese_cdf = self._zipf_cdf(len(self.chinese))

    @staticmethod
    def _zipf_cdf(size: int) -> np.ndarray:
        weights = 1.0 / np.arange(1, size + 1) ** 1.05
        return np.cumsum(weights) / weights.sum()

    def texts(self, rng: np.random.Generator, lengths: np.ndarray, chinese: bool = False) -> pa.Array:
        vocabulary, cdf = (self.chinese, self.chinese_cdf) if chinese else (self.english, self.english_cdf)
        picks = np.minimum(np.searchsorted(cdf, rng.random(int(lengths.sum()))), len(vocabulary) - 1)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pc.binary_join(pa.ListArray.from_arrays(offsets, vocabulary.take(picks)), "" if chinese else " ")


def _write_tsv(path: Path, columns: dict[str, pa.Array], append: bool) -> None:
    table = pa.table(columns)
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with open(path, "ab" if append else "wb") as handle:
        pacsv.write_csv(table, handle, options)


def _write_run(path: Path, qids: np.ndarray, pids: np.ndarray, append: bool) -> None:
    """TREC run lines: each query's candidates ranked 1..50 with descending BM25-like scores."""
    per = pids.shape[1]
    scores = np.sort(np.random.default_rng(len(qids)).normal(18, 3, size=pids.shape), axis=1)[:, ::-1]
    table = pa.table({"qid": np.repeat(qids, per).astype(str), "q0": pa.repeat("Q0", pids.size),
                      "pid": pids.reshape(-1).astype(str), "rank": np.tile(np.arange(1, per + 1), len(qids)),
                      "score": np.round(scores.reshape(-1), 4), "tag": pa.repeat("bm25", pids.size)})
    options = pacsv.WriteOptions(include_header=False, delimiter=" ", quoting_style="none")
    with open(path, "ab" if append else "wb") as handle:
        pacsv.write_csv(table, handle, options)


def generate(folder: Path, fraction: float, max_eval_docs: int, seed: int = 0, eval_docs: int | None = None) -> dict:
    """Write the collection at `fraction` of full size into `folder` (`eval_docs` evaluation documents when given);
    returns its sizes."""
    rng = np.random.default_rng(seed)
    words = Words(rng)
    sizes = {name: max(1, round(count * fraction)) for name, count in FULL.items() if name != "candidates"}
    sizes["candidates"] = FULL["candidates"]
    sizes["topics"] = FULL["topics"]
    sizes["eval_docs"] = min(eval_docs or sizes["eval_docs"], max_eval_docs)
    folder.mkdir(parents=True, exist_ok=True)
    chunk = 200_000
    english_bytes = chinese_bytes = 0
    for start in range(0, sizes["passages"], chunk):
        count = min(chunk, sizes["passages"] - start)
        ids = pa.array(np.arange(start, start + count).astype(str))
        lengths = np.clip(rng.gamma(5.0, 11.2, size=count), 3, 360).astype(np.int64)
        english = words.texts(rng, lengths)
        chinese = words.texts(rng, np.maximum(1, (lengths * rng.uniform(2.0, 3.0, size=count)).astype(np.int64)),
                              chinese=True)
        english_bytes += pc.sum(pc.binary_length(english)).as_py()
        chinese_bytes += pc.sum(pc.binary_length(chinese)).as_py()
        _write_tsv(folder / "passages.tsv", {"id": ids, "text": english}, append=start > 0)
        _write_tsv(folder / "passages.zh.tsv", {"id": ids, "text": chinese}, append=start > 0)
    qids = rng.choice(np.arange(1_000_000, 10_000_000), size=sizes["queries"], replace=False)
    _write_tsv(folder / "queries.tsv", {"id": pa.array(qids.astype(str)),
                                        "text": words.texts(rng, rng.integers(3, 12, size=len(qids)))}, append=False)
    per, total = sizes["candidates"], sizes["passages"]
    step_bound = max(2, total // per)
    with open(folder / "scores.colbertx.jsonl", "w", encoding="utf-8") as scores_file:
        for start in range(0, len(qids), 20_000):
            part = qids[start:start + 20_000]
            first = rng.integers(0, total, size=len(part))
            step = rng.integers(1, step_bound, size=len(part))
            pids = (first[:, None] + step[:, None] * np.arange(per)[None, :]) % total  # distinct per query
            _write_run(folder / "candidates.trec", part, pids, append=start > 0)
            teacher = np.round(np.sort(rng.normal(-3, 2, size=pids.shape), axis=1)[:, ::-1], 4)
            for qid, row, values in zip(part.tolist(), pids.tolist(), teacher.tolist()):
                scores_file.write(json.dumps([str(qid), *([pid, value] for pid, value in zip(row, values))]) + "\n")
    for start in range(0, sizes["eval_docs"], chunk):
        count = min(chunk, sizes["eval_docs"] - start)
        ids = pa.array([f"zh-{i:08x}-doc" for i in range(start, start + count)])
        lengths = np.clip(rng.gamma(2.0, 450, size=count), 50, 20_000).astype(np.int64)  # NeuCLIR: long news
        _write_tsv(folder / "eval_docs.zh.tsv", {"id": ids, "text": words.texts(rng, lengths, chinese=True)},
                   append=start > 0)
    topic_ids = [f"t{i:03d}" for i in range(sizes["topics"])]
    _write_tsv(folder / "topics.tsv", {"id": pa.array(topic_ids),
                                       "text": words.texts(rng, rng.integers(2, 6, size=len(topic_ids)))}, append=False)
    with open(folder / "qrels.txt", "w", encoding="utf-8") as qrels:
        for topic in topic_ids:
            for doc in rng.choice(sizes["eval_docs"], size=min(30, sizes["eval_docs"]), replace=False):
                qrels.write(f"{topic} 0 zh-{doc:08x}-doc {int(rng.choice([3, 1, 0, 0]))}\n")
    return sizes | {"pairs": sizes["queries"] * per, "english_bytes_per_passage": english_bytes / total,
                    "chinese_bytes_per_passage": chinese_bytes / total}


# ------------------------------------------------------------------------------------------------ configs
def base_config(workspace: Path, data: Path, models: Path, steps: int) -> dict:
    """The pipeline config every stage runs with (score_import swaps the teacher for the score file)."""
    return {
        "workspace": str(workspace),
        "ray": {"num_cpus": os.cpu_count()},
        "data": {
            "passages": {"format": "tsv", "path": str(data / "passages.tsv")},
            "train_queries": {"format": "tsv", "path": str(data / "queries.tsv")},
            "candidates": {"format": "trec_run", "path": str(data / "candidates.trec")},
            "eval_docs": {"format": "tsv", "path": str(data / "eval_docs.zh.tsv")},
            "eval_topics": {"format": "tsv", "path": str(data / "topics.tsv")},
            "eval_qrels": {"format": "trec_qrels", "path": str(data / "qrels.txt")},
        },
        "translate": {
            "targets": [{"lang": "zh", "pretranslated": {"format": "tsv", "path": str(data / "passages.zh.tsv")}},
                        {"lang": "qaa", "model": str(models / "marian_ct2")}],
            "translate_queries": False, "decoding": {"max_decoding_length": 16}, "quality": {"retry": None},
            "batch_size": 2000, "num_actors": 1, "max_actors": 2,
        },
        "score": {"teacher": str(models / "cross_encoder"), "top_k": 50, "max_length": 64},
        "distill": {"student": str(models / "student"), "passage_lang": ["zh", "qaa"], "mixing": "mix-passages",
                    "nway": 6, "batch_size": 8, "steps": steps, "lr": 1e-4, "checkpoint_every": steps,
                    "num_workers": 1, "cpus_per_worker": 1, "passage_maxlen": 64, "query_maxlen": 16},
        "index": {"num_shards": 2, "max_length": 128, "batch_size": 256, "num_actors": 2},
        "evaluate": {"depth": 100},
    }


def seed_translation_store(config: dict, passages: int) -> int:
    """Commit the MT store's blocks for every passage but the last `MT_SLICE`, as the translate actors would
    have (the English text stands in for the translation); returns the rows seeded."""
    from td_ray.config import PipelineConfig
    from td_ray.translate import store
    from td_ray.workspace import Workspace

    config = PipelineConfig.model_validate(config)
    target = config.translate.targets[1]
    workspace = Workspace(config.workspace)
    directory = store.store_dir("passages", target.lang, store.model_slug(target, Path(target.model), config.translate))
    seeded = 0
    keep = max(0, passages - MT_SLICE)
    reader = pacsv.open_csv(config.data.passages.path, read_options=pacsv.ReadOptions(
        column_names=["id", "text"], block_size=8 << 20), parse_options=pacsv.ParseOptions(delimiter="\t",
        quote_char=False), convert_options=pacsv.ConvertOptions(column_types={"id": pa.string(), "text": pa.string()}))
    for batch in reader:  # blocks of about 20 k rows (translate commits one per actor batch, 2 k rows here)
        batch = batch.slice(0, max(0, min(batch.num_rows, keep - seeded)))
        if not batch.num_rows:
            break
        size = batch.num_rows
        workspace.commit_block(directory, pa.table({
            "id": batch.column(0), "lang": pa.repeat(target.lang, size), "mt_model": pa.repeat(target.model, size),
            "source_hash": store.text_hash(batch.column(1)), "text": batch.column(1),
            "segments": pa.repeat(pa.scalar(1, pa.int32()), size), "source_tokens": pa.repeat(pa.scalar(1, pa.int32()), size),
            "target_tokens": pa.repeat(pa.scalar(1, pa.int32()), size), "attempts": pa.repeat(pa.scalar(1, pa.int8()), size),
            "flags": pa.array([[]] * size, pa.list_(pa.string()))}), schemas.TRANSLATION_STORE, ["id", "source_hash"])
        seeded += size
    return seeded


def seed_score_blocks(config: dict) -> int:
    """Commit the imported scores of every pair but the first `TEACHER_SLICE` as the teacher run's blocks, as a
    killed run would have left them; returns the pairs seeded."""
    from td_ray import score
    from td_ray.config import PipelineConfig
    from td_ray.sources import fingerprint
    from td_ray.workspace import SCORES, Workspace

    config = PipelineConfig.model_validate(config)
    workspace = Workspace(config.workspace)
    identities = [["td_ray_source", fingerprint(source)] for source in
                  (config.data.candidates, config.data.train_queries, config.data.passages)]
    directory = f"{score.BLOCKS}/{score.inputs_key(config.score, identities)}"
    seeded = skipped = 0
    for batch in workspace.iter_batches(SCORES, batch_size=20_000):  # the stage commits one per score.batch_size pairs
        drop = max(0, min(batch.num_rows, TEACHER_SLICE - skipped))
        skipped += drop
        if batch.num_rows > drop:
            block = pa.Table.from_batches([batch.slice(drop)])
            workspace.commit_block(directory, block, schemas.SCORES, ["qid", "pid"])
            seeded += block.num_rows
    return seeded


# ------------------------------------------------------------------------------------------------ runs
def run_stage(stage: str, config: dict, work: Path, timeout: float) -> dict:
    """Run one stage in a fresh `td-ray` driver process, sampling its process tree."""
    config_path = work / f"{stage}.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log = work / f"{stage}.log"
    command = "score" if stage.startswith("score") else stage
    started = time.perf_counter()
    with log.open("wb") as handle:
        driver = subprocess.Popen([sys.executable, "-m", "td_ray.cli", command, "--config", str(config_path)],
                                  stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                  env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, start_new_session=True)
        tree = ProcessTree(driver.pid, interval=0.5)
        tree.start()
        try:
            code = driver.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(driver.pid, 9)
            driver.wait()
            code = None
        tree.stop()
    seconds = time.perf_counter() - started
    figures = {"seconds": round(seconds, 1), "completed": code == 0,
               "driver_peak_rss_mb": round(tree.root_peak_rss / 2**20, 1),
               "worker_peak_rss_mb": round(tree.largest_child_rss / 2**20, 1), "largest_worker": tree.largest_child,
               "driver_peak_private_mb": round(tree.root_peak_private / 2**20, 1),
               "worker_peak_private_mb": round(tree.largest_child_private / 2**20, 1),
               "tree_peak_rss_mb": round(tree.peak_rss / 2**20, 1), "contention_after": contention()}
    if code != 0:
        figures["error"] = "timed out" if code is None else log.read_text(errors="replace")[-2000:]
    logger.info("%-14s %8.1f s  driver %7.1f MB (private %7.1f)  worker %7.1f MB (private %7.1f)  %s", stage, seconds,
                figures["driver_peak_rss_mb"], figures["driver_peak_private_mb"], figures["worker_peak_rss_mb"],
                figures["worker_peak_private_mb"], "ok" if code == 0 else figures.get("error", "")[-300:])
    return figures


def measure_size(fraction: float, args: argparse.Namespace) -> dict:
    """Generate one size, run every stage over it, delete it; returns the figures."""
    from td_ray.assets.tiny_models import build_tiny_models

    label = f"{fraction:g}"
    work = args.root / f"size-{label}"
    shutil.rmtree(work, ignore_errors=True)
    models = build_tiny_models(args.root / "tiny-models").root
    started = time.perf_counter()
    sizes = generate(work / "data", fraction, args.max_eval_docs)
    logger.info("size %s: generated %s in %.0f s", label, sizes, time.perf_counter() - started)
    config = base_config(work / "ws", work / "data", models, args.steps)
    figures: dict = {"fraction": fraction, "sizes": sizes, "stages": {}}
    for stage in args.stages:
        if stage == "translate":
            figures["seeded_mt_rows"] = seed_translation_store(config, sizes["passages"])
            stage_config = config
        elif stage == "score_import":
            stage_config = {**config, "score": {"teacher": None, "import_scores": {
                "format": "colbertx", "path": str(work / "data" / "scores.colbertx.jsonl")}}}
        elif stage == "score_teacher":
            figures["seeded_score_pairs"] = seed_score_blocks(config)
            stage_config = config
        else:
            stage_config = config
        result = run_stage(stage, stage_config, work, args.stage_timeout)
        result["rows"] = {"translate": sizes["passages"], "score_import": sizes["pairs"],
                          "score_teacher": sizes["pairs"], "distill": sizes["pairs"],
                          "index": sizes["eval_docs"], "evaluate": sizes["eval_docs"]}[stage]
        figures["stages"][stage] = result
        if not result["completed"] and not args.keep_going:
            break
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return figures


def summarise(report: dict) -> None:
    """Per stage: growth exponent and RSS ratio between the two largest sizes, and what completed where."""
    runs = sorted(report["sizes"].values(), key=lambda run: run["fraction"])
    for stage in STAGES:
        done = [run for run in runs if run["stages"].get(stage, {}).get("completed")]
        entry = {"largest_size_reached": done[-1]["fraction"] if done else None,
                 "completed_at_full_scale": any(run["fraction"] >= 1 for run in done)}
        if len(done) >= 2:
            small, large = done[-2]["stages"][stage], done[-1]["stages"][stage]
            if large["rows"] > small["rows"]:
                entry["growth_exponent"] = round(math.log(large["seconds"] / small["seconds"])
                                                 / math.log(large["rows"] / small["rows"]), 3)
                entry["driver_peak_rss_ratio"] = round(large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 3)
                entry["driver_peak_private_ratio"] = round(large["driver_peak_private_mb"]
                                                           / small["driver_peak_private_mb"], 3)
                if small["worker_peak_rss_mb"]:
                    entry["worker_peak_rss_ratio"] = round(large["worker_peak_rss_mb"] / small["worker_peak_rss_mb"], 3)
                entry["between"] = [done[-2]["fraction"], done[-1]["fraction"]]
        report["stages"][stage] = entry


def table(report: dict) -> str:
    lines = [f"{'stage':<14} {'size':>6} {'rows':>11} {'seconds':>9} {'driver MB':>10} {'worker MB':>10}"]
    for run in sorted(report["sizes"].values(), key=lambda run: run["fraction"]):
        for stage, figures in run["stages"].items():
            lines.append(f"{stage:<14} {run['fraction']:>6g} {figures['rows']:>11,} {figures['seconds']:>9.1f} "
                         f"{figures['driver_peak_rss_mb']:>10.0f} {figures['worker_peak_rss_mb']:>10.0f}"
                         + ("" if figures["completed"] else "  NOT COMPLETED"))
    lines.append(f"\n{'stage':<14} {'growth':>8} {'goal':>6} {'rss ratio':>10} {'goal':>6}  completed at full")
    for stage, entry in report["stages"].items():
        growth, ratio = entry.get("growth_exponent"), entry.get("driver_peak_rss_ratio")
        lines.append(f"{stage:<14} {growth if growth is not None else '-':>8} "
                     f"{meets(GOALS, 'growth_exponent', growth):>6} {ratio if ratio is not None else '-':>10} "
                     f"{meets(GOALS, 'driver_peak_rss_ratio', ratio):>6}  {entry['completed_at_full_scale']}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.01,0.1,1", help="fractions of full size, comma-separated")
    parser.add_argument("--stages", default=",".join(STAGES), help="stages to run, in order")
    parser.add_argument("--steps", type=int, default=300, help="distill steps")
    parser.add_argument("--max-eval-docs", type=int, default=FULL["eval_docs"],
                        help="cap on the evaluation collection (index and evaluate)")
    parser.add_argument("--stage-timeout", type=float, default=4 * 3600, help="seconds before a stage is stopped")
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "td-ray-scale",
                        help="where the data and workspaces go")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--keep", action="store_true", help="keep each size's data and workspace")
    parser.add_argument("--keep-going", action="store_true", help="run later stages after one fails")
    parser.add_argument("--add", action="store_true",
                        help="keep the sizes already in --out and add these (a long run measured in parts)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    args.stages = [stage for stage in args.stages.split(",") if stage]
    settings = {"steps": args.steps, "max_eval_docs": args.max_eval_docs, "mt_slice": MT_SLICE,
                "teacher_slice": TEACHER_SLICE, "stages": args.stages}
    report = {"machine": machine_info(), "goals": GOALS, "definitions": DEFINITIONS, "full": FULL, "sizes": {},
              "stages": {}}
    if args.add and args.out.is_file():
        report["sizes"] = json.loads(args.out.read_text(encoding="utf-8"))["sizes"]
    for fraction in (float(size) for size in args.sizes.split(",")):
        report["sizes"][f"{fraction:g}"] = measure_size(fraction, args) | {"settings": settings}
        summarise(report)
        write_report(report, args.out)  # after every size, so a long run keeps what it measured
    report["machine"]["contention_at_end"] = contention()
    write_report(report, args.out)
    print(table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
