"""Pure translation logic: segment, tokenize, batch by length, translate with CTranslate2, reassemble, check.

No Ray here, so it is unit-testable and the actor stays a thin shell.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from td_ray.config import DecodingConfig, TranslateConfig
from td_ray.errors import ModelError
from td_ray.translate.quality import check_translation
from td_ray.translate.segment import chunk_pieces, joiner, split_sentences

logger = logging.getLogger(__name__)

MT_SPEC_FILE = "td_ray_mt.json"
"""Optional file in a CT2 model directory naming its sentencepiece files: {source_spm, target_spm, append_eos}."""
SHARED_SPM = "sentencepiece.bpe.model"
"""The one sentencepiece model of NLLB and M2M100 (Marian/opus-mt ship source.spm and target.spm)."""


@dataclass(frozen=True)
class DecodingOptions:
    """The CTranslate2 options td-ray exposes."""

    beam_size: int = 1
    max_input_length: int = 256
    max_decoding_length: int = 256
    batch_size: int = 64


class SentencePieceCodec:
    """Source encoding and target decoding with the sentencepiece models shipped beside a CT2 model."""

    def __init__(self, model_dir: Path, source_prefix: str | None = None, target_prefix: str | None = None):
        import sentencepiece

        spec_path = model_dir / MT_SPEC_FILE
        spec = json.loads(spec_path.read_text()) if spec_path.exists() else {}
        shared = SHARED_SPM if (model_dir / SHARED_SPM).is_file() and not (model_dir / "source.spm").is_file() else None
        source = model_dir / spec.get("source_spm", shared or "source.spm")
        target = model_dir / spec.get("target_spm", shared or "target.spm")
        for path in (source, target):
            if not path.is_file():
                raise ModelError(
                    f"MT model {model_dir}: missing {path.name}; put the model's sentencepiece files beside the "
                    f"CTranslate2 files (source.spm and target.spm for Marian/opus-mt, {SHARED_SPM} for NLLB/M2M100)"
                )
        self.source = sentencepiece.SentencePieceProcessor(model_file=str(source))
        self.target = sentencepiece.SentencePieceProcessor(model_file=str(target))
        self.append_eos = spec.get("append_eos", True)  # Marian expects </s> at the end of the source
        self.prefix = [source_prefix] if source_prefix else []
        self.target_prefix = [target_prefix] if target_prefix else []
        self._check_token(source_prefix, self.source, "source_prefix")
        self._check_token(target_prefix, self.target, "target_prefix")

    def _check_token(self, token: str | None, processor, field: str) -> None:
        if token and processor.piece_to_id(token) == processor.unk_id():
            raise ModelError(
                f"translate.targets[].{field} {token!r} is not a token of this model's vocabulary; use the model's "
                "own language token (e.g. zho_Hans for NLLB, __zh__ for M2M100, >>cmn_Hans<< for opus-mt)"
            )

    @property
    def special_tokens(self) -> int:
        """Tokens added to every source segment (prefix and end of sentence)."""
        return len(self.prefix) + (1 if self.append_eos else 0)

    def pieces(self, texts: list[str]) -> list[list[str]]:
        return self.source.encode(texts, out_type=str)

    def source_tokens(self, pieces: list[str]) -> list[str]:
        return self.prefix + pieces + (["</s>"] if self.append_eos else [])

    def decode(self, tokens: list[str]) -> str:
        return self.target.decode_pieces(tokens[len(self.target_prefix):]).strip()


def resolve_ct2_model(model: str, cache_dir: Path) -> Path:
    """A CTranslate2 model directory for `model`: used as is, or converted once from a Marian HF dir or hub id."""
    path = Path(model).expanduser()
    if (path / "model.bin").is_file():
        return path
    converted = cache_dir / model.replace("/", "--")
    if (converted / "model.bin").is_file():
        return converted
    if path.exists() and not (path / "config.json").is_file():
        raise ModelError(
            f"MT model {model}: the directory has neither model.bin (CTranslate2) nor config.json (HF Marian); "
            "point translate.targets[].model at one of those"
        )
    import ctranslate2

    logger.info("converting %s to CTranslate2 into %s", model, converted)
    temporary = converted.with_name(converted.name + ".tmp")
    error = None
    for tokenizer_files in (["source.spm", "target.spm"], [SHARED_SPM]):  # Marian, then NLLB/M2M100
        shutil.rmtree(temporary, ignore_errors=True)
        if path.exists() and not all((path / name).is_file() for name in tokenizer_files):
            continue
        try:
            converter = ctranslate2.converters.TransformersConverter(str(path) if path.exists() else model,
                                                                     copy_files=tokenizer_files)
            converter.convert(str(temporary))
            break
        except Exception as failure:  # the converter raises many types; all mean the same to the user
            error = failure
    else:
        shutil.rmtree(temporary, ignore_errors=True)
        raise ModelError(f"MT model {model}: cannot convert to CTranslate2 ({error or 'no sentencepiece files'}); "
                         "pass a Marian, NLLB or M2M100 model, or a CTranslate2 directory") from error
    temporary.rename(converted)
    return converted


@dataclass
class TextTranslation:
    """One output text, how it was made, and its quality flags."""

    text: str
    segments: int = 0
    source_tokens: int = 0
    target_tokens: int = 0
    hit_decoding_limit: bool = False
    flags: list[str] = field(default_factory=list)
    attempts: int = 1


@dataclass
class BatchStats:
    """What a block cost: segments, tokens, and the source padding its batches carried."""

    segments: int = 0
    source_tokens: int = 0
    target_tokens: int = 0
    positions: int = 0
    """Source positions in all batches, padding included (batch size x longest segment, summed)."""
    retried: int = 0

    @property
    def padding_ratio(self) -> float:
        return 1 - self.source_tokens / self.positions if self.positions else 0.0

    def add(self, other: BatchStats) -> None:
        for name in ("segments", "source_tokens", "target_tokens", "positions", "retried"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


#: With bucketing, a batch closes when the next segment is longer than its shortest by more than this share
#: (and BUCKET_SLACK tokens), so no batch pads much whatever the token budget.
BUCKET_SPREAD = 0.1
BUCKET_SLACK = 2


def make_batches(lengths: list[int], max_batch_tokens: int, bucketing: bool = True) -> list[list[int]]:
    """Indexes of `lengths` grouped into batches whose padded size (count x longest) fits the token budget.

    With bucketing the segments are sorted by length first and a batch holds only similar lengths (within
    BUCKET_SPREAD of its shortest, or BUCKET_SLACK tokens), so padding stays small even with a large budget.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__) if bucketing else list(range(len(lengths)))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        candidate = max(longest, lengths[index])
        too_spread = bucketing and current and candidate > max(lengths[current[0]] * (1 + BUCKET_SPREAD),
                                                               lengths[current[0]] + BUCKET_SLACK)
        if current and (candidate * (len(current) + 1) > max_batch_tokens or too_spread):
            batches.append(current)
            current, candidate = [], lengths[index]
        current.append(index)
        longest = candidate
    if current:
        batches.append(current)
    return batches


