"""Pure teacher logic: a sequence-classification cross-encoder scores (query, passage) pairs.

Scores are the raw logit (never squashed by a sigmoid), so any later softmax sees the teacher's real margins.
"""
from __future__ import annotations

import logging

import numpy as np
from td_ray.errors import ModelError

logger = logging.getLogger(__name__)


def check_teacher(model: str, revision: str | None = None, trust_remote_code: bool = False) -> None:
    """Fail fast, on the driver and from the config alone, if `model` is no single-logit cross-encoder."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(f"teacher {model!r} cannot be loaded ({error}); set score.teacher to a local "
                         "directory or a reachable hub id") from None
    if config.num_labels != 1:
        raise ModelError(f"teacher {model!r} has {config.num_labels} output labels; a cross-encoder "
                         "teacher must have exactly one relevance logit")


class CrossEncoderTeacher:
    """An AutoModelForSequenceClassification with one output logit per pair, in eval mode."""

    def __init__(self, model: str, max_length: int, revision: str | None = None, trust_remote_code: bool = False,
                 device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_teacher(model, revision, trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model, revision=revision, trust_remote_code=trust_remote_code
        )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.max_length = max_length

    def score(self, queries: list[str], passages: list[str]) -> np.ndarray:
        """The relevance logit of each (query, passage) pair, as float32."""
        import torch

        encoded = self.tokenizer(queries, passages, truncation="longest_first", max_length=self.max_length,
                                 padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            logits = self.model(**encoded).logits[:, 0]
        return logits.float().cpu().numpy()
