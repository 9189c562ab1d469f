"""What a saved ColBERT student is (:class:`ColBERTSpec`, beside its weights), readable without importing torch:
`td_ray.encoders.student_kind` tells a student's kind without loading a model."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COLBERT_SPEC_FILE", "ColBERTSpec", "is_colbert"]

PLAIDX_METADATA = "artifact.metadata"
"""The ColBERT config PLAID-X (and Stanford ColBERT) saves beside a checkpoint; td-ray writes it too."""
COLBERT_SPEC_FILE = "td_ray_colbert.json"
"""Where students saved before the PLAID-X layout kept their :class:`ColBERTSpec` (still read)."""
PLAIDX_DEFAULTS = {"dim": 128, "query_maxlen": 32, "doc_maxlen": 180, "query_token_id": "[unused0]",
                   "doc_token_id": "[unused1]", "attend_to_mask_tokens": False, "mask_punctuation": True}
"""PLAID-X's ColBERTConfig defaults, for keys a checkpoint's metadata leaves out."""


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
        """The spec saved with a ColBERT model (its PLAID-X `artifact.metadata`, or an older td-ray student's
        spec file), or None when `model` is not a ColBERT model."""
        legacy = Path(model) / COLBERT_SPEC_FILE
        if legacy.is_file():
            try:
                return cls(**json.loads(legacy.read_text(encoding="utf-8")))
            except TypeError as error:
                raise ValueError(f"{legacy} does not describe a ColBERT student ({error}); re-save the model") from None
        path = Path(model) / PLAIDX_METADATA
        if not path.is_file():
            return None
        return cls.from_metadata(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def from_metadata(cls, metadata: dict) -> ColBERTSpec:
        """A spec from PLAID-X `artifact.metadata` keys, with PLAID-X's defaults for those left out."""
        saved = PLAIDX_DEFAULTS | metadata
        return cls(dim=int(saved["dim"]), query_maxlen=int(saved["query_maxlen"]), doc_maxlen=int(saved["doc_maxlen"]),
                   query_marker=saved["query_token_id"], doc_marker=saved["doc_token_id"],
                   attend_to_mask_tokens=bool(saved["attend_to_mask_tokens"]),
                   mask_punctuation=bool(saved["mask_punctuation"]))

    def metadata(self) -> dict:
        """The spec as PLAID-X's `artifact.metadata` keys.

        >>> ColBERTSpec.from_metadata(ColBERTSpec(dim=64).metadata()) == ColBERTSpec(dim=64)
        True
        """
        return {"dim": self.dim, "query_maxlen": self.query_maxlen, "doc_maxlen": self.doc_maxlen,
                "query_token_id": self.query_marker, "doc_token_id": self.doc_marker,
                "attend_to_mask_tokens": self.attend_to_mask_tokens, "mask_punctuation": self.mask_punctuation,
                "similarity": "cosine"}


def is_colbert(model: str | Path) -> bool:
    """Whether `model` is a directory holding a ColBERT model (PLAID-X layout, or an older td-ray ColBERT student),
    as opposed to a dense one."""
    return (Path(model) / PLAIDX_METADATA).is_file() or (Path(model) / COLBERT_SPEC_FILE).is_file()
