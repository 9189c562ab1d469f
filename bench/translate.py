"""Benchmark of the translate stage, on a random-weight Marian of opus-mt's base size built offline.

In one run it measures:

1. td-ray's translate stage (Ray Data, one CTranslate2 actor) against a bare single-process CTranslate2 loop over
   the same segments, batches, threads and decoding settings: steady state and end to end;
2. CTranslate2 against HF transformers ``generate`` on a sample of segments (same model, greedy, same length
   caps, same thread count);
3. source padding with and without length bucketing (``make_batches``);
4. peak memory of the whole job (driver and every Ray process) at 1x and 10x corpus size, with the tiny model;
5. on a machine where CTranslate2 sees a GPU, the bare loop on cuda and the GPU-hours MS MARCO would take.

    .venv/bin/python bench/translate.py          # defaults: about 15 minutes on 2 CPU cores
    .venv/bin/python bench/translate.py --help   # sizes, threads, decoding

Prints each figure against its goal and writes ``bench/results/translate.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from common import ProcessTree, contention, machine_info, meets, write_report

logger = logging.getLogger("bench.translate")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "translate.json"
BUILD_VERSION = 1
"""Bump when the base model's build changes, so cached builds are redone."""

GOALS = {"pipeline_vs_bare": (">=", 0.9), "ct2_vs_hf": (">=", 3.0), "padding_waste_bucketed": ("<=", 0.10),
         "rss_ratio_10x": ("<=", 1.2)}
MSMARCO_PASSAGES = 8_841_823
MSMARCO_TOKENS = 500e6
"""MS MARCO passage collection, in source tokens; a translation is assumed about as long as its source."""
LANG = "qaa"

# ------------------------------------------------------------------------------------------------ corpus
FUNCTION_WORDS = [
    "the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not",
    "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were", "their",
    "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will", "would", "who", "so",
    "no", "she", "other", "its", "may", "these", "about", "than", "into", "after", "first", "two", "most", "also",
    "only", "over", "such", "some", "time", "could", "them", "new", "used", "between", "under", "each", "many",
    "where", "how", "what", "why", "while", "during", "because", "through", "both", "then", "those", "very",
]
ONSETS = [
    "b", "bl", "br", "c", "ch", "cl", "cr", "d", "dr", "f", "fl", "fr", "g", "gl", "gr", "h", "j", "k", "l", "m",
    "n", "p", "pl", "pr", "qu", "r", "s", "sh", "sl", "sp", "st", "str", "t", "th", "tr", "v", "w", "wh", "z",
]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oo", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "t", "nd", "st", "ng", "ck", "rt", "m", "x", "sh"]
SUFFIXES = ["", "", "", "", "s", "ed", "ing", "er", "ly", "tion", "ment", "ness", "al", "ity", "ous"]
SENTENCES_PER_PASSAGE = (1, 2, 3, 3, 4, 4, 5, 6, 8)


class EnglishLike:
    """English-like text: real function words among Zipf-distributed pseudo-words, sentences of varied length."""

    def __init__(self, n_words: int = 50_000, seed: int = 0):
        rng = random.Random(seed)
        words: dict[str, None] = {}
        while len(words) < n_words:
            stem = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.choice((1, 2, 2, 2, 3, 3))))
            words[stem + rng.choice(CODAS) + rng.choice(SUFFIXES)] = None
        self.words = list(words)
        self.cum_weights = list(itertools.accumulate(1 / (rank + 10) for rank in range(n_words)))

    def sentence(self, rng: random.Random) -> str:
        """2-80 words (log-normal, median 14), capitalised, with commas, numbers and a final stop."""
        n = min(80, max(2, round(rng.lognormvariate(math.log(14), 0.6))))
        words = []
        for word in rng.choices(self.words, cum_weights=self.cum_weights, k=n):
            draw = rng.random()
            word = rng.choice(FUNCTION_WORDS) if draw < 0.4 else str(rng.randint(1, 2024)) if draw < 0.42 else word
            words.append(word + ("," if rng.random() < 0.05 else ""))
        words[0] = words[0].capitalize()
        return " ".join(words).rstrip(",") + rng.choice(".....?!")

    def passage(self, rng: random.Random) -> str:
        return " ".join(self.sentence(rng) for _ in range(rng.choice(SENTENCES_PER_PASSAGE)))


def write_corpus(path: Path, passages: int, seed: int) -> list[str]:
    """Write ``passages`` generated passages as MS MARCO-style TSV (``p<i><TAB>text``); return their texts."""
    language, rng = EnglishLike(seed=seed), random.Random(seed + 1)
    texts = [language.passage(rng) for _ in range(passages)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"p{i}\t{text}\n" for i, text in enumerate(texts)), encoding="utf-8")
    return texts


# ------------------------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class BaseMarian:
    """Size of the random Marian: opus-mt's base transformer."""

    d_model: int = 512
    layers: int = 6
    heads: int = 8
    ffn: int = 2048
    vocab: int = 32_000
    spm_sentences: int = 80_000
    seed: int = 0


