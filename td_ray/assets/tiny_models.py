"""Tiny random-init models built offline, so the pipeline runs end to end without a model hub.

Four models share tokenizers trained on ``demo_data.corpus_sentences``, so they cover the demo
vocabulary in English and in the synthetic language:

- ``marian_hf``: a Marian translation model (HF format) with a local sentencepiece model;
- ``marian_ct2``: the same model converted to CTranslate2, with its sentencepiece models beside it;
- ``cross_encoder``: a BERT relevance scorer (one logit), the stand-in teacher;
- ``student``: a BERT encoder without pooler, the stand-in student (DDP rejects unused parameters).

The Marian models and the student are random: they exercise the pipeline's mechanics. The teacher is
fine-tuned briefly on the demo collection's English training queries (never its evaluation collection),
so its scores rank passages meaningfully and distilling it into the student teaches something.
"""

from __future__ import annotations

import io
import json
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ctranslate2
import sentencepiece as spm
import torch
from tokenizers import normalizers, pre_tokenizers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizerFast,
    GenerationConfig,
    MarianConfig,
    MarianMTModel,
    MarianTokenizer,
)

from td_ray.assets.build import cached_build
from td_ray.assets.demo_data import (
    DemoSizes,
    TrainingExample,
    corpus_sentences,
    english_training_examples,
)

logger = logging.getLogger(__name__)

BUILD_VERSION = 5
"""Bump when the build changes, so cached model directories are rebuilt."""

MT_CONFIG_NAME = "td_ray_mt.json"
"""File in the CT2 model directory telling the translate stage how to tokenize."""

SPM_VOCAB_SIZE = 1000
LANGUAGE_TOKENS = ["__qaa__", "__qab__"]
"""Target-language tokens in the Marian vocabulary, so the model can stand in for a multilingual one
(NLLB/M2M100 style, steered by CTranslate2's target_prefix) in tests."""
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SUPPRESSED_LOGIT_BIAS = -1e4
"""Final-logits bias on </s>, <unk> and <pad>: greedy decoding then never stops early or emits unk."""


@dataclass(frozen=True)
class TeacherTraining:
    """How the cross-encoder teacher is fine-tuned (softmax cross-entropy, one positive per group)."""

    steps: int = 200
    queries_per_step: int = 8
    candidate_negatives: int = 4
    """Negatives per query drawn from its candidate list (hard, mostly same-topic)."""
    random_negatives: int = 3
    """Negatives per query drawn from all candidate passages (mostly other topics)."""
    extra_queries: int = 2400
    """Queries drawn like the training queries over the training passages, after the real ones: with only
    the real queries the tiny model memorises which passages are positives instead of learning to match."""
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    hidden: int = 64
    intermediate: int = 128
    heads: int = 4
    init_std: float = 0.05
    """Weight init std, larger than BERT's 0.02 so the tiny model leaves its flat start quickly."""
    word_embedding_scale: float = 3.0
    """Word embeddings start this many times larger than segment embeddings."""
    position_embedding_scale: float = 0.0
    """Position embeddings start this many times as large as segment embeddings (0: no position signal
    yet, so the two copies of a word in query and passage look alike but for their segment)."""
    head_init_std: float = 0.125
    """Init std of the pooler and the classifier, about 1/sqrt(hidden): a readout with unit gain, so the
    loss reaches the encoder from the first step."""
    match_attention_std: float = 0.2
    """First-layer query and key projections start tied with this std: attention starts out matching
    identical tokens, which the teacher must learn to do to rank passages by the query's terms."""
    dropout: float = 0.0
    threads: int = 1


TEACHER_TRAINING = TeacherTraining()


@dataclass(frozen=True)
class TinyModels:
    """Paths of the built models."""

    root: Path
    marian_hf: Path
    marian_ct2: Path
    cross_encoder: Path
    student: Path

    @classmethod
    def under(cls, root: Path) -> TinyModels:
        """The model directory layout under ``root``."""
        return cls(
            root=root,
            marian_hf=root / "marian_hf",
            marian_ct2=root / "marian_ct2",
            cross_encoder=root / "cross_encoder",
            student=root / "student",
        )


