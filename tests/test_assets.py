"""Tests for the generated demo collection and the tiny offline models."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import ctranslate2
import ir_measures
import pytest
import sentencepiece as spm
import torch
from ir_measures import nDCG
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    MarianMTModel,
    MarianTokenizer,
)

from td_ray.assets import tiny_models
from td_ray.assets.build import COMPLETE_MARKER
from td_ray.assets.demo_data import (
    SECOND_SYNTHETIC_LANG,
    SYNTHETIC_LANG,
    DemoSizes,
    corpus_sentences,
    english_training_examples,
    write_demo_collection,
)
from td_ray.assets.tiny_models import TinyModels, build_tiny_models

SIZES = DemoSizes()


def read_tsv(path: Path) -> dict[str, str]:
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, text = line.split("\t")
        rows[key] = text
    return rows


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    for line in path.read_text(encoding="utf-8").splitlines():
        qid, _, did, rel = line.split()
        qrels[qid][did] = int(rel)
    return qrels


def words(text: str) -> list[str]:
    return [w.strip(".").lower() for w in text.split()]


def overlap(query: str, text: str) -> int:
    """Number of query words that occur in ``text``."""
    return len(set(query.split()) & set(words(text)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_demo_collection(tmp_path_factory.mktemp("demo"), SIZES, seed=0)


@pytest.fixture(scope="module")
def models(assets_root: Path) -> TinyModels:
    """The session's tiny models (seed 0), built once for every test file."""
    return TinyModels.under(assets_root / "tiny-models")


# ---------------------------------------------------------------- demo collection


def test_demo_files_and_determinism(demo: dict[str, Path], tmp_path: Path) -> None:
    assert set(demo) == {
        "passages", "passages_syn", "passages_qsy", "train_queries", "train_qrels", "candidates",
        "eval_docs", "eval_docs_syn", "eval_docs_qsy", "eval_topics", "eval_qrels", "lexicon", "lexicon_qsy",
    }
    assert demo["passages_syn"].name == f"passages.{SYNTHETIC_LANG}.tsv"
    assert demo["passages_qsy"].name == f"passages.{SECOND_SYNTHETIC_LANG}.tsv"
    again = write_demo_collection(tmp_path / "same", SIZES, seed=0)
    other = write_demo_collection(tmp_path / "other", SIZES, seed=1)
    for key, path in demo.items():
        assert again[key].read_bytes() == path.read_bytes(), key
    for key in ("passages", "passages_syn", "train_queries", "candidates", "eval_docs", "eval_topics"):
        assert other[key].read_bytes() != demo[key].read_bytes(), key
    assert not [p for p in (tmp_path / "same").iterdir() if p.name.startswith(".")], "temp files left behind"


def test_demo_sizes_and_text_format(demo: dict[str, Path]) -> None:
    passages = read_tsv(demo["passages"])
    assert list(passages) == [f"p{i}" for i in range(SIZES.n_passages)]
    assert len(read_tsv(demo["train_queries"])) == SIZES.n_train_queries
    assert list(read_tsv(demo["eval_docs"])) == [f"d{i}" for i in range(SIZES.n_eval_docs)]
    assert list(read_tsv(demo["eval_topics"])) == [f"t{i}" for i in range(SIZES.n_eval_topics)]
    for text in [*passages.values(), *read_tsv(demo["passages_syn"]).values()]:
        sentences = text[:-1].split(". ")
        assert text.endswith(".") and 2 <= len(sentences) <= 4
        for sentence in sentences:
            assert sentence[0].isupper() and 6 <= len(sentence.split()) <= 14


@pytest.mark.parametrize("lang", ["syn", "qsy"])
def test_synthetic_text_is_word_for_word_translation(demo: dict[str, Path], lang: str) -> None:
    lexicon = read_tsv(demo["lexicon" if lang == "syn" else f"lexicon_{lang}"])
    assert len(set(lexicon.values())) == len(lexicon), "lexicon must be a bijection"
    assert not set(lexicon) & set(lexicon.values()), "the two languages must not share words"
    other = read_tsv(demo["lexicon_qsy" if lang == "syn" else "lexicon"])
    assert not set(lexicon.values()) & set(other.values()), "the two synthetic languages must not share words"
    for en_key, syn_key in (("passages", f"passages_{lang}"), ("eval_docs", f"eval_docs_{lang}")):
        english, synthetic = read_tsv(demo[en_key]), read_tsv(demo[syn_key])
        assert list(english) == list(synthetic)
        for pid, text in english.items():
            assert [lexicon[w] for w in words(text)] == words(synthetic[pid]), pid
            assert [w[-1] == "." for w in text.split()] == [w[-1] == "." for w in synthetic[pid].split()]


