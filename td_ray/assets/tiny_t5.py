"""A tiny random-init T5 built offline: the stand-in for monoT5 / mT5 seq2seq teachers in tests and demos.

The tokenizer is a sentencepiece unigram model trained on ``demo_data.corpus_sentences`` with T5's special
ids (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), plus the answer words of both Translate-Distill teachers as
whole-word pieces (``▁true``/``▁false`` for monoT5, ``▁yes``/``▁no`` for mMARCO's mT5), wrapped as a
``T5Tokenizer``. The model is a 2-layer T5 with random weights: it exercises the scoring mechanics, its
scores carry no relevance signal.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2
from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

from td_ray.assets.build import cached_build
from td_ray.assets.demo_data import corpus_sentences

logger = logging.getLogger(__name__)

BUILD_VERSION = 1
"""Bump when the build changes, so cached model directories are rebuilt."""
SPM_VOCAB_SIZE = 1000
ANSWER_WORDS = ("true", "false", "yes", "no")
PROMPT_SENTENCES = 200
ANSWER_PIECE_SCORE = 0.0
"""Log-probability of the added answer pieces: above every learned piece, so each word is always one piece."""


def _build_key(seed: int) -> str:
    return json.dumps({"seed": seed, "build_version": BUILD_VERSION}, sort_keys=True)


def _train_sentencepiece(sentences: list[str]) -> bytes:
    """A unigram sentencepiece model with T5's special ids and each answer word as one ``▁word`` piece."""
    trained = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=trained,
        vocab_size=SPM_VOCAB_SIZE,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(trained.getvalue())
    known = {piece.piece for piece in proto.pieces}
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    for word in ANSWER_WORDS:
        if f"▁{word}" not in known:
            proto.pieces.add(piece=f"▁{word}", score=ANSWER_PIECE_SCORE, type=normal)
    return proto.SerializeToString()


def _prompt_sentences(sentences: list[str]) -> list[str]:
    """Some sentences in the monoT5 prompt format, so its words and ``:`` are in the vocabulary."""
    return [f"Query: {text.split()[0]} Document: {text} Relevant: {ANSWER_WORDS[i % len(ANSWER_WORDS)]}"
            for i, text in enumerate(sentences[:PROMPT_SENTENCES])]


def _build(out: Path, seed: int) -> None:
    """Write spiece.model, the T5 tokenizer and a random tiny T5 into the new directory ``out``."""
    sentences = corpus_sentences(seed)
    (out / "spiece.model").write_bytes(_train_sentencepiece(sentences + _prompt_sentences(sentences)))
    tokenizer = T5Tokenizer.from_pretrained(out, extra_ids=0, model_max_length=512)
    for word in ANSWER_WORDS:
        if len(tokenizer.encode(word, add_special_tokens=False)) != 1:
            raise RuntimeError(f"tiny T5 tokenizer splits the answer word {word!r}")
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=32,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny_t5(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny T5 into ``out_dir`` (a from_pretrained directory) unless a build with the same key is there."""
    return cached_build(out_dir, _build_key(seed), lambda staged: _build(staged, seed), "tiny T5")