def _build_key(seed: int) -> str:
    return json.dumps({"seed": seed, "build_version": BUILD_VERSION}, sort_keys=True)


def _train_sentencepiece(sentences: list[str]) -> bytes:
    """Train a unigram sentencepiece model; return its serialized proto."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=SPM_VOCAB_SIZE,
        model_type="unigram",
        character_coverage=1.0,
        unk_id=0,
        eos_id=1,
        bos_id=-1,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
        user_defined_symbols=LANGUAGE_TOKENS,
    )
    return model.getvalue()


def _marian_vocab(spm_proto: bytes) -> dict[str, int]:
    """Marian vocabulary: ``</s>`` 0, ``<unk>`` 1, the spm pieces, then ``<pad>`` LAST.

    CTranslate2's Marian loader drops the last row (HF's ``<pad>``, which starts the decoder), so
    ``<pad>`` must be last or a real piece would be lost.
    """
    sp = spm.SentencePieceProcessor(model_proto=spm_proto)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))]
    tokens = ["</s>", "<unk>", *pieces, "<pad>"]
    return {tok: i for i, tok in enumerate(tokens)}


def _build_marian(out: Path, sentences: list[str], seed: int) -> None:
    """Save a tiny random Marian model and its tokenizer (one spm serves both sides)."""
    out.mkdir(parents=True)
    spm_proto = _train_sentencepiece(sentences)
    for name in ("source.spm", "target.spm"):
        (out / name).write_bytes(spm_proto)
    vocab = _marian_vocab(spm_proto)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    tokenizer = MarianTokenizer(
        source_spm=str(out / "source.spm"),
        target_spm=str(out / "target.spm"),
        vocab=str(out / "vocab.json"),
        model_max_length=256,
    )

    n, pad, eos, unk = len(vocab), vocab["<pad>"], vocab["</s>"], vocab["<unk>"]
    config = MarianConfig(
        vocab_size=n,
        decoder_vocab_size=n,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        activation_function="swish",
        scale_embedding=True,
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=pad,
        forced_eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = MarianMTModel(config).eval()
    with torch.no_grad():
        # HF starts decoding from <pad>'s embedding and CT2 from a zero vector: make them the same.
        model.get_input_embeddings().weight[pad].zero_()
        model.final_logits_bias[0, [eos, unk, pad]] = SUPPRESSED_LOGIT_BIAS
    model.generation_config = GenerationConfig(
        decoder_start_token_id=pad, eos_token_id=eos, pad_token_id=pad, num_beams=1, do_sample=False
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _convert_marian(hf_dir: Path, out: Path) -> None:
    """Convert the HF Marian model to CTranslate2 and put its spm models and tokenization hints beside it."""
    converter = ctranslate2.converters.TransformersConverter(str(hf_dir), copy_files=["source.spm", "target.spm"])
    converter.convert(str(out))
    mt_config = {"source_spm": "source.spm", "target_spm": "target.spm", "append_eos": True}
    (out / MT_CONFIG_NAME).write_text(json.dumps(mt_config, indent=1), encoding="utf-8")


def _train_wordpiece(sentences: list[str]) -> BertTokenizerFast:
    """A lowercase WordPiece vocabulary (accents kept) holding every word of ``sentences`` whole, and each of their
    characters alone and as a continuation: every demo word is one token, and the vocabulary, so the weights it
    indexes, is the same on every build (a trained WordPiece breaks ties between equal-count merges in varying
    order, which changed its intermediate pieces from build to build)."""
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    splitter = pre_tokenizers.BertPreTokenizer()
    words: set[str] = set()
    for sentence in sentences:
        words.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(sentence)))
    characters = {character for word in words for character in word}
    learned = sorted(words | characters | {f"##{character}" for character in characters})
    vocab = {tok: i for i, tok in enumerate([*BERT_SPECIAL_TOKENS, *learned])}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True, strip_accents=False, model_max_length=512)


def _bert_config(
    tokenizer: BertTokenizerFast, hidden: int, intermediate: int, heads: int = 2, **kwargs: object
) -> BertConfig:
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with exactly ``n`` intra-op threads (a fixed count keeps float reductions, so weights, reproducible)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _init_cross_encoder(tokenizer: BertTokenizerFast, seed: int, cfg: TeacherTraining) -> BertForSequenceClassification:
    """The untrained teacher: BERT's random init, with a start that makes learning to match terms quick."""
    config = _bert_config(
        tokenizer,
        cfg.hidden,
        cfg.intermediate,
        cfg.heads,
        num_labels=1,
        initializer_range=cfg.init_std,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.mul_(cfg.word_embedding_scale)
        model.bert.embeddings.position_embeddings.weight.mul_(cfg.position_embedding_scale)
        model.bert.pooler.dense.weight.normal_(0.0, cfg.head_init_std)
        model.classifier.weight.normal_(0.0, cfg.head_init_std)
        first, *later = model.bert.encoder.layer
        first.attention.self.query.weight.normal_(0.0, cfg.match_attention_std)
        first.attention.self.key.weight.copy_(first.attention.self.query.weight)
        for layer in later:
            # Zero queries: later layers start by averaging over all tokens, a mean-pooling readout.
            layer.attention.self.query.weight.zero_()
            layer.attention.self.query.bias.zero_()
    return model


class _PairEncoder:
    """Builds BERT pair batches from token ids computed once per distinct text (the tokenizer is slow per step)."""

    def __init__(self, tokenizer: BertTokenizerFast, texts: list[str]):
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        self.ids = dict(zip(texts, ids))
        self.cls, self.sep, self.pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        self.max_length = tokenizer.model_max_length

    def __call__(self, queries: list[str], passages: list[str]) -> dict[str, torch.Tensor]:
        rows = []
        for query, passage in zip(queries, passages):
            q, p = self.ids[query], self.ids[passage]
            ids = [self.cls, *q, self.sep, *p, self.sep]
            if len(ids) > self.max_length:
                raise ValueError(f"training pair of {len(ids)} tokens exceeds {self.max_length}")
            rows.append((ids, [0] * (len(q) + 2) + [1] * (len(p) + 1)))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, types) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            token_type_ids[i, : len(ids)] = torch.tensor(types)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