def _train_spm(spec: BaseMarian) -> bytes:
    import sentencepiece as spm

    language, rng = EnglishLike(seed=spec.seed), random.Random(spec.seed + 2)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(language.sentence(rng) for _ in range(spec.spm_sentences)), model_writer=model,
        vocab_size=spec.vocab, model_type="unigram", character_coverage=1.0, unk_id=0, eos_id=1, bos_id=-1,
        pad_id=-1, num_threads=os.cpu_count() or 1, minloglevel=2,
    )
    return model.getvalue()


def _save_marian(out: Path, spec: BaseMarian) -> None:
    """Save the random HF Marian with its sentencepiece models, built like td-ray's tiny Marian but larger."""
    import torch
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    from td_ray.assets.tiny_models import SUPPRESSED_LOGIT_BIAS, _marian_vocab

    out.mkdir(parents=True)
    proto = _train_spm(spec)
    for name in ("source.spm", "target.spm"):
        (out / name).write_bytes(proto)
    vocab = _marian_vocab(proto)  # <pad> last: CTranslate2's Marian loader drops the last row
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    n, pad, eos, unk = len(vocab), vocab["<pad>"], vocab["</s>"], vocab["<unk>"]
    config = MarianConfig(
        vocab_size=n, decoder_vocab_size=n, d_model=spec.d_model, encoder_layers=spec.layers,
        decoder_layers=spec.layers, encoder_attention_heads=spec.heads, decoder_attention_heads=spec.heads,
        encoder_ffn_dim=spec.ffn, decoder_ffn_dim=spec.ffn, max_position_embeddings=512,
        activation_function="swish", scale_embedding=True, pad_token_id=pad, eos_token_id=eos,
        decoder_start_token_id=pad, forced_eos_token_id=None,
    )
    torch.manual_seed(spec.seed)
    model = MarianMTModel(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[pad].zero_()  # HF starts decoding from <pad>, CT2 from zeros
        model.final_logits_bias[0, [eos, unk, pad]] = SUPPRESSED_LOGIT_BIAS  # never stop early: fixed lengths
    model.generation_config = GenerationConfig(decoder_start_token_id=pad, eos_token_id=eos, pad_token_id=pad,
                                               num_beams=1, do_sample=False)
    model.save_pretrained(out)


def build_base_marian(cache: Path, spec: BaseMarian) -> tuple[Path, Path]:
    """(HF dir, CT2 dir) of the random base Marian, built once under ``cache`` and reused while ``spec`` holds."""
    from td_ray.assets.tiny_models import _convert_marian

    key = json.dumps({**asdict(spec), "build_version": BUILD_VERSION}, sort_keys=True)
    root = cache / f"marian-base-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (root / ".complete").is_file():
        logger.info("base Marian already built in %s", root)
        return root / "hf", root / "ct2"
    started = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".build-"))
    staging.chmod(0o755)
    try:
        logger.info("building the random base Marian (sentencepiece %d pieces, d_model %d) in %s",
                    spec.vocab, spec.d_model, root)
        _save_marian(staging / "hf", spec)
        _convert_marian(staging / "hf", staging / "ct2")  # also writes td_ray_mt.json (spm names, append </s>)
        (staging / ".complete").write_text(key, encoding="utf-8")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("built the base Marian in %.1f s", time.perf_counter() - started)
    return root / "hf", root / "ct2"


# ------------------------------------------------------------------------------------------------ config
def pipeline_config(workspace: Path, passages: Path, model_dir: Path, args: argparse.Namespace,
                    max_decoding_length: int):
    """The translate stage's config: one target, one actor with ``args.threads`` CT2 threads, no retries."""
    from td_ray.assets.demo_data import write_demo_collection
    from td_ray.config import parse_config
    from td_ray.pipeline import demo_config

    write_demo_collection(workspace / "demo")  # the other inputs the config names (train queries are ingested)
    (workspace / "mlflow").mkdir(parents=True, exist_ok=True)
    raw = demo_config(str(workspace)).model_dump(mode="json")
    raw["demo_assets"] = False
    raw["data"]["passages"] = {"format": "tsv", "path": str(passages)}
    raw["ray"] = {"num_cpus": args.ray_cpus}
    raw["mlflow"]["tracking_uri"] = f"sqlite:///{workspace}/mlflow/mlflow.db"  # never a URI from the environment
    raw["translate"] = {
        "targets": [{"lang": LANG, "model": str(model_dir)}], "translate_queries": False, "quality": {"retry": None},
        "decoding": {"max_decoding_length": max_decoding_length, "decoding_length_ratio": args.length_ratio},
        "batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens, "num_actors": 1,
        "num_cpus_per_actor": args.threads, "intra_threads": args.threads, "inter_threads": 1, "device": "cpu",
    }
    if args.compute_type:
        raw["translate"]["compute_type"] = args.compute_type
    raw["distill"]["passage_lang"] = LANG
    return parse_config(raw, source="bench/translate.py")