def test_candidates_contain_positive_and_mix_topics(demo: dict[str, Path]) -> None:
    queries, passages = read_tsv(demo["train_queries"]), read_tsv(demo["passages"])
    positives = read_qrels(demo["train_qrels"])
    run: dict[str, list[tuple[int, str, float]]] = defaultdict(list)
    for line in demo["candidates"].read_text().splitlines():
        qid, q0, pid, rank, score, tag = line.split()
        assert (q0, tag) == ("Q0", "demo-bm25") and pid in passages
        run[qid].append((int(rank), pid, float(score)))
    assert set(run) == set(queries) == set(positives)
    for qid, rows in run.items():
        assert [r for r, _, _ in rows] == list(range(1, SIZES.candidates_per_query + 1))
        pids = [p for _, p, _ in rows]
        scores = [s for _, _, s in rows]
        assert len(set(pids)) == len(pids) == SIZES.candidates_per_query
        assert scores == sorted(scores, reverse=True)
        (positive,) = positives[qid]
        assert positive in pids
        query = queries[qid]
        assert overlap(query, passages[positive]) == len(query.split()), "query words come from its positive"
        overlaps = [overlap(query, passages[p]) for p in pids]
        assert min(overlaps) == 0 < max(overlaps), "candidates mix matching and other-topic passages"


def test_eval_relevance_is_learnable(demo: dict[str, Path]) -> None:
    topics, docs = read_tsv(demo["eval_topics"]), read_tsv(demo["eval_docs"])
    qrels = read_qrels(demo["eval_qrels"])
    assert set(qrels) == set(topics)
    relevant_overlap, nonrelevant_overlap, reciprocal_ranks = [], [], []
    for tid, judged in qrels.items():
        assert 2 in judged.values() and 0 in judged.values()
        for did, rel in judged.items():
            (relevant_overlap if rel >= 1 else nonrelevant_overlap).append(overlap(topics[tid], docs[did]))
        ranking = sorted(docs, key=lambda d: -overlap(topics[tid], docs[d]))
        first = next(i for i, d in enumerate(ranking, 1) if judged.get(d, 0) >= 1)
        reciprocal_ranks.append(1 / first)
    mean_rel = sum(relevant_overlap) / len(relevant_overlap)
    assert mean_rel > 1.0 and max(nonrelevant_overlap) == 0
    assert sum(reciprocal_ranks) / len(reciprocal_ranks) == 1.0, "lexical matching finds a relevant doc first"


def test_corpus_sentences_cover_vocabulary(demo: dict[str, Path]) -> None:
    corpus = corpus_sentences(seed=5)
    openers = {s.split()[0].rstrip(".") for s in corpus}
    inner = {w.rstrip(".") for s in corpus for w in s.split()[1:]}
    lexicon, second = read_tsv(demo["lexicon"]), read_tsv(demo["lexicon_qsy"])
    for word in [*lexicon, *lexicon.values(), *second.values()]:
        assert word in inner and word[0].upper() + word[1:] in openers, word
    assert corpus == corpus_sentences(seed=5) != corpus_sentences(seed=6)


def test_demo_sizes_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_demo_collection(tmp_path, DemoSizes(n_topics=99))


# ---------------------------------------------------------------- tiny models


