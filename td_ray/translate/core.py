"""Pure translation logic: tokenize with the model's sentencepiece files, translate with CTranslate2, detokenize.

No Ray here, so it is unit-testable and the actor stays a thin shell.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from td_ray.errors import TdRayError

logger = logging.getLogger(__name__)

MT_SPEC_FILE = "td_ray_mt.json"


class ModelError(TdRayError):
    """A model that cannot be found or used: the message names it and says how to fix it."""


@dataclass(frozen=True)
class DecodingOptions:
    """The CTranslate2 options td-ray exposes."""

    beam_size: int = 1
    max_input_length: int = 256
    max_decoding_length: int = 256
    batch_size: int = 64


class SentencePieceCodec:
    """Source encoding and target decoding with the sentencepiece models shipped beside a CT2 model."""

    def __init__(self, model_dir: Path, source_prefix: str | None = None):
        import sentencepiece

        spec_path = model_dir / MT_SPEC_FILE
        spec = json.loads(spec_path.read_text()) if spec_path.exists() else {}
        source = model_dir / spec.get("source_spm", "source.spm")
        target = model_dir / spec.get("target_spm", "target.spm")
        for path in (source, target):
            if not path.is_file():
                raise ModelError(
                    f"MT model {model_dir}: missing {path.name}; a Marian/opus-mt model needs its source.spm and "
                    "target.spm beside the CTranslate2 files"
                )
        self.source = sentencepiece.SentencePieceProcessor(model_file=str(source))
        self.target = sentencepiece.SentencePieceProcessor(model_file=str(target))
        self.append_eos = spec.get("append_eos", True)  # Marian expects </s> at the end of the source
        self.prefix = [source_prefix] if source_prefix else []

    def encode(self, texts: list[str], max_length: int) -> list[tuple[list[str], bool]]:
        """Source tokens per text, cut to `max_length`, each with whether it was cut."""
        budget = max_length - len(self.prefix) - (1 if self.append_eos else 0)
        encoded = []
        for pieces in self.source.encode(texts, out_type=str):
            truncated = len(pieces) > budget
            pieces = self.prefix + pieces[:budget]
            encoded.append((pieces + ["</s>"] if self.append_eos else pieces, truncated))
        return encoded

    def decode(self, tokens: list[str]) -> str:
        return self.target.decode_pieces(tokens).strip()


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
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        ctranslate2.converters.TransformersConverter(str(path) if path.exists() else model, copy_files=["source.spm", "target.spm"]).convert(str(temporary))
    except Exception as error:  # the converter raises many types; all mean the same to the user
        shutil.rmtree(temporary, ignore_errors=True)
        raise ModelError(f"MT model {model}: cannot convert to CTranslate2 ({error}); pass a Marian model or a CT2 directory") from error
    temporary.rename(converted)
    return converted


@dataclass(frozen=True)
class Translation:
    """One output text with the token counts the stage reports."""

    text: str
    source_tokens: int = 0
    target_tokens: int = 0
    truncated: bool = False


def translate_texts(translator, codec: SentencePieceCodec, texts: list[str], options: DecodingOptions) -> list[Translation]:
    """Translate `texts` in order; an empty or blank input gives an empty output without calling the model."""
    outputs = [Translation("")] * len(texts)
    todo = [index for index, text in enumerate(texts) if text and text.strip()]
    if not todo:
        return outputs
    encoded = codec.encode([texts[index] for index in todo], options.max_input_length)
    results = translator.translate_batch(
        [tokens for tokens, _ in encoded],
        beam_size=options.beam_size,
        max_batch_size=options.batch_size,
        max_decoding_length=options.max_decoding_length,
    )
    for index, (tokens, truncated), result in zip(todo, encoded, results):
        hypothesis = result.hypotheses[0]
        outputs[index] = Translation(codec.decode(hypothesis), len(tokens), len(hypothesis), truncated)
    return outputs