# ------------------------------------------------------------------------------------------------ measurements
def segment_blocks(model_dir: Path, texts: list[str], settings) -> tuple[list[list[list[str]]], float]:
    """Source segments of each block of ``settings.batch_size`` passages (the actors' unit), and the seconds taken."""
    from td_ray.translate.core import SentencePieceCodec, segment_text

    started = time.perf_counter()
    codec = SentencePieceCodec(model_dir)
    blocks = [[segment for text in texts[start:start + settings.batch_size]
               for segment in segment_text(codec, text, settings)]
              for start in range(0, len(texts), settings.batch_size)]
    return blocks, time.perf_counter() - started


def padding(blocks: list[list[list[str]]], max_batch_tokens: int) -> dict:
    """Padding waste (1 - real tokens / padded positions) with and without bucketing, per block and corpus-wide,
    and per block at other token budgets."""
    from td_ray.translate.core import make_batches, padded_positions

    def waste(groups: list[list[int]], bucketing: bool, budget: int = max_batch_tokens) -> float:
        real = positions = 0
        for lengths in groups:
            real += sum(lengths)
            positions += padded_positions(lengths, make_batches(lengths, budget, bucketing))
        return 1 - real / positions

    per_block = [[len(segment) for segment in block] for block in blocks]
    corpus = [[length for lengths in per_block for length in lengths]]
    budgets = sorted({512, 1024, 2048, 4096, max_batch_tokens})
    batches = sum(len(make_batches(lengths, max_batch_tokens, True)) for lengths in per_block)
    return {"per_block_bucketed": waste(per_block, True), "per_block_unbucketed": waste(per_block, False),
            "batches_per_block_bucketed": batches / len(per_block),
            "segments_per_batch_bucketed": len(corpus[0]) / batches,
            "corpus_wide_bucketed": waste(corpus, True), "corpus_wide_unbucketed": waste(corpus, False),
            "per_block_bucketed_by_max_batch_tokens": {budget: waste(per_block, True, budget) for budget in budgets},
            "max_batch_tokens": max_batch_tokens, "segments": len(corpus[0]), "source_tokens": sum(corpus[0])}


def bare_loop(model_dir: Path, blocks: list[list[list[str]]], settings) -> dict:
    """Target tokens/s of td-ray's own translate_segments over the blocks, in this process, without Ray."""
    from td_ray.translate.actor import open_translator
    from td_ray.translate.core import BatchStats, SentencePieceCodec, translate_segments

    started = time.perf_counter()
    translator = open_translator(str(model_dir), settings)
    codec = SentencePieceCodec(model_dir)
    load_seconds = time.perf_counter() - started
    translate_segments(translator, codec, blocks[0][:8], settings, settings.decoding)  # warm-up, not timed
    totals = BatchStats()
    cpu, started = time.process_time(), time.perf_counter()
    for segments in blocks:
        totals.add(translate_segments(translator, codec, segments, settings, settings.decoding)[1])
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    threads = settings.intra_threads * settings.inter_threads
    return {"device": translator.device, "compute_type": translator.compute_type, "threads": threads,
            "load_seconds": load_seconds, "seconds": seconds, "blocks": len(blocks), "segments": totals.segments,
            "source_tokens": totals.source_tokens, "target_tokens": totals.target_tokens,
            "tokens_per_s": totals.target_tokens / seconds, "cpu_seconds": cpu,
            "tokens_per_cpu_s": totals.target_tokens / cpu, "cpu_share_of_threads": cpu / (seconds * threads)}


