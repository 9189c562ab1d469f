"""Margin-MSE: the student's score margins regress onto the teacher's."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MarginMSELoss(nn.Module):
    """Mean squared error between student and teacher margins, positive minus each other passage.

    Hofstätter, Althammer, Schröder, Sertkan and Hanbury, "Improving Efficient Neural Ranking Models with
    Cross-Architecture Knowledge Distillation", 2020 (arXiv 2010.02666): loss = MSE(s(q, p+) - s(q, p-),
    t(q, p+) - t(q, p-)). With n passages per query, column 0 is p+ and each of columns 1..n-1 is a p-; the
    mean is over all batch * (n - 1) margins. Margins are matched on the teacher's raw scale, so unlike the KL
    loss this one depends on how the teacher's scores are scaled.

    Inputs: ``student_scores`` and ``teacher_scores``, both [batch, n] with n >= 2, the positive (the best
    teacher-scored passage, as the samplers order them) in column 0.
    """

    def forward(self, student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
        if student_scores.dim() != 2 or student_scores.shape != teacher_scores.shape or student_scores.shape[1] < 2:
            raise ValueError(
                f"student scores {tuple(student_scores.shape)} and teacher scores {tuple(teacher_scores.shape)} must "
                "both be [batch, nway] with nway >= 2 and the positive in column 0: give every query the same "
                "number of scored passages (distill.nway), at least two"
            )
        teacher = teacher_scores.to(student_scores.dtype)
        return F.mse_loss(student_scores[:, :1] - student_scores[:, 1:], teacher[:, :1] - teacher[:, 1:])
