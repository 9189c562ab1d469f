"""distill: the KL loss, example building, DDP training on Ray Train, checkpoints and resume."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import with_updates
from transformers import AutoTokenizer

from td_ray.config import DistillConfig
from td_ray.distill import EXAMPLES, make_trainer
from td_ray.distill.data import (
    ExampleFilter,
    ShortListError,
    group_by_query,
    read_positives,
)
from td_ray.distill.losses import KLDistillationLoss
from td_ray.encoders.dense import DualEncoder, StudentEncoder, saved_pooling
from td_ray.distill.train import (
    STATE_FILE,
    Student,
    TrainingTexts,
    join_text,
    make_entries,
    make_loss,
    train_step,
)
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


def _scores(rows):
    return pa.table({"qid": [r[0] for r in rows], "pid": [r[1] for r in rows],
                     "score": pa.array([r[2] for r in rows], pa.float32())})


def test_a_query_becomes_its_candidates_best_first_cut_to_top_k():
    scores = _scores([("q1", "a", 0.1), ("q2", "z", 1.0), ("q1", "b", 5.0), ("q1", "c", 2.0), ("q1", "d", 2.0)])
    grouped = group_by_query(scores).to_pylist()
    assert grouped[0] == {"qid": "q1", "pids": ["b", "c", "d", "a"],
                          "teacher_scores": [5.0, 2.0, 2.0, pytest.approx(0.1)], "positives": []}
    assert grouped[1]["qid"] == "q2" and grouped[1]["pids"] == ["z"]
    assert group_by_query(scores, top_k=2)["pids"].to_pylist()[0] == ["b", "c"]  # ties broken by pid
    with pytest.raises(ValueError, match="'q1' has a teacher score that is NaN"):
        group_by_query(_scores([("q1", "a", float("nan")), ("q1", "b", 1.0)]))


def test_a_score_table_in_any_order_is_grouped_in_buckets_each_query_once(tmp_path, monkeypatch):
    from td_ray.distill import data

    monkeypatch.setattr(data, "BUCKET_ROWS", 40)  # 200 rows: five buckets
    rng = np.random.default_rng(0)
    rows = [(f"q{q}", f"p{p}", float(rng.normal())) for q in range(20) for p in range(10)]
    rng.shuffle(rows)  # queries interleaved, as blocks of a resumed score run can leave them
    workspace = Workspace(str(tmp_path))
    workspace.write_table(_scores(rows), "score/scores.parquet")
    grouped = pa.concat_tables(data.group_scores(workspace, "score/scores.parquet", "distill/.groups", top_k=4))
    assert sorted(grouped["qid"].to_pylist()) == sorted(f"q{q}" for q in range(20))
    best = {}
    for qid, pid, score in rows:
        best.setdefault(qid, []).append((-np.float32(score), pid))
    assert {row["qid"]: row["pids"] for row in grouped.to_pylist()} == {
        qid: [pid for _, pid in sorted(items)[:4]] for qid, items in best.items()}
    assert not (tmp_path / "distill" / ".groups").exists()


def _examples(rows):
    return pa.table({"qid": [r[0] for r in rows], "pids": [r[1] for r in rows],
                     "teacher_scores": [[1.0] * len(r[1]) for r in rows], "positives": [[] for _ in rows]})


def test_short_lists_are_skipped_or_refused_and_qrels_positives_attached():
    batch = _examples([("q1", ["a", "b", "c"]), ("q2", ["a"]), ("q3", ["a", "b", "c"])])
    keep = ExampleFilter(nway=2)
    assert keep(batch)["qid"].to_pylist() == ["q1", "q3"] and keep.skipped == ["q2"]
    with pytest.raises(ShortListError, match="'q2' has 1 scored candidates, fewer than nway=2"):
        ExampleFilter(nway=2, short_list_policy="error")(batch)

    qrels = pa.table({"qid": ["q1", "q1", "q3", "q3", "q3"], "docid": ["a", "x", "a", "b", "c"],
                      "relevance": pa.array([1, 2, 0, 1, 1], pa.int32())})
    keep = ExampleFilter(nway=3, positives=read_positives(qrels))
    kept = keep(batch).sort_by("qid")
    # q1: positives a and x (x is no candidate), negatives b and c; q2: no judgement; q3: one negative (a,
    # judged 0) where nway - 1 = 2 are needed
    assert kept["qid"].to_pylist() == ["q1"] and sorted(kept["positives"][0].as_py()) == ["a", "x"]
    assert sorted(keep.skipped) == ["q2", "q3"]


BATCH = {"qid": ["q1", "q2"], "pids": [["a", "b", "c", "d"], ["e", "f", "g", "h"]],
         "teacher_scores": [np.array([5.0, 1.0, 0.0, -1.0]), np.array([4.0, 1.0, 0.0, -2.0])],
         "positives": [np.array([], dtype=object), np.array([], dtype=object)]}
QUERIES = {"q1": "balto mirek", "q2": "fobe kanu"}
PASSAGES = {"a": "balto mirek dusa", "b": "kanu lete", "c": "rima sote", "d": "lete sote",
            "e": "fobe kanu rima", "f": "mirek lete", "g": "dusa", "h": "sote rima"}


def texts_in(*langs: str) -> TrainingTexts:
    """Texts as the workers see them; a passage in language `xx` reads `xx:<text>`."""
    return TrainingTexts(lambda ids: [QUERIES[i] for i in ids],
                         {lang: (lambda ids, lang=lang: [f"{lang}:{PASSAGES[i]}" for i in ids]) for lang in langs})


def test_samplers_draw_nway_of_the_ranked_candidates_with_their_text():
    config = DistillConfig(student="s", passage_lang="syn", nway=3)
    entries = make_entries(BATCH, config, np.random.default_rng(0), 0.0)
    queries, passages = join_text(entries, texts_in("syn"))
    assert queries == ["balto mirek", "fobe kanu"]
    assert passages == [f"syn:{PASSAGES[p]}" for p in "abcefg"] and entries[0].teacher_scores == [5.0, 1.0, 0.0]
    drawn = DistillConfig(student="s", passage_lang="syn", nway=3, sampler="random")
    seen = set()
    for seed in range(40):
        entry = make_entries(BATCH, drawn, np.random.default_rng(seed), 0.5)[0]
        score_of = dict(zip(BATCH["pids"][0], BATCH["teacher_scores"][0]))
        assert [score_of[pid] for pid in entry.pids] == entry.teacher_scores  # ids and scores stay paired
        seen.add(tuple(entry.pids))
    assert len(seen) == 4  # every 3-of-4 subset is drawn
    again = make_entries(BATCH, drawn, np.random.default_rng(7), 0.5)
    assert again == make_entries(BATCH, drawn, np.random.default_rng(7), 0.5)


@pytest.mark.parametrize("mixing", ["mix-passages", "mix-entries", "round-robin"])
def test_the_trainer_reads_each_passage_in_the_language_mtd_mixing_picked(mixing):
    config = DistillConfig(student="s", passage_lang=["syn", "qaa"], mixing=mixing, nway=3)
    counts = {"syn": 0, "qaa": 0}
    for seed in range(30):
        entries = make_entries(BATCH, config, np.random.default_rng(seed), 0.0)
        queries, passages = join_text(entries, texts_in("syn", "qaa"))
        assert len(entries) == (4 if mixing == "round-robin" else 2) and len(queries) == len(entries)
        for entry, texts in zip(entries, (passages[i:i + 3] for i in range(0, len(passages), 3))):
            assert texts == [f"{lang}:{PASSAGES[pid]}" for pid, lang in zip(entry.pids, entry.langs)]
            if mixing != "mix-passages":
                assert len(set(entry.langs)) == 1  # one language per entry
            for lang in entry.langs:
                counts[lang] += 1
        if mixing == "round-robin":  # each query once per language, same passages and scores
            assert [e.langs[0] for e in entries] == ["syn", "qaa", "syn", "qaa"]
            assert entries[0].pids == entries[1].pids and entries[0].teacher_scores == entries[1].teacher_scores
    assert counts["syn"] > 0.35 * sum(counts.values()) and counts["qaa"] > 0.35 * sum(counts.values())


def test_translate_train_draws_a_judged_positive_then_unjudged_negatives():
    config = DistillConfig(student="s", passage_lang="syn", nway=3, loss="contrastive", positives="qrels",
                           sampler="random")
    batch = dict(BATCH, positives=[np.array(["c", "z"], dtype=object), np.array(["e"], dtype=object)])
    firsts, negatives = set(), set()
    for seed in range(40):
        first, second = make_entries(batch, config, np.random.default_rng(seed), 0.0)
        assert first.pids[0] in ("c", "z") and second.pids[0] == "e"
        assert first.teacher_scores == [1.0, 0.0, 0.0]
        assert not {"c", "z"} & set(first.pids[1:]) and "e" not in second.pids[1:]
        firsts.add(first.pids[0])
        negatives.update(first.pids[1:])
    assert firsts == {"c", "z"} and negatives == {"a", "b", "d"}


@pytest.mark.parametrize(("loss", "kind"), [("kl", "dense"), ("margin_mse", "dense"), ("contrastive", "dense"),
                                            ("kl", "colbert")])
def test_loss_falls_over_steps_on_a_fixed_batch(assets_root, loss, kind):
    path = str(assets_root / "tiny-models" / "student")
    torch.manual_seed(0)
    config = DistillConfig(student=path, passage_lang="syn", nway=3, query_maxlen=16, passage_maxlen=32, loss=loss,
                           student_kind=kind, colbert_dim=16)
    student = Student(config, path)
    loss_fn = make_loss(config)
    optimizer = torch.optim.AdamW(student.model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = train_step(student.model, loss_fn, student, texts_in("syn"), BATCH, config, torch.device("cpu"),
                          np.random.default_rng(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("kind", ["dense", "colbert"])
def test_in_batch_negatives_score_every_query_against_every_passage(assets_root, kind):
    path = str(assets_root / "tiny-models" / "student")
    config = DistillConfig(student=path, passage_lang="syn", nway=2, student_kind=kind, colbert_dim=16,
                           query_maxlen=8, passage_maxlen=16)
    student = Student(config, path)
    student.model.eval()
    inputs = student.inputs(["balto mirek", "fobe kanu"], [PASSAGES[p] for p in "abef"], torch.device("cpu"))
    with torch.no_grad():
        own, every = student.model(*inputs), student.model(*inputs, all_pairs=True)
    assert every.shape == (2, 4)
    torch.testing.assert_close(every[0, :2], own[0])
    torch.testing.assert_close(every[1, 2:], own[1])


def test_pipeline_trained_saved_and_checkpoint_loads_back_into_the_same_scores(pipeline_run):
    config, results = pipeline_run
    workspace = Workspace(config.workspace)
    metrics = results["distill"].metrics
    assert metrics["steps"] == config.distill.steps
    # the host read the device's loss and gradient norm once per logging interval (and at the checkpoint), not per step
    intervals = config.distill.steps // config.distill.log_every + 1
    assert 0 < metrics["host_syncs_per_step"] <= intervals / config.distill.steps < 0.1
    assert metrics["steps_per_s"] > 0 and metrics["host_wait_ms_per_step"] >= 0
    student_dir = Path(workspace.path(STUDENT_DIR))
    assert (student_dir / "modules.json").is_file()  # the sentence-transformers layout holds the pooling
    assert saved_pooling(student_dir) == (config.distill.pooling, config.distill.similarity)
    initial = StudentEncoder(config.distill.student).encode(["balto mirek"])
    trained = StudentEncoder(str(student_dir)).encode(["balto mirek"])
    assert not np.allclose(initial, trained)  # training changed the weights

    checkpoints = sorted((path for path in Path(workspace.path("ray_train")).glob("*/checkpoint_*") if path.is_dir()),
                         key=lambda path: path.stat().st_mtime)
    state = torch.load(checkpoints[-1] / STATE_FILE, map_location="cpu", weights_only=True)
    assert state["step"] == config.distill.steps
    restored = DualEncoder.from_pretrained(config.distill.student, config.distill.pooling, config.distill.similarity)
    restored.load_state_dict(state["model"])
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    saved = DualEncoder.from_pretrained(str(student_dir)).eval()
    restored.eval()
    query = tokenizer(["balto mirek"], return_tensors="pt")
    passages = tokenizer(["balto mirek dusa", "kanu lete"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(restored(dict(query), dict(passages)), saved(dict(query), dict(passages)), atol=1e-5)


def test_missing_input_column_is_named_before_training(make_workspace):
    from td_ray import distill
    from td_ray.schemas import MissingColumnsError

    config = make_workspace()
    Workspace(config.workspace).write_table(pa.table({"qid": ["q1"], "pid": ["p1"]}), "score/scores.parquet")
    with pytest.raises(MissingColumnsError, match=r"'score/scores.parquet' is missing column\(s\) \['score'\]"):
        distill.run(config)
    assert not (Path(config.workspace) / "ray_train").exists()


def test_examples_hold_each_scored_query_once_best_first(pipeline_run):
    config, _ = pipeline_run
    workspace = Workspace(config.workspace)
    examples = workspace.read_table(EXAMPLES)
    scores = workspace.read_table("score/scores.parquet")
    assert sorted(examples["qid"].to_pylist()) == sorted(set(scores["qid"].to_pylist()))
    by_query: dict[str, dict[str, float]] = {}
    for qid, pid, score in zip(*(scores[c].to_pylist() for c in ("qid", "pid", "score"))):
        by_query.setdefault(qid, {})[pid] = score
    for row in examples.to_pylist():
        assert row["teacher_scores"] == sorted(row["teacher_scores"], reverse=True)
        assert row["teacher_scores"] == [by_query[row["qid"]][pid] for pid in row["pids"]]
        assert set(row["pids"]) == set(by_query[row["qid"]])


def test_a_failed_worker_is_restarted_from_its_checkpoint_and_replays_the_same_losses(pipeline_run, ray_cluster,
                                                                                       tmp_path):
    """FailureConfig(max_failures=1) restarts the worker after a crash at step 4, once step 3's loss was logged;
    it resumes from the step-2 checkpoint, and its replayed step 3 has the loss the first attempt logged. Also
    covers the ColBERT-X student, MTD mixing over two languages and gradient accumulation inside the real loop."""
    from mlflow.tracking import MlflowClient

    from td_ray import tracking
    from td_ray.distill import train as train_module

    config, _ = pipeline_run
    workspace = Workspace(config.workspace)
    client = MlflowClient(tracking.tracking_uri(config))
    experiment = client.get_experiment_by_name(config.mlflow.experiment).experiment_id
    marker = tmp_path / "failed-once"

    def crash_once_at_step_4(loop_config):
        original = train_module.micro_batch_loss

        def micro_batch_loss(model, loss_fn, micro, *args, **kwargs):
            if micro.step == 3 and not marker.exists():  # the fourth step (0-based 3), after step 3 was logged
                marker.write_text("crashed")
                raise RuntimeError("injected worker failure")
            return original(model, loss_fn, micro, *args, **kwargs)

        train_module.micro_batch_loss = micro_batch_loss
        train_module.train_loop(loop_config)

    run_config = with_updates(config, distill={
        "steps": 4, "checkpoint_every": 2, "log_every": 1, "num_workers": 1, "batch_size": 4, "grad_accum_steps": 2,
        "max_failures": 1, "run_name": "restart", "student_kind": "colbert", "colbert_dim": 16, "pooling": "cls",
        "passage_lang": ["syn", "qaa"], "mixing": "mix-passages", "lr": 1e-3})
    run_id = client.create_run(experiment, run_name="restart").info.run_id
    result = make_trainer(run_config.distill, workspace, run_id, tracking.tracking_uri(config),
                          train_fn=crash_once_at_step_4).fit()
    assert marker.exists() and result.metrics["step"] == 4
    assert result.metrics["start_step"] == 2  # resumed from the step-2 checkpoint
    history = [(metric.step, metric.value) for metric in client.get_metric_history(run_id, "loss")]
    assert sorted(step for step, _ in history) == [1, 2, 3, 3, 4]  # step 3: the first attempt's, then the replay's
    first, replayed = (value for step, value in history if step == 3)
    assert replayed == pytest.approx(first, rel=1e-5, abs=1e-6)
    assert len({value for step, value in history if step != 3} | {first}) == 4  # the steps differ: not trivial
