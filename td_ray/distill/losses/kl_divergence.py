"""The Translate-Distill loss: KL divergence from the teacher's to the student's score distribution."""
from __future__ import annotations

import torch
from torch import nn


class KLDistillationLoss(nn.Module):
    """KL(teacher || student) over each query's n-way passage list.

    Yang, Lawrie, Mayfield et al., "Translate-Distill: Learning Cross-Language Dense Retrieval by Translation
    and Distillation", ECIR 2024; as in PLAID-X 0.3.1: the target is ``log_softmax(alpha * teacher)``, the input
    ``log_softmax(student)``, and ``KLDivLoss(reduction="batchmean", log_target=True)``.

    ``student_temperature`` (not in the paper; 1 keeps its loss) divides the student scores before their
    softmax, for students whose dot products live on another scale than the teacher's; the loss is not
    rescaled by it.

    Inputs: ``student_scores`` and ``teacher_scores``, both [batch, nway]; teacher scores are raw (any scale).
    """

    def __init__(self, alpha: float = 1.0, student_temperature: float = 1.0):
        super().__init__()
        if student_temperature <= 0:
            raise ValueError(f"student_temperature must be positive, got {student_temperature}")
        self.alpha = alpha
        self.student_temperature = student_temperature
        self.kl = nn.KLDivLoss(reduction="batchmean", log_target=True)

    def forward(self, student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
        if student_scores.dim() != 2 or student_scores.shape != teacher_scores.shape:
            raise ValueError(
                f"student scores {tuple(student_scores.shape)} and teacher scores {tuple(teacher_scores.shape)} must "
                "both be [batch, nway]: give every query the same number of scored passages (distill.nway)"
            )
        target = torch.log_softmax(teacher_scores.to(student_scores.dtype) * self.alpha, dim=-1)
        return self.kl(torch.log_softmax(student_scores / self.student_temperature, dim=-1), target)
