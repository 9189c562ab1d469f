"""What a saved ColBERT student is (:class:`ColBERTSpec`, beside its weights), readable without importing torch:
`td_ray.encoders.student_kind` tells a student's kind without loading a model."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COLBERT_SPEC_FILE", "ColBERTSpec", "is_colbert"]

COLBERT_SPEC_FILE = "td_ray_colbert.json"
"""JSON beside the HF weights: the :class:`ColBERTSpec` a ColBERT student was trained with."""


@dataclass(frozen=True)
class ColBERTSpec:
    """How a ColBERT student tokenizes and projects; saved with it so indexing and search match training."""

    dim: int = 128
    query_maxlen: int = 32
    doc_maxlen: int = 220
    """PLAID-X's default; td-ray's training passes distill.passage_maxlen instead."""
    query_marker: str = "[unused0]"
    doc_marker: str = "[unused1]"
    attend_to_mask_tokens: bool = False
    """PLAID-X's default: the query's tokens do not attend to its [MASK] padding (the padding still scores)."""
    mask_punctuation: bool = False
    """Drop punctuation tokens from documents' MaxSim. Off: RECIPE.md does not state it (PLAID-X turns it on)."""

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"ColBERT dim must be at least 1, got {self.dim}")
        for name in ("query_maxlen", "doc_maxlen"):
            if getattr(self, name) < 4:
                raise ValueError(f"ColBERT {name} must be at least 4 ([CLS], marker, one token, [SEP]), "
                                 f"got {getattr(self, name)}")

    @classmethod
    def load(cls, model: str | Path) -> ColBERTSpec | None:
        """The spec saved in a student directory, or None when `model` is not a td-ray ColBERT student."""
        path = Path(model) / COLBERT_SPEC_FILE
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except TypeError as error:
            raise ValueError(f"{path} does not describe a ColBERT student ({error}); re-save the model") from None


def is_colbert(model: str | Path) -> bool:
    """Whether `model` is a directory holding a td-ray ColBERT student (as opposed to a dense one)."""
    return (Path(model) / COLBERT_SPEC_FILE).is_file()