def padded_positions(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def segment_text(codec: SentencePieceCodec, text: str, settings: TranslateConfig) -> list[list[str]]:
    """Source token sequences for one text: its sentences, long ones cut into chunks within max_input_length."""
    sentences = split_sentences(text, settings.source_lang) if settings.split_sentences else [text.strip()]
    budget = max(1, settings.max_input_length - codec.special_tokens)
    return [codec.source_tokens(chunk) for pieces in codec.pieces(sentences) if pieces
            for chunk in chunk_pieces(pieces, budget)]


def _decoding_cap(decoding: DecodingConfig, longest_source: int) -> int:
    if decoding.decoding_length_ratio is None:
        return decoding.max_decoding_length
    return min(decoding.max_decoding_length, math.ceil(decoding.decoding_length_ratio * longest_source) + 8)


def translate_segments(translator, codec: SentencePieceCodec, segments: list[list[str]], settings: TranslateConfig,
                       decoding: DecodingConfig) -> tuple[list[tuple[str, int, bool]], BatchStats]:
    """(text, target tokens, hit the decoding limit) per segment, in order, and the batches' statistics.

    Batches are submitted asynchronously, so a translator with inter_threads > 1 runs several at once.
    """
    lengths = [len(tokens) for tokens in segments]
    batches = make_batches(lengths, settings.max_batch_tokens, settings.length_bucketing)
    pending = []
    for batch in batches:
        cap = _decoding_cap(decoding, max(lengths[i] for i in batch))
        futures = translator.translate_batch(
            [segments[i] for i in batch],
            target_prefix=[codec.target_prefix] * len(batch) if codec.target_prefix else None,
            max_batch_size=settings.max_batch_tokens, batch_type="tokens", asynchronous=True,
            beam_size=decoding.beam_size, max_decoding_length=cap + len(codec.target_prefix),
            length_penalty=decoding.length_penalty, repetition_penalty=decoding.repetition_penalty,
            no_repeat_ngram_size=decoding.no_repeat_ngram_size, replace_unknowns=decoding.replace_unknowns,
        )
        pending.append((batch, cap, futures))
    outputs: list[tuple[str, int, bool]] = [("", 0, False)] * len(segments)
    stats = BatchStats(segments=len(segments), source_tokens=sum(lengths), positions=padded_positions(lengths, batches))
    for batch, cap, futures in pending:
        for index, future in zip(batch, futures):
            hypothesis = future.result().hypotheses[0]
            produced = len(hypothesis) - len(codec.target_prefix)
            outputs[index] = (codec.decode(hypothesis), produced, produced >= cap)
            stats.target_tokens += produced
    return outputs, stats


def translate_texts(translator, codec: SentencePieceCodec, texts: list[str], settings: TranslateConfig, lang: str,
                    decoding: DecodingConfig | None = None) -> tuple[list[TextTranslation], BatchStats]:
    """Translate `texts` in order, segment by segment, and check each output.

    An empty or blank text gives an empty translation, flagged, without calling the model. Flagged rows are
    tried once more with `settings.quality.retry`, and the try with fewer flags is kept.
    """
    decoding = decoding or settings.decoding
    per_text = [segment_text(codec, text, settings) if text.strip() else [] for text in texts]
    flat = [tokens for segments in per_text for tokens in segments]
    outputs, stats = translate_segments(translator, codec, flat, settings, decoding) if flat else ([], BatchStats())
    glue = joiner(lang)
    results, position = [], 0
    for text, segments in zip(texts, per_text):
        produced = outputs[position:position + len(segments)]
        position += len(segments)
        translation = TextTranslation(
            text=glue.join(part for part, _, _ in produced if part),
            segments=len(segments),
            source_tokens=sum(len(tokens) for tokens in segments),
            target_tokens=sum(count for _, count, _ in produced),
            hit_decoding_limit=any(limit for _, _, limit in produced),
        )
        translation.flags = check_translation(text, translation.text, settings.quality, translation.hit_decoding_limit)
        if translation.text and any(not part for part, _, _ in produced):
            translation.flags.append("empty_output: a sentence translated to nothing (content may be dropped)")
        results.append(translation)
    retry = settings.quality.retry
    flagged = [i for i, item in enumerate(results) if item.flags and texts[i].strip()]
    if retry is not None and flagged and decoding is not retry:
        second, retry_stats = translate_texts(translator, codec, [texts[i] for i in flagged], settings, lang, retry)
        stats.add(retry_stats)
        stats.retried += len(flagged)
        for index, candidate in zip(flagged, second):
            candidate.attempts = 2
            if len(candidate.flags) < len(results[index].flags):
                results[index] = candidate
            else:
                results[index].attempts = 2
    return results, stats
