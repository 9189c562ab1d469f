"""distill: the KL loss, example building, DDP training on Ray Train, checkpoints and resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoTokenizer

from td_ray.config import DistillConfig
from td_ray.distill import make_trainer
from td_ray.distill.data import ShortListError, build_examples
from td_ray.distill.losses import KLDistillationLoss
from td_ray.distill.model import DualEncoder, StudentEncoder
from td_ray.distill.train import STATE_FILE, make_loss, sample_batch, train_step
from td_ray.workspace import STUDENT_DIR, Workspace


def test_kl_loss_equals_hand_computation():
    student = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    teacher = torch.tensor([[10.0, 8.0, 1.0], [1.0, 2.0, 0.0]])
    alpha = 0.5
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p = np.exp(np.array(t_row) * alpha) / np.exp(np.array(t_row) * alpha).sum()
        q = np.exp(np.array(s_row)) / np.exp(np.array(s_row)).sum()
        expected += float((p * (np.log(p) - np.log(q))).sum())
    expected /= 2  # batchmean
    assert KLDistillationLoss(alpha)(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert KLDistillationLoss()(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_loss_shape_error_says_how_to_fix():
    with pytest.raises(ValueError, match="distill.nway"):
        KLDistillationLoss()(torch.zeros(2, 3), torch.zeros(2, 4))


def _scores_table(rows):
    return pa.table({"qid": [r[0] for r in rows], "pid": [r[1] for r in rows], "score": pa.array([r[2] for r in rows], pa.float32())})


def test_examples_take_the_top_k_by_teacher_score_in_the_configured_language():
    scores = _scores_table([("q1", "a", 0.1), ("q1", "b", 5.0), ("q1", "c", 2.0), ("q2", "a", 1.0)])
    queries = pa.table({"id": ["q1", "q2"], "text": ["first", "second"]})
    passages = pa.table({"id": ["a", "b", "c"], "text": ["A-syn", "B-syn", "C-syn"]})
    every, _ = build_examples(scores, queries, passages, nway=2)
    assert every["pids"].to_pylist() == [["b", "c", "a"]]  # best first; the trainer samples nway of them
    examples, skipped = build_examples(scores, queries, passages, nway=2, top_k=2)
    assert skipped == ["q2"]
    assert examples.to_pylist() == [{"qid": "q1", "query": "first", "pids": ["b", "c"], "passages": ["B-syn", "C-syn"],
                                     "teacher_scores": [5.0, 2.0]}]
    with pytest.raises(ShortListError, match="'q2' has 1 scored candidates"):
        build_examples(scores, queries, passages, nway=2, short_list_policy="error")
    with pytest.raises(ValueError, match=r"1 row\(s\) name a pid with no text in the passages, e.g. \['c'\]"):
        build_examples(scores, queries, passages.slice(0, 2), nway=2)


BATCH = {"qid": ["q1", "q2"], "query": ["balto mirek", "fobe kanu"],
         "pids": [["a", "b", "c", "d"], ["e", "f", "g", "h"]],
         "passages": [["balto mirek dusa", "kanu lete", "rima sote", "lete sote"],
                      ["fobe kanu rima", "mirek lete", "dusa", "sote rima"]],
         "teacher_scores": [np.array([5.0, 1.0, 0.0, -1.0]), np.array([4.0, 1.0, 0.0, -2.0])]}


def test_samplers_draw_nway_of_the_ranked_candidates_with_their_text():
    config = DistillConfig(student="s", passage_lang="syn", nway=3)
    _, passages, scores = sample_batch(BATCH, config, np.random.default_rng(0), 0.0)
    assert passages == BATCH["passages"][0][:3] + BATCH["passages"][1][:3] and scores[0] == [5.0, 1.0, 0.0]
    drawn = DistillConfig(student="s", passage_lang="syn", nway=3, sampler="random")
    seen = set()
    for seed in range(40):
        _, passages, scores = sample_batch(BATCH, drawn, np.random.default_rng(seed), 0.5)
        text_to_score = dict(zip(BATCH["passages"][0], BATCH["teacher_scores"][0]))
        assert [text_to_score[text] for text in passages[:3]] == scores[0]  # text and score stay paired
        seen.add(tuple(passages[:3]))
    assert len(seen) == 4  # every 3-of-4 subset is drawn
    again = sample_batch(BATCH, drawn, np.random.default_rng(7), 0.5)
    assert again == sample_batch(BATCH, drawn, np.random.default_rng(7), 0.5)


@pytest.mark.parametrize("loss", ["kl", "margin_mse", "contrastive"])
def test_loss_falls_over_steps_on_a_fixed_batch(assets_root, loss):
    path = str(assets_root / "tiny-models" / "student")
    torch.manual_seed(0)
    model, tokenizer = DualEncoder.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    config = DistillConfig(student=path, passage_lang="syn", nway=3, query_maxlen=16, passage_maxlen=32, loss=loss)
    loss_fn = make_loss(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = train_step(model, loss_fn, tokenizer, BATCH, config, torch.device("cpu"), np.random.default_rng(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_pipeline_trained_saved_and_checkpoint_loads_back_into_the_same_scores(pipeline_run):
    config, results = pipeline_run
    workspace = Workspace(config.workspace)
    assert results["distill"].metrics["steps"] == config.distill.steps
    student_dir = Path(workspace.path(STUDENT_DIR))
    assert json.loads((student_dir / "td_ray_student.json").read_text()) == {"pooling": "cls"}
    initial = StudentEncoder(config.distill.student).encode(["balto mirek"])
    trained = StudentEncoder(str(student_dir)).encode(["balto mirek"])
    assert not np.allclose(initial, trained)  # training changed the weights

    checkpoints = sorted((path for path in Path(workspace.path("ray_train")).glob("*/checkpoint_*") if path.is_dir()),
                         key=lambda path: path.stat().st_mtime)
    state = torch.load(checkpoints[-1] / STATE_FILE, map_location="cpu", weights_only=True)
    assert state["step"] == config.distill.steps
    restored = DualEncoder.from_pretrained(config.distill.student)
    restored.load_state_dict(state["model"])
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    saved = DualEncoder.from_pretrained(str(student_dir)).eval()
    restored.eval()
    query = tokenizer(["balto mirek"], return_tensors="pt")
    passages = tokenizer(["balto mirek dusa", "kanu lete"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(restored(dict(query), dict(passages)), saved(dict(query), dict(passages)), atol=1e-5)


def test_fit_again_resumes_from_the_last_checkpoint(pipeline_run, ray_cluster):
    import ray.data

    config, _ = pipeline_run
    workspace = Workspace(config.workspace)
    examples = workspace.read_table("distill/examples.parquet")
    result = make_trainer(config, workspace, ray.data.from_arrow(examples), run_id=None).fit()
    assert result.metrics["start_step"] == config.distill.steps  # resumed, not retrained from step 0
    assert result.metrics["step"] == config.distill.steps


def test_missing_input_column_is_named_before_training(make_workspace):
    from td_ray import distill
    from td_ray.schemas import MissingColumnsError

    config = make_workspace()
    Workspace(config.workspace).write_table(pa.table({"qid": ["q1"], "pid": ["p1"]}), "score/scores.parquet")
    with pytest.raises(MissingColumnsError, match=r"'score/scores.parquet' is missing column\(s\) \['score'\]"):
        distill.run(config)
    assert not (Path(config.workspace) / "ray_train").exists()