def hf_vs_ct2(hf_dir: Path, ct2_dir: Path, segments: list[list[str]], settings, threads: int) -> dict:
    """Target tokens/s of HF ``generate`` and of CTranslate2 (at the stage's compute type, float32 and int8) over
    the same batches of ``segments``. The engines take turns batch by batch, so changing load hits them alike."""
    import torch
    from transformers import MarianMTModel

    from td_ray.translate.actor import open_translator
    from td_ray.translate.core import (
        SentencePieceCodec,
        _decoding_cap,
        make_batches,
        translate_segments,
    )

    codec = SentencePieceCodec(ct2_dir)
    translators = {}
    for requested in (settings.compute_type, "float32", "int8"):
        translator = open_translator(str(ct2_dir), settings.model_copy(update={"compute_type": requested}))
        translators.setdefault(translator.compute_type, translator)
    torch.set_num_threads(threads)
    model = MarianMTModel.from_pretrained(hf_dir).eval()
    vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    pieces = {index: piece for piece, index in vocab.items()}
    pad, unk = vocab["<pad>"], vocab["<unk>"]

    def hf(batch: list[list[str]]) -> list[tuple[str, int]]:
        longest = max(map(len, batch))
        ids = torch.full((len(batch), longest), pad)
        for row, segment in enumerate(batch):
            ids[row, :len(segment)] = torch.tensor([vocab.get(piece, unk) for piece in segment])
        with torch.inference_mode():
            output = model.generate(input_ids=ids, attention_mask=(ids != pad).long(), num_beams=1, do_sample=False,
                                    max_new_tokens=_decoding_cap(settings.decoding, longest))[:, 1:]
        tokens = [[pieces[int(i)] for i in row if int(i) != pad] for row in output]
        return [(codec.decode(row), len(row)) for row in tokens]

    def ct2(translator):
        def run(batch: list[list[str]]) -> list[tuple[str, int]]:
            outputs, _ = translate_segments(translator, codec, batch, settings, settings.decoding)
            return [(text, count) for text, count, _ in outputs]
        return run

    engines = {"hf": hf, **{f"ct2_{name}": ct2(translator) for name, translator in translators.items()}}
    lengths = [len(segment) for segment in segments]
    batches = [[segments[i] for i in batch]
               for batch in make_batches(lengths, settings.max_batch_tokens, settings.length_bucketing)]
    totals = {name: {"seconds": 0.0, "cpu_seconds": 0.0, "target_tokens": 0} for name in engines}
    texts: dict[str, list[str]] = {name: [] for name in engines}
    for engine in engines.values():
        engine(batches[0][:4])  # warm-up
    for batch in batches:
        for name, engine in engines.items():
            wall, cpu = time.perf_counter(), time.process_time()
            outputs = engine(batch)
            totals[name]["seconds"] += time.perf_counter() - wall
            totals[name]["cpu_seconds"] += time.process_time() - cpu
            totals[name]["target_tokens"] += sum(count for _, count in outputs)
            texts[name] += [text for text, _ in outputs]
    for figures in totals.values():
        figures["tokens_per_s"] = figures["target_tokens"] / figures["seconds"]
        figures["tokens_per_cpu_s"] = figures["target_tokens"] / figures["cpu_seconds"]
    identical = sum(a == b for a, b in zip(texts["hf"], texts["ct2_float32"])) / len(segments)
    return {"segments": len(segments), "source_tokens": sum(lengths), "batches": len(batches), "threads": threads,
            "hf_dtype": str(model.dtype), "stage_compute_type": next(iter(translators)), **totals,
            "identical_outputs_hf_vs_ct2_float32": identical}


def gpu_figures(ct2_dir: Path, blocks: list[list[list[str]]], settings) -> tuple[dict | None, str | None]:
    """The bare loop on cuda and the GPU-hours it projects for MS MARCO into one language, or why not measured."""
    import ctranslate2

    if ctranslate2.get_cuda_device_count() == 0:
        return None, "CTranslate2 sees no CUDA device on this machine"
    figures = bare_loop(ct2_dir, blocks, settings.model_copy(update={"device": "cuda", "compute_type": "auto"}))
    figures["msmarco_gpu_hours_one_language"] = MSMARCO_TOKENS / figures["tokens_per_s"] / 3600
    return figures, None