def test_build_is_cached_and_reproducible(
    models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = models.root / COMPLETE_MARKER
    weights = models.student / "model.safetensors"
    stamps = (marker.stat().st_mtime_ns, weights.stat().st_mtime_ns)
    assert build_tiny_models(models.root, seed=0) == models
    assert (marker.stat().st_mtime_ns, weights.stat().st_mtime_ns) == stamps
    assert not list(models.root.parent.glob(f".{models.root.name}.build-*")), "no temp dirs left"

    same = build_tiny_models(tmp_path / "same", seed=0)
    # Builds below only need to differ from seed 0's or to replace a cache: train their teachers briefly.
    monkeypatch.setattr(tiny_models, "TEACHER_TRAINING", replace(tiny_models.TEACHER_TRAINING, steps=3))
    other = build_tiny_models(tmp_path / "other", seed=1)
    files = sorted(p.relative_to(models.root) for p in models.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(same.root) for p in same.root.rglob("*") if p.is_file())
    for rel in files:
        assert (same.root / rel).read_bytes() == (models.root / rel).read_bytes(), rel
    for rel in ("marian_hf/model.safetensors", "cross_encoder/model.safetensors", "student/model.safetensors"):
        assert (other.root / rel).read_bytes() != (models.root / rel).read_bytes(), rel

    same_marker = same.root / COMPLETE_MARKER
    before = same_marker.stat().st_mtime_ns
    build_tiny_models(same.root, seed=0, force=True)
    assert same_marker.stat().st_mtime_ns != before, "force rebuilds"
    build_tiny_models(same.root, seed=1)
    replaced = (same.student / "model.safetensors").read_bytes()
    assert replaced == (other.student / "model.safetensors").read_bytes(), "a cached build of another seed is replaced"


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(tiny_models, "_fine_tune_cross_encoder", boom)
    with pytest.raises(RuntimeError, match="killed"):
        build_tiny_models(tmp_path / "tiny")
    # the base (MT model, student) is whole; the teacher's failed build left nothing, not even a temp dir
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny"]
    assert sorted(path.name for path in (tmp_path / "tiny").iterdir()) == sorted(
        [COMPLETE_MARKER, "marian_ct2", "marian_hf", "student"])


def test_models_load(models: TinyModels) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models.cross_encoder)
    batch = tokenizer(["kodona rumut", "zilok tumi"], ["Zilok tumi bosek.", "Vikel gume."], padding=True,
                      return_tensors="pt")
    cross_encoder = AutoModelForSequenceClassification.from_pretrained(models.cross_encoder).eval()
    with torch.no_grad():
        assert cross_encoder(**batch).logits.shape == (2, 1)

    student = AutoModel.from_pretrained(models.student, add_pooling_layer=False).eval()
    assert student.pooler is None and student.config.hidden_size == 64
    assert cross_encoder.config.num_labels == 1
    model_bytes = sum(p.stat().st_size for p in models.cross_encoder.iterdir())
    assert model_bytes < 5 * 2**20, f"teacher directory is {model_bytes} bytes"
    student_tokenizer = AutoTokenizer.from_pretrained(models.student)
    assert student_tokenizer.get_vocab() == tokenizer.get_vocab()
    with torch.no_grad():
        hidden = student(**student_tokenizer(["Zilok tumi bosek."], return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == 64

    hf_vocab = json.loads((models.marian_hf / "vocab.json").read_text(encoding="utf-8"))
    assert max(hf_vocab, key=hf_vocab.get) == "<pad>", "<pad> must be the last Marian vocabulary entry"
    ct2_vocab = json.loads((models.marian_ct2 / "shared_vocabulary.json").read_text(encoding="utf-8"))
    assert ct2_vocab == sorted(hf_vocab, key=hf_vocab.get)[:-1]
    mt_config = json.loads((models.marian_ct2 / tiny_models.MT_CONFIG_NAME).read_text())
    assert mt_config == {"source_spm": "source.spm", "target_spm": "target.spm", "append_eos": True}
    assert all((models.marian_ct2 / mt_config[k]).is_file() for k in ("source_spm", "target_spm"))
    ctranslate2.Translator(str(models.marian_ct2), device="cpu")


def test_ct2_greedy_matches_hf_generate(models: TinyModels, demo: dict[str, Path]) -> None:
    max_len = 24
    sentences = [
        *list(read_tsv(demo["passages"]).values())[:4],
        *list(read_tsv(demo["eval_docs_syn"]).values())[:2],
        *read_tsv(demo["train_queries"]).values(),
    ][:10]
    hf_tokenizer = MarianTokenizer.from_pretrained(models.marian_hf)
    hf_model = MarianMTModel.from_pretrained(models.marian_hf).eval()
    translator = ctranslate2.Translator(str(models.marian_ct2), device="cpu")
    source = spm.SentencePieceProcessor(model_file=str(models.marian_ct2 / "source.spm"))
    target = spm.SentencePieceProcessor(model_file=str(models.marian_ct2 / "target.spm"))

    pieces = [source.encode(s, out_type=str) + ["</s>"] for s in sentences]
    results = translator.translate_batch(pieces, beam_size=1, max_decoding_length=max_len)
    for sentence, piece_list, result in zip(sentences, pieces, results):
        encoded = hf_tokenizer([sentence], return_tensors="pt")
        assert hf_tokenizer.convert_ids_to_tokens(encoded.input_ids[0]) == piece_list
        with torch.no_grad():
            generated = hf_model.generate(**encoded, num_beams=1, do_sample=False, max_new_tokens=max_len)
        hf_tokens = hf_tokenizer.convert_ids_to_tokens(generated[0, 1:])
        ct2_tokens = result.hypotheses[0]
        assert ct2_tokens == hf_tokens
        assert len(ct2_tokens) == max_len and not {"</s>", "<unk>", "<pad>"} & set(ct2_tokens)
        assert target.decode(ct2_tokens).strip()


def test_tokenizers_cover_demo_vocabulary(models: TinyModels, demo: dict[str, Path]) -> None:
    texts = [
        text
        for key in ("passages", "passages_syn", "passages_qsy", "eval_docs_syn", "train_queries", "eval_topics")
        for text in read_tsv(demo[key]).values()
    ]
    bert = AutoTokenizer.from_pretrained(models.student)
    assert all(bert.unk_token_id not in ids for ids in bert(texts).input_ids)
    # Every demo word is a single WordPiece token, in all three languages, accents kept.
    lexicon, second = read_tsv(demo["lexicon"]), read_tsv(demo["lexicon_qsy"])
    assert all(len(bert.tokenize(w)) == 1 for w in [*lexicon, *lexicon.values(), *second.values()])

    marian = MarianTokenizer.from_pretrained(models.marian_hf)
    assert all(marian.unk_token_id not in ids for ids in marian(texts).input_ids)


# ---------------------------------------------------------------- the fine-tuned teacher


def load_teacher(path: Path, random_init: bool = False) -> tuple[object, torch.nn.Module]:
    """The built teacher, or (``random_init``) a random-init model of the same architecture."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if random_init:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path)
    return tokenizer, model.eval()


def teacher_scores(teacher: tuple[object, torch.nn.Module], query: str, passages: list[str]) -> list[float]:
    tokenizer, model = teacher
    batch = tokenizer([query] * len(passages), passages, truncation="longest_first", max_length=128,
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[:, 0].tolist()


def candidates_mrr(teacher: tuple[object, torch.nn.Module], demo: dict[str, Path]) -> float:
    """MRR@10 of the positive when the teacher reranks each training query's candidates."""
    queries, passages = read_tsv(demo["train_queries"]), read_tsv(demo["passages"])
    positives = read_qrels(demo["train_qrels"])
    run: dict[str, list[str]] = defaultdict(list)
    for line in demo["candidates"].read_text().splitlines():
        qid, _, pid, *_ = line.split()
        run[qid].append(pid)
    reciprocal_ranks = []
    for qid, pids in run.items():
        scores = dict(zip(pids, teacher_scores(teacher, queries[qid], [passages[p] for p in pids])))
        (positive,) = positives[qid]
        rank = 1 + sum(score > scores[positive] for score in scores.values())  # ties count in its favour
        reciprocal_ranks.append(1 / rank if rank <= 10 else 0.0)
    return sum(reciprocal_ranks) / len(reciprocal_ranks)


def eval_reranking(teacher: tuple[object, torch.nn.Module], demo: dict[str, Path]) -> tuple[float, list[float]]:
    """nDCG@10 of the teacher reranking each English eval topic's judged English docs, and all its scores."""
    topics, docs = read_tsv(demo["eval_topics"]), read_tsv(demo["eval_docs"])
    qrels = read_qrels(demo["eval_qrels"])
    run, all_scores = [], []
    for tid, judged in qrels.items():
        dids = sorted(judged)
        scores = teacher_scores(teacher, topics[tid], [docs[d] for d in dids])
        all_scores += scores
        run += [ir_measures.ScoredDoc(tid, did, score) for did, score in zip(dids, scores)]
    qrel_rows = [ir_measures.Qrel(tid, did, rel) for tid, judged in qrels.items() for did, rel in judged.items()]
    return ir_measures.calc_aggregate([nDCG @ 10], qrel_rows, run)[nDCG @ 10], all_scores


@pytest.fixture(scope="module")
def teacher(models: TinyModels) -> tuple[object, torch.nn.Module]:
    return load_teacher(models.cross_encoder)


@pytest.fixture(scope="module")
def random_teacher(models: TinyModels) -> tuple[object, torch.nn.Module]:
    return load_teacher(models.cross_encoder, random_init=True)


def test_teacher_training_examples_are_the_english_training_data(demo: dict[str, Path]) -> None:
    queries, passages = read_tsv(demo["train_queries"]), read_tsv(demo["passages"])
    positives = read_qrels(demo["train_qrels"])
    candidates: dict[str, list[str]] = defaultdict(list)
    for line in demo["candidates"].read_text().splitlines():
        qid, _, pid, *_ = line.split()
        candidates[qid].append(passages[pid])
    examples = english_training_examples(SIZES, seed=0)
    assert [e.query for e in examples] == list(queries.values())
    assert [e.positive for e in examples] == [passages[next(iter(positives[q]))] for q in queries]
    assert [list(e.candidates) for e in examples] == [candidates[q] for q in queries]

    extended = english_training_examples(SIZES, seed=0, extra_queries=50)
    assert extended[: len(examples)] == examples and len(extended) == len(examples) + 50
    training_passages = set(passages.values())
    eval_docs = set(read_tsv(demo["eval_docs"]).values())
    for example in extended:
        assert example.positive in example.candidates
        assert set(example.candidates) <= training_passages and not set(example.candidates) & eval_docs
        assert set(example.query.split()) <= set(words(example.positive))


def test_teacher_ranks_training_positives_first(teacher, random_teacher, demo: dict[str, Path]) -> None:
    trained, random_init = candidates_mrr(teacher, demo), candidates_mrr(random_teacher, demo)
    # For scale: ranking by the number of query words a candidate holds scores about 0.68 (several
    # candidates hold them all); the random-init teacher about 0.29.
    assert trained >= 0.65, f"fine-tuned teacher MRR@10 {trained:.3f} over the training candidates"
    assert trained >= random_init + 0.3, f"fine-tuned {trained:.3f} vs random-init {random_init:.3f}"


def test_teacher_generalises_to_eval_collection(teacher, random_teacher, demo: dict[str, Path]) -> None:
    trained, scores = eval_reranking(teacher, demo)
    random_init, random_scores = eval_reranking(random_teacher, demo)
    # The teacher never saw the eval collection: this is what it learnt to do, match a query's terms.
    assert trained >= 0.85, f"fine-tuned teacher nDCG@10 {trained:.3f} on the eval collection"
    assert trained >= random_init + 0.2, f"fine-tuned {trained:.3f} vs random-init {random_init:.3f}"
    # The scores spread, so a softmax over them (the distillation target) is far from uniform.
    spread, random_spread = torch.tensor(scores).std().item(), torch.tensor(random_scores).std().item()
    assert spread > 1.0 and spread > 20 * random_spread, f"score std {spread:.3f} vs random-init {random_spread:.4f}"


def test_the_demo_fine_tunes_its_teacher_while_the_pipeline_goes_on(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`prepare_demo_assets` with work to overlap returns once the MT model and the student exist, the teacher still
    training; its future ends with the teacher; a second call finds everything built."""
    import threading

    from td_ray.pipeline import demo_config, prepare_demo_assets

    monkeypatch.setattr(tiny_models, "TEACHER_TRAINING", replace(tiny_models.TEACHER_TRAINING, steps=3))
    release, original = threading.Event(), tiny_models._build_cross_encoder

    def held(*args: object) -> None:
        assert release.wait(120)
        original(*args)

    monkeypatch.setattr(tiny_models, "_build_cross_encoder", held)
    calls: list[str] = []
    config = demo_config(str(tmp_path / "ws"))
    teacher = prepare_demo_assets(config, meanwhile=lambda: calls.append("ray starts"))
    models = TinyModels.under(tmp_path / "ws" / "tiny-models")
    assert calls == ["ray starts"] and (models.student / "model.safetensors").is_file()
    assert teacher is not None and not teacher.done() and not models.cross_encoder.exists()
    release.set()
    teacher.result(timeout=120)
    assert (models.cross_encoder / COMPLETE_MARKER).is_file()
    assert prepare_demo_assets(config, meanwhile=lambda: calls.append("again")) is None and calls == ["ray starts"]
