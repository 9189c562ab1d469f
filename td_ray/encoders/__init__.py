"""The student encoders shared by distill (training), index, evaluate and the registry.

- :mod:`td_ray.encoders.dense`: the single-vector dual encoder (CLS or mean pooling, dot or cosine) and its
  inference wrapper;
- :mod:`td_ray.encoders.colbert`: ColBERT-X (token vectors, MaxSim) and its inference wrapper;
- :mod:`td_ray.encoders.passages`: documents cut into overlapping passages of the student's tokens (MaxP).

`student_kind` tells which a saved student directory holds.
"""
from __future__ import annotations

from pathlib import Path

from td_ray.encoders.spec import is_colbert


def student_kind(model: str | Path) -> str:
    """"colbert" for a td-ray ColBERT student directory, else "dense"."""
    return "colbert" if is_colbert(model) else "dense"
