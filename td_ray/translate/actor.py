"""The Ray Data callable class that holds one ctranslate2.Translator per actor."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from td_ray.translate.core import DecodingOptions, SentencePieceCodec, translate_texts

logger = logging.getLogger(__name__)

#: Columns the actor reads from each batch.
INPUT_COLUMNS = ("id", "text")


class CT2TranslatorActor:
    """Translates batches of ``{id, text}`` into ``{id, lang, text, mt_model}``; loads the model once."""

    def __init__(self, model_dir: str, lang: str, mt_model: str, options: DecodingOptions,
                 device: str = "auto", compute_type: str = "default", intra_threads: int = 1,
                 source_prefix: str | None = None):
        import ctranslate2

        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        self.translator = ctranslate2.Translator(model_dir, device=device, compute_type=compute_type,
                                                 intra_threads=intra_threads, inter_threads=1)
        self.codec = SentencePieceCodec(Path(model_dir), source_prefix)
        self.lang, self.mt_model, self.options = lang, mt_model, options
        logger.info("translator for %s loaded on %s from %s", lang, device, model_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = ["" if text is None else str(text) for text in batch["text"]]
        translations = translate_texts(self.translator, self.codec, texts, self.options)
        size = len(texts)
        return {
            "id": batch["id"],
            "lang": np.full(size, self.lang, dtype=object),
            "text": np.array([item.text for item in translations], dtype=object),
            "mt_model": np.full(size, self.mt_model, dtype=object),
            "source_tokens": np.array([item.source_tokens for item in translations], dtype=np.int64),
            "target_tokens": np.array([item.target_tokens for item in translations], dtype=np.int64),
            "truncated": np.array([item.truncated for item in translations], dtype=bool),
        }
