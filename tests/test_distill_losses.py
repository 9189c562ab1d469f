"""distill losses: KL with alpha and a student temperature, Margin-MSE and the contrastive loss, against hand sums."""
from __future__ import annotations

import math

import pytest
import torch

from td_ray.distill.losses import ContrastiveLoss, KLDistillationLoss, MarginMSELoss


def _log_softmax(row: list[float]) -> list[float]:
    norm = math.log(sum(math.exp(x) for x in row))
    return [x - norm for x in row]


def _kl_by_hand(student: list[list[float]], teacher: list[list[float]], alpha: float, temperature: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        log_p = _log_softmax([alpha * t for t in t_row])
        log_q = _log_softmax([s / temperature for s in s_row])
        total += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q, strict=True))
    return total / len(student)  # batchmean: sum over the batch divided by its size


STUDENT = [[2.0, 1.0, 0.0], [0.5, 0.5, 3.0]]
TEACHER = [[10.0, 8.0, 1.0], [1.0, 2.0, 0.0]]


def test_kl_with_alpha_and_student_temperature_equals_hand_computation():
    loss = KLDistillationLoss(alpha=0.5, student_temperature=2.0)(torch.tensor(STUDENT), torch.tensor(TEACHER))
    expected = _kl_by_hand(STUDENT, TEACHER, alpha=0.5, temperature=2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the temperature matters: without it the loss is a different number
    assert expected != pytest.approx(_kl_by_hand(STUDENT, TEACHER, alpha=0.5, temperature=1.0), rel=1e-3)


def test_kl_defaults_are_the_paper_loss():
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    old = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(
        torch.log_softmax(student, dim=-1), torch.log_softmax(teacher, dim=-1))
    assert KLDistillationLoss()(student, teacher).item() == pytest.approx(old.item(), rel=1e-6)
    assert KLDistillationLoss(1.0, 1.0)(student, teacher).item() == pytest.approx(
        _kl_by_hand(STUDENT, TEACHER, alpha=1.0, temperature=1.0), rel=1e-5)


def test_kl_rejects_a_non_positive_temperature():
    with pytest.raises(ValueError, match="student_temperature"):
        KLDistillationLoss(student_temperature=0.0)


def test_margin_mse_equals_hand_computation():
    student = [[3.0, 1.0, 2.5], [0.0, 1.0, -1.0]]
    teacher = [[5.0, 2.0, 4.0], [1.0, 1.5, -2.0]]
    squared = [((s[0] - s[j]) - (t[0] - t[j])) ** 2 for s, t in zip(student, teacher, strict=True) for j in (1, 2)]
    # margins: student (2, 0.5), (-1, 1); teacher (3, 1), (-0.5, 3) -> errors 1, 0.25, 0.25, 4
    assert squared == [1.0, 0.25, 0.25, 4.0]
    loss = MarginMSELoss()(torch.tensor(student), torch.tensor(teacher))
    assert loss.item() == pytest.approx(sum(squared) / 4)


def test_margin_mse_ignores_a_shift_of_either_side_but_not_a_scale():
    student, teacher = torch.tensor([[3.0, 1.0, 2.5]]), torch.tensor([[5.0, 2.0, 4.0]])
    base = MarginMSELoss()(student, teacher).item()
    assert MarginMSELoss()(student + 7.0, teacher - 3.0).item() == pytest.approx(base)
    assert MarginMSELoss()(student, teacher * 2).item() != pytest.approx(base)


def test_contrastive_equals_hand_computation_with_temperature():
    scores = [[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]]
    temperature = 0.5
    expected = sum(-_log_softmax([x / temperature for x in row])[0] for row in scores) / 2
    loss = ContrastiveLoss(temperature=temperature)(torch.tensor(scores))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_in_batch_negatives_add_the_other_queries_passages_as_computed_by_hand():
    # 2 queries, nway 2: columns are (q0 pos, q0 neg, q1 pos, q1 neg); query i's positive is column 2 * i
    all_pairs = [[3.0, 1.0, 2.0, 0.0],
                 [1.5, 0.5, 1.0, -1.0]]
    own = [row[2 * i: 2 * i + 2] for i, row in enumerate(all_pairs)]
    in_batch = ContrastiveLoss(in_batch_negatives=True)(torch.tensor(all_pairs)).item()
    plain = ContrastiveLoss()(torch.tensor(own)).item()
    expected_in_batch = (-_log_softmax(all_pairs[0])[0] - _log_softmax(all_pairs[1])[2]) / 2
    expected_plain = (-_log_softmax(own[0])[0] - _log_softmax(own[1])[0]) / 2
    assert in_batch == pytest.approx(expected_in_batch, rel=1e-6)
    assert plain == pytest.approx(expected_plain, rel=1e-6)
    assert in_batch > plain  # more negatives, same positives: a larger loss


def test_in_batch_negatives_never_count_another_copy_of_the_same_query():
    """Round-robin MTD repeats a query once per language: its other copy's positive is the same passage in
    another language and must not be a negative. Entries 0 and 1 are copies of q1, entry 2 is q2; nway 2."""
    from td_ray.distill.sampling import TrainingEntry
    from td_ray.distill.train import same_query_mask

    entries = [TrainingEntry(qid, ["a", "b"], [1.0, 0.0], [lang] * 2, [0, 1])
               for qid, lang in (("q1", "zh"), ("q1", "fa"), ("q2", "zh"))]
    same = same_query_mask(entries)
    assert same.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    scores = [[5.0, 0.0, 5.0, 0.0, 1.0, 1.0],
              [5.0, 0.0, 5.0, 0.0, 1.0, 1.0],
              [1.0, 1.0, 1.0, 1.0, 5.0, 0.0]]
    masked = ContrastiveLoss(in_batch_negatives=True)(torch.tensor(scores), same).item()
    kept = [[0, 1, 4, 5], [2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]  # each row without the other copy's passages
    positive = [0, 0, 4]
    expected = sum(-_log_softmax([scores[i][c] for c in kept[i]])[positive[i]] for i in range(3)) / 3
    assert masked == pytest.approx(expected, rel=1e-6)
    assert ContrastiveLoss(in_batch_negatives=True)(torch.tensor(scores)).item() > 5 * masked  # unmasked: ln 2 a copy


@pytest.mark.parametrize(("loss", "args", "message"), [
    (KLDistillationLoss(), (torch.zeros(2, 3), torch.zeros(2, 4)), r"\[batch, nway\].*distill\.nway"),
    (MarginMSELoss(), (torch.zeros(2, 3), torch.zeros(2, 4)), r"\[batch, nway\].*column 0"),
    (MarginMSELoss(), (torch.zeros(2, 1), torch.zeros(2, 1)), r"nway >= 2"),
    (ContrastiveLoss(), (torch.zeros(2, 1),), r"\[batch, nway\] with nway >= 2"),
    (ContrastiveLoss(), (torch.zeros(6),), r"2-d \[batch, \.\.\.\]"),
    (ContrastiveLoss(in_batch_negatives=True), (torch.zeros(2, 5),), r"\[batch, batch \* nway\].*\(2, 5\)"),
])
def test_shape_errors_name_the_expected_shapes(loss, args, message):
    with pytest.raises(ValueError, match=message):
        loss(*args)