# ------------------------------------------------------------------------------------------------ drivers
def run_driver(kind: str, config, args: argparse.Namespace, memory: bool) -> tuple[dict, ProcessTree]:
    """Run the translate stage (``kind`` "stage") or the bare loop over its input ("bare") in a fresh process,
    started alike; its result and its process tree's samples."""
    workspace = Path(config.workspace)
    spec, out, log = (workspace / f"{kind}-{name}" for name in ("spec.json", "result.json", "driver.log"))
    spec.write_text(json.dumps({"kind": kind, "config": config.model_dump(mode="json"), "out": str(out)}),
                    encoding="utf-8")
    env = {**os.environ, "RAY_worker_niceness": str(args.ray_worker_niceness), "MLFLOW_DISABLE_TELEMETRY": "true"}
    with log.open("wb") as handle:
        driver = subprocess.Popen([sys.executable, __file__, "--driver", str(spec)], stdout=handle,
                                  stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        tree = ProcessTree(driver.pid, interval=0.2 if memory else 0.5, pss=memory)
        tree.start()
        code = driver.wait()
        tree.stop()
    if code:
        raise RuntimeError(f"the {kind} driver failed (exit {code}); its log {log} ends:\n"
                           + log.read_text(errors="replace")[-3000:])
    return json.loads(out.read_text(encoding="utf-8")), tree


def driver_main(spec_path: Path) -> None:
    """Body of a driver process: run the stage or the bare loop, write the result."""
    from td_ray.config import parse_config

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    config = parse_config(spec["config"])
    if spec["kind"] == "bare":
        model_dir = Path(config.translate.targets[0].model)
        passages = Path(config.data.passages.path).read_text(encoding="utf-8").splitlines()
        blocks, _ = segment_blocks(model_dir, [line.split("\t", 1)[1] for line in passages], config.translate)
        result = bare_loop(model_dir, blocks, config.translate)
    else:
        import ray
        import ray.data

        from td_ray import translate

        ray.data.DataContext.get_current().enable_progress_bars = False
        wall_start = time.time()
        stage = translate.run(config)
        wall_end = time.time()
        ray.shutdown()
        result = {"rows": stage.rows, "seconds": stage.seconds, "metrics": stage.metrics,
                  "wall_start": wall_start, "wall_end": wall_end}
    Path(spec["out"]).write_text(json.dumps(result), encoding="utf-8")


def committed_blocks(workspace: Path) -> list[tuple[float, int, int]]:
    """(commit time, target tokens, rows) of every block in the passages store, in commit order."""
    import pyarrow.parquet as pq

    found = []
    for path in workspace.glob("translate/store/passages/lang=*/mt=*/part-*.parquet"):
        tokens = pq.read_table(path, columns=["target_tokens"])["target_tokens"]
        found.append((path.stat().st_mtime_ns / 1e9, sum(tokens.to_pylist()), len(tokens)))
    return sorted(found)


def pipeline_run(config, args: argparse.Namespace) -> dict:
    """td-ray's translate stage: its own metrics, and steady-state throughput from the commit times of its blocks."""
    result, tree = run_driver("stage", config, args, memory=False)
    blocks = committed_blocks(Path(config.workspace))
    metrics = result["metrics"]
    tokens = metrics["translated_target_tokens"]
    first, last = blocks[0][0], blocks[-1][0]
    steady = len(blocks) > 1
    steady_tokens = sum(block_tokens for _, block_tokens, _ in blocks[1:])
    steady_cpu = tree.cpu_at(last) - tree.cpu_at(first)
    return {
        "rows": result["rows"], "blocks": len(blocks), "target_tokens": tokens,
        "source_tokens": metrics["translated_source_tokens"], "segments": metrics["translated_segments"],
        "stage_seconds": result["seconds"], "end_to_end_tokens_per_s": tokens / result["seconds"],
        "streaming_seconds": metrics["translate_seconds"], "streaming_tokens_per_s": metrics["tokens_per_s"],
        "steady_tokens": steady_tokens, "steady_seconds": last - first,
        "steady_tokens_per_s": steady_tokens / (last - first) if steady else None,
        "steady_cpu_seconds": steady_cpu, "steady_tokens_per_cpu_s": steady_tokens / steady_cpu if steady else None,
        "job_cpu_seconds": tree.cpu_series[-1][1],
        "seconds_to_first_block": first - result["wall_start"], "seconds_after_last_block": result["wall_end"] - last,
        "padding_ratio": metrics["padding_ratio"], "ray_worker_niceness": args.ray_worker_niceness,
    }


def rss_run(passages: int, model_dir: Path, work: Path, args: argparse.Namespace) -> dict:
    """Peak memory of the translate stage over ``passages`` passages (tiny model), in a fresh driver."""
    workspace = work / f"rss-{passages}"
    write_corpus(workspace / "passages.tsv", passages, args.seed)
    config = pipeline_config(workspace, workspace / "passages.tsv", model_dir, args, args.rss_max_decoding_length)
    logger.info("peak memory: translating %d passages with the tiny model in a fresh driver", passages)
    result, tree = run_driver("stage", config, args, memory=True)
    return {"passages": passages, "rows": result["rows"], "stage_seconds": result["seconds"],
            "target_tokens": result["metrics"]["translated_target_tokens"], "peak_rss_bytes": tree.peak_rss,
            "peak_pss_bytes": tree.peak_pss, "processes_at_peak": tree.processes_at_peak,
            "samples": len(tree.cpu_series)}


# ------------------------------------------------------------------------------------------------ report
def table(report: dict) -> str:
    """Each headline figure against its goal, then the raw figures behind them."""
    lines = [f"{'figure':<34} {'measured':>9} {'goal':>8}  met"]
    for name in ("pipeline_vs_bare", "pipeline_vs_bare_end_to_end", "pipeline_vs_bare_streaming",
                 "pipeline_vs_bare_cpu", "ct2_vs_hf", "ct2_vs_hf_cpu", "padding_waste_bucketed",
                 "padding_waste_unbucketed", "rss_ratio_10x", "pss_ratio_10x"):
        value = report[name]
        goal = " ".join(map(str, GOALS[name])) if name in GOALS else "-"
        shown = f"{value:.3f}" if value is not None else "n/a"
        lines.append(f"{name:<34} {shown:>9} {goal:>8}  {meets(GOALS, name, value)}")
    lines.append(f"{'gpu':<34} {'null' if report['gpu'] is None else 'measured':>9}  {report['gpu_reason'] or ''}")
    bare, pipe, hf, pad = report["bare"], report["pipeline"], report["hf_vs_ct2"], report["padding"]
    runs = ", ".join(f"{run['tokens_per_s']:.1f} ({run['seconds']:.0f} s, CPU share {run['cpu_share_of_threads']:.2f})"
                     for run in bare["runs"])
    ct2 = ", ".join(f"{name[4:]} {hf[name]['tokens_per_s']:.1f}" for name in hf if name.startswith("ct2_"))
    by_budget = pad["per_block_bucketed_by_max_batch_tokens"]
    budgets = ", ".join(f"{budget}: {waste:.3f}" for budget, waste in by_budget.items())
    lines += [
        "",
        (f"bare CT2 loop  {bare['tokens_per_s']:8.1f} target tok/s, the faster of before/after the stage: {runs}; "
         f"{bare['runs'][0]['target_tokens']} tokens, {bare['runs'][0]['segments']} segments, "
         f"{bare['runs'][0]['compute_type']}, {bare['runs'][0]['threads']} threads"),
        (f"pipeline       {pipe['steady_tokens_per_s'] or 0:8.1f} target tok/s steady ({pipe['steady_tokens']} tokens "
         f"from the first to the last of {pipe['blocks']} block commits, {pipe['steady_seconds']:.1f} s)"),
        (f"               {pipe['streaming_tokens_per_s']:8.1f} target tok/s streaming (metrics['tokens_per_s'], "
         f"{pipe['streaming_seconds']:.1f} s)"),
        (f"               {pipe['end_to_end_tokens_per_s']:8.1f} target tok/s end to end ({pipe['target_tokens']:.0f} "
         f"tokens, {pipe['rows']} rows, {pipe['stage_seconds']:.1f} s; first block after "
         f"{pipe['seconds_to_first_block']:.1f} s, {pipe['seconds_after_last_block']:.1f} s after the last)"),
        (f"               {pipe['steady_tokens_per_cpu_s'] or 0:8.1f} target tok per CPU-s of the whole job, steady "
         f"(bare: {bare['tokens_per_cpu_s']:.1f})"),
        (f"HF generate    {hf['hf']['tokens_per_s']:8.1f} target tok/s vs CT2 {ct2} ({hf['segments']} segments; "
         f"HF output = CT2 float32 output for {hf['identical_outputs_hf_vs_ct2_float32']:.0%})"),
        (f"padding        corpus-wide {pad['corpus_wide_bucketed']:.3f} bucketed, {pad['corpus_wide_unbucketed']:.3f} "
         f"unbucketed; the stage reported {pipe['padding_ratio']:.3f}; per block by max_batch_tokens: {budgets}; "
         f"{pad['segments_per_batch_bucketed']:.1f} segments per bucketed batch"),
    ]
    for run in report["rss"]:
        lines.append(f"peak memory    {run['passages']:>6} passages: RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB, "
                     f"PSS {run['peak_pss_bytes'] / 2**30:.2f} GiB ({run['processes_at_peak']} processes, "
                     f"stage {run['stage_seconds']:.1f} s)")
    for phase, busy in report["machine"]["contention_per_phase"].items():
        pressure = busy["cpu_pressure_avg60"]
        lines.append(f"contention     {phase:<12} load average {busy['load_average_1m']:5.1f} on "
                     f"{report['machine']['cpu_count']} CPUs, CPU pressure "
                     + (f"{pressure:.0%}" if pressure is not None else "n/a") + " (tasks waiting for a CPU, 60 s)")
    return "\n".join(lines)


DEFINITIONS = {
    "pipeline_vs_bare": "pipeline steady-state target tokens/s over the bare loop's. Steady state: the target tokens "
    "of every committed store block but the first, over the time from the first block's commit to the last's "
    "(file modification times), so Ray/MLflow start-up, model load and the first block are excluded, while "
    "per-block overheads (Ray Data hand-off, segmentation, quality checks, Parquet commits) are included.",
    "pipeline_vs_bare_end_to_end": "pipeline target tokens over the whole stage's wall time (StageResult.seconds: "
    "ingest, MLflow, Ray start, actor start, model load, translation, view and manifest), over the bare loop's "
    "tokens/s.",
    "pipeline_vs_bare_streaming": "the stage's own metrics['tokens_per_s'] (target tokens over the Ray Data "
    "streaming time, actor start and model load included) over the bare loop's tokens/s.",
    "pipeline_vs_bare_cpu": "target tokens per CPU-second, pipeline over bare: the pipeline's CPU time is that of "
    "the driver and every Ray process (sampled every 0.5 s) between the first and the last block commit; the bare "
    "loop's is its process time. Less sensitive than wall time to other load on the machine, though CPU time per "
    "token also grows under contention (threads spin while their partner thread waits for a core).",
    "bare": "td_ray.translate.core.translate_segments over the same segments, block by block (batch_size passages, "
    "as the actor sees them), with a translator from td_ray.translate.actor.open_translator and the stage's "
    "settings, in a fresh process started like the stage's driver; model load and a warm-up call are not timed, "
    "segmentation is done beforehand. Run before and after the stage; tokens_per_s (and tokens_per_cpu_s) is the "
    "faster run's: other load only slows a run down, so the faster one is the better estimate of the engine, and "
    "the pipeline's single run against it gives a conservative ratio.",
    "like_with_like": "CT2 intra_threads = --threads in the bare loop and the actor (one actor, num_cpus_per_actor = "
    "threads); the local Ray cluster has threads + 1 logical CPUs so Ray Data's read tasks can be scheduled beside "
    "the actor; Ray workers run at niceness --ray-worker-niceness (RAY_worker_niceness; Ray's default is 15), "
    "the bare loop at the benchmark's own. Blocks hold --batch-size passages (64, not the stage's default 1000, so "
    "the steady state spans several blocks; per-block costs weigh more than they would at the default).",
    "ct2_vs_hf": "CTranslate2 target tokens/s at the stage's compute_type over HF MarianMTModel.generate's (float32, "
    "greedy), over the segments of the first --hf-blocks blocks batched as the stage batches them, same per-batch "
    "max length, torch.set_num_threads = CT2 intra_threads; the engines take turns batch by batch. ct2_vs_hf_cpu "
    "is the same ratio per CPU-second of the benchmark's process.",
    "padding_waste": "1 - real source tokens / padded positions (batch size x longest segment) of make_batches, "
    "per block of batch_size passages as the stage batches them; corpus-wide figures are in padding.",
    "rss_ratio_10x": "peak summed RSS of the driver and all its descendants (Ray GCS, raylet, workers, ...) sampled "
    "every 0.2 s, at 10x the passages over 1x, each in a fresh driver process running the stage with the tiny "
    "model. RSS counts shared memory once per process; PSS (shared pages split) is reported beside it.",
}


def summarise(report: dict, args: argparse.Namespace) -> None:
    """Add the headline ratios, computed from the raw figures, to ``report``."""
    bare, pipe, hf, pad, rss = (report[name] for name in ("bare", "pipeline", "hf_vs_ct2", "padding", "rss"))
    bare["tokens_per_s"] = max(run["tokens_per_s"] for run in bare["runs"])
    bare["tokens_per_cpu_s"] = max(run["tokens_per_cpu_s"] for run in bare["runs"])
    steady = pipe["steady_tokens_per_s"]
    report["pipeline_vs_bare"] = steady / bare["tokens_per_s"] if steady else None
    report["pipeline_vs_bare_end_to_end"] = pipe["end_to_end_tokens_per_s"] / bare["tokens_per_s"]
    report["pipeline_vs_bare_streaming"] = pipe["streaming_tokens_per_s"] / bare["tokens_per_s"]
    report["pipeline_vs_bare_cpu"] = (pipe["steady_tokens_per_cpu_s"] / bare["tokens_per_cpu_s"]
                                      if pipe["steady_tokens_per_cpu_s"] else None)
    report["same_target_tokens_bare_and_pipeline"] = pipe["target_tokens"] == bare["runs"][0]["target_tokens"]
    engines = [name for name in hf if name.startswith("ct2_")]
    stage = hf[f"ct2_{hf['stage_compute_type']}"]
    report["ct2_vs_hf"] = stage["tokens_per_s"] / hf["hf"]["tokens_per_s"]
    report["ct2_vs_hf_cpu"] = stage["tokens_per_cpu_s"] / hf["hf"]["tokens_per_cpu_s"]
    report["ct2_vs_hf_by_compute_type"] = {name[4:]: hf[name]["tokens_per_s"] / hf["hf"]["tokens_per_s"]
                                           for name in engines}
    report["padding_waste_bucketed"] = pad["per_block_bucketed"]
    report["padding_waste_unbucketed"] = pad["per_block_unbucketed"]
    report["rss_ratio_10x"] = rss[1]["peak_rss_bytes"] / rss[0]["peak_rss_bytes"]
    report["pss_ratio_10x"] = rss[1]["peak_pss_bytes"] / rss[0]["peak_pss_bytes"]
    report["msmarco_cpu_hours_one_language"] = {
        "bare": MSMARCO_TOKENS / bare["tokens_per_s"] / 3600,
        "pipeline_steady": MSMARCO_TOKENS / steady / 3600 if steady else None, "threads": args.threads,
        "assumes": f"{MSMARCO_TOKENS:.0f} target tokens ({MSMARCO_PASSAGES} passages), this model size and machine"}


# ------------------------------------------------------------------------------------------------ main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--passages", type=int, default=300, help="passages of the main corpus")
    parser.add_argument("--hf-blocks", type=int, default=1,
                        help="HF-vs-CT2 sample: the segments of this many blocks of batch_size passages")
    parser.add_argument("--rss-passages", type=int, default=None,
                        help="passages of the 1x peak-memory run (default: --passages)")
    parser.add_argument("--rss-scale", type=int, default=10, help="the larger peak-memory run is this many times 1x")
    parser.add_argument("--rss-max-decoding-length", type=int, default=24,
                        help="max_decoding_length of the peak-memory runs (keeps the tiny model's runs short)")
    parser.add_argument("--threads", type=int, default=2,
                        help="CT2 intra_threads (bare loop and actor), torch threads for HF, num_cpus_per_actor")
    parser.add_argument("--ray-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray cluster (default: threads + 1, so Ray Data's read tasks "
                        "can be scheduled beside an actor that reserves `threads` CPUs)")
    parser.add_argument("--ray-worker-niceness", type=int, default=0,
                        help="niceness of Ray's worker processes (Ray's own default, 15, starves the actor whenever "
                        "anything else wants the CPU)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="passages per block, i.e. per actor call and store file (translate.batch_size; the "
                        "stage's default, 1000, would leave this corpus one block and no steady state to measure)")
    parser.add_argument("--max-batch-tokens", type=int, default=4096, help="translate.max_batch_tokens")
    parser.add_argument("--compute-type", default=None, help="translate.compute_type (default: the stage's default)")
    parser.add_argument("--max-decoding-length", type=int, default=256, help="translate.decoding.max_decoding_length")
    parser.add_argument("--length-ratio", type=float, default=1.2,
                        help="translate.decoding.decoding_length_ratio (random weights never emit </s>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "td-ray-bench",
                        help="where the base and tiny models are built once and reused")
    parser.add_argument("--work-dir", type=Path, default=None, help="where workspaces go (a temp dir, removed after)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON report")
    parser.add_argument("--driver", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.driver:
        driver_main(args.driver)
        return 0
    args.ray_cpus = args.ray_cpus or args.threads + 1
    args.rss_passages = args.rss_passages or args.passages
    started = time.perf_counter()
    report: dict = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "args": {name: str(value) if isinstance(value, Path) else value
                             for name, value in vars(args).items() if name != "driver"},
                    "machine": machine_info(), "goals": GOALS, "definitions": DEFINITIONS}
    spec = BaseMarian(seed=args.seed)
    hf_dir, ct2_dir = build_base_marian(args.cache, spec)
    report["model"] = {**asdict(spec), "hf_dir": str(hf_dir), "ct2_dir": str(ct2_dir)}
    busy = report["machine"]["contention_per_phase"] = {}

    work = Path(tempfile.mkdtemp(prefix="td-ray-bench-", dir=args.work_dir))
    try:
        workspace = work / "main"
        texts = write_corpus(workspace / "passages.tsv", args.passages, args.seed)
        config = pipeline_config(workspace, workspace / "passages.tsv", ct2_dir, args, args.max_decoding_length)
        settings = config.translate
        blocks, segment_seconds = segment_blocks(ct2_dir, texts, settings)
        segments = [segment for block in blocks for segment in block]
        report["corpus"] = {"passages": len(texts), "words": sum(len(text.split()) for text in texts),
                            "segments": len(segments), "source_tokens": sum(map(len, segments)),
                            "segment_seconds": segment_seconds}
        report["settings"] = {"threads": args.threads, "ray_cpus": args.ray_cpus,
                              "ray_worker_niceness": args.ray_worker_niceness, "num_actors": settings.num_actors,
                              "num_cpus_per_actor": settings.num_cpus_per_actor, "batch_size": settings.batch_size,
                              "max_batch_tokens": settings.max_batch_tokens, "compute_type": settings.compute_type,
                              "decoding": settings.decoding.model_dump()}
        report["padding"] = padding(blocks, settings.max_batch_tokens)
        logger.info("corpus: %d passages, %d segments, %d source tokens", len(texts), len(segments),
                    report["corpus"]["source_tokens"])

        runs = []
        for phase in ("bare_before", "pipeline", "bare_after"):
            busy[phase] = contention()
            logger.info("%s", phase)
            if phase == "pipeline":
                report["pipeline"] = pipeline_run(config, args)
            else:
                runs.append(run_driver("bare", config, args, memory=False)[0])
                if runs[-1]["seconds"] < 60:
                    logger.warning("the bare loop ran %.0f s, under a minute", runs[-1]["seconds"])
        report["bare"] = {"runs": runs}

        busy["hf_vs_ct2"] = contention()
        sample = [segment for block in blocks[:args.hf_blocks] for segment in block]
        logger.info("HF generate vs CTranslate2 on %d segments", len(sample))
        report["hf_vs_ct2"] = hf_vs_ct2(hf_dir, ct2_dir, sample, settings, args.threads)

        busy["rss"] = contention()
        from td_ray.assets.tiny_models import build_tiny_models

        tiny = build_tiny_models(args.cache / "tiny-models").marian_ct2
        report["rss"] = [rss_run(n, tiny, work, args) for n in (args.rss_passages, args.rss_passages * args.rss_scale)]

        report["gpu"], report["gpu_reason"] = gpu_figures(ct2_dir, blocks, settings)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summarise(report, args)
    report["machine"]["contention_at_end"] = contention()
    report["seconds"] = time.perf_counter() - started
    write_report(report, args.out)
    print(table(report))
    print(f"\nwrote {args.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
