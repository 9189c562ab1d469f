"""The Translate-Train baseline: cross-entropy with the positive passage as the label."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ContrastiveLoss(nn.Module):
    """Cross-entropy of each query over its passages, the positive being the right answer.

    The Translate-Train baseline of Translate-Distill (Yang, Lawrie, Mayfield et al., ECIR 2024), and what
    PLAID-X 0.3.1 trains with when the training file has no scores: ``CrossEntropyLoss(scores, 0)`` over each
    query's (positive, negatives). Scores are divided by ``temperature`` first (1 is PLAID-X).

    Inputs: ``student_scores`` of shape

    - [batch, n] without in-batch negatives: row i holds query i's scores of its own n passages, its positive
      in column 0;
    - [batch, batch * n] with ``in_batch_negatives=True``: row i holds query i's scores of every passage in the
      batch, grouped query by query, so column j * n + k is passage k of query j and query i's positive is
      column i * n. All other passages of the batch, its own negatives included, are negatives of query i.
      (ColBERTv2 instead adds a second cross-entropy without the query's own negatives; this is the single
      softmax of sentence-transformers' MultipleNegativesRankingLoss.)
    """

    def __init__(self, temperature: float = 1.0, in_batch_negatives: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.in_batch_negatives = in_batch_negatives

    def forward(self, student_scores: torch.Tensor, same_query: torch.Tensor | None = None) -> torch.Tensor:
        """`same_query` ([batch, batch] bool, in-batch negatives only): entries i != j that are copies of one query
        (round-robin MTD repeats each query once per language). Their passages are no negatives of each other:
        another copy's positive is the same passage in another language."""
        if student_scores.dim() != 2:
            raise ValueError(f"student scores {tuple(student_scores.shape)} must be a 2-d [batch, ...] matrix")
        batch, columns = student_scores.shape
        if self.in_batch_negatives:
            if columns % batch or columns < batch:
                raise ValueError(
                    f"with in-batch negatives the student scores must be [batch, batch * nway] (every query scored "
                    f"against every passage of the batch, grouped query by query); got {tuple(student_scores.shape)}, "
                    f"and {columns} columns are not a multiple of the batch of {batch}"
                )
            labels = torch.arange(batch, device=student_scores.device) * (columns // batch)
            if same_query is not None:
                hidden = same_query.to(student_scores.device).repeat_interleave(columns // batch, dim=1)
                student_scores = student_scores.masked_fill(hidden, float("-inf"))
        else:
            if columns < 2:
                raise ValueError(
                    f"student scores {tuple(student_scores.shape)} must be [batch, nway] with nway >= 2 (a positive in "
                    "column 0 and at least one negative): raise distill.nway"
                )
            labels = torch.zeros(batch, dtype=torch.long, device=student_scores.device)
        return F.cross_entropy(student_scores / self.temperature, labels)