def _fine_tune_cross_encoder(
    model: BertForSequenceClassification,
    tokenizer: BertTokenizerFast,
    examples: list[TrainingExample],
    seed: int,
    cfg: TeacherTraining,
) -> list[float]:
    """Fine-tune ``model`` in place: per query, softmax cross-entropy of its positive against negatives.

    Each step takes the next ``queries_per_step`` examples of a seeded shuffle. Returns the loss per step.
    """
    rng = random.Random(seed)
    pool = sorted({text for e in examples for text in e.candidates})
    encode = _PairEncoder(tokenizer, sorted({e.query for e in examples} | set(pool)))
    group = 1 + cfg.candidate_negatives + cfg.random_negatives
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / cfg.warmup_steps) * max(0.0, 1.0 - step / cfg.steps)
    )
    order: list[TrainingExample] = []
    losses = []
    model.train()
    for _ in range(cfg.steps):
        while len(order) < cfg.queries_per_step:
            order += rng.sample(examples, len(examples))
        batch, order = order[: cfg.queries_per_step], order[cfg.queries_per_step :]
        queries, passages = [], []
        for example in batch:
            hard = [c for c in example.candidates if c != example.positive]
            texts = [example.positive, *rng.sample(hard, min(cfg.candidate_negatives, len(hard)))]
            while len(texts) < group:
                text = rng.choice(pool)
                if text not in texts:
                    texts.append(text)
            queries += [example.query] * group
            passages += texts
        logits = model(**encode(queries, passages)).logits.view(len(batch), group)
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(batch), dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _build_cross_encoder(out: Path, tokenizer: BertTokenizerFast, seed: int) -> None:
    """Build the teacher: fine-tune a tiny BERT on the English training queries of the seed's demo collection."""
    cfg = TEACHER_TRAINING
    start = time.perf_counter()
    examples = english_training_examples(DemoSizes(), seed, extra_queries=cfg.extra_queries)
    with _torch_threads(cfg.threads):
        model = _init_cross_encoder(tokenizer, seed, cfg)
        losses = _fine_tune_cross_encoder(model, tokenizer, examples, seed, cfg)
    tail = losses[-20:]
    logger.info(
        "fine-tuned the teacher on %d English training queries in %d steps (%.1f s); loss %.3f -> %.3f",
        len(examples), cfg.steps, time.perf_counter() - start, losses[0], sum(tail) / len(tail),
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_student(out: Path, tokenizer: BertTokenizerFast, seed: int) -> None:
    torch.manual_seed(seed)
    model = BertModel(_bert_config(tokenizer, 64, 128), add_pooling_layer=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny_models(out_dir: Path, seed: int = 0, force: bool = False) -> TinyModels:
    """Build the tiny models under ``out_dir`` unless complete builds with the same key are there: the MT model and
    the student (`build_tiny_base`), then the teacher (`build_tiny_teacher`)."""
    models = build_tiny_base(out_dir, seed, force)
    build_tiny_teacher(out_dir, seed, force)
    return models


def build_tiny_base(out_dir: Path, seed: int = 0, force: bool = False) -> TinyModels:
    """The Marian MT model (and its CTranslate2 conversion) and the student under ``out_dir``: a second or so.

    The build happens in a temp directory next to ``out_dir`` and is renamed into place at the end, so a killed build
    leaves nothing half-made under the final name (a rebuilt base drops the teacher, which is rebuilt after it).
    """
    def build(staged_dir: Path) -> None:
        staged = TinyModels.under(staged_dir)
        sentences = corpus_sentences(seed)
        logger.info("building Marian model (%d tokenizer sentences)", len(sentences))
        _build_marian(staged.marian_hf, sentences, seed)
        logger.info("converting Marian model to CTranslate2")
        _convert_marian(staged.marian_hf, staged.marian_ct2)
        logger.info("training WordPiece tokenizer and building the student")
        _build_student(staged.student, _train_wordpiece(sentences), seed)

    return TinyModels.under(cached_build(out_dir, _build_key(seed), build, "tiny models", force))


def build_tiny_teacher(out_dir: Path, seed: int = 0, force: bool = False) -> Path:
    """The cross-encoder teacher, fine-tuned (seconds) into ``out_dir/cross_encoder`` once the base is built: its own
    cached build, so the demo can train it while the translate stage runs."""
    def build(staged_dir: Path) -> None:
        _build_cross_encoder(staged_dir, _train_wordpiece(corpus_sentences(seed)), seed)

    return cached_build(TinyModels.under(out_dir).cross_encoder, _build_key(seed), build, "tiny teacher", force)


def build_lexical_student(tokenizer_dir: Path, out: Path, hidden_size: int = 64, seed: int = 3) -> Path:
    """A BERT with no transformer layer: each token is its word's random embedding (positions and segments zeroed),
    layer-normalised. Pooled by mean it ranks passages by the query's words they hold; projected per token (a
    ColBERT student) it scores them by MaxSim over those words. Unlike a briefly trained tiny student, whose scores
    nearly tie, it ranks by content, so an index's quantisation error shows as the ranking changes it causes."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=0,
                                 num_attention_heads=1, intermediate_size=hidden_size, max_position_embeddings=512),
                      add_pooling_layer=False)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.normal_()
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
