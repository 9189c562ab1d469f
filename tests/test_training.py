"""Training at the paper's scale: restart placement, run identity, buffered tracking, worker-averaged loss,
seeded epoch shuffles and lineage read from the tables trained on."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch
from conftest import with_updates

from td_ray.config import DistillConfig
from td_ray.distill import lineage, training_key
from td_ray.distill.data import ExampleShard
from td_ray.distill.train import (
    Precision,
    Prefetcher,
    StepLogger,
    StepMetrics,
    Student,
    epoch_seed,
    mean_over_workers,
    micro_batches,
    start_training,
)
from td_ray.workspace import SCORES, Workspace


def _config(**fields) -> DistillConfig:
    return DistillConfig(student="unused", passage_lang="zh", steps=10, **fields)


def test_a_restart_builds_the_optimizer_where_the_parameters_were_placed():
    """`prepare` places the model (on a GPU: `.to(cuda)`); AdamW's restored state must follow the parameters.
    On this CPU machine a cast to float64 stands in for the move: loading an optimizer's state casts it to its
    parameters' device and dtype alike, so state on the wrong side shows here as the wrong dtype."""
    from transformers import get_linear_schedule_with_warmup

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 10)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    fresh = torch.nn.Linear(4, 2)
    placed, restored, _ = start_training(fresh, _config(lr=0.1), state, prepare=lambda module: module.double())
    for parameter in placed.parameters():
        moments = restored.state[parameter]
        assert moments["exp_avg"].dtype == moments["exp_avg_sq"].dtype == parameter.dtype == torch.float64
    placed(torch.ones(3, 4, dtype=torch.float64)).sum().backward()
    restored.step()  # AdamW's grouped update runs: state and parameters agree
    assert torch.allclose(placed.weight.float(), model.weight, atol=0.2) and not torch.equal(placed.weight.float(),
                                                                                          model.weight)


def test_the_learning_rate_decays_or_stays_constant_after_the_warm_up():
    def rates(**fields) -> list[float]:
        _, optimizer, scheduler = start_training(torch.nn.Linear(2, 1), _config(lr=1.0, **fields), None,
                                                 prepare=lambda module: module)
        seen = []
        for _ in range(10):
            seen.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return seen

    assert rates() == pytest.approx([1 - step / 10 for step in range(10)])  # linear to 0 at the last step
    assert rates(lr_schedule="constant") == [1.0] * 10  # PLAID-X's
    assert rates(lr_schedule="constant", warmup_steps=4)[:5] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])


def test_gradients_are_clipped_to_max_grad_norm_and_the_norm_before_clipping_is_reported():
    model = torch.nn.Linear(3, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = model.weight.detach().clone()
    (model(torch.full((1, 3), 10.0)).sum() * 4).backward()  # gradient (40, 40, 40): norm 69.28
    norm = Precision("auto", torch.device("cpu")).step(optimizer, model.parameters(), max_norm=2.0)
    assert float(norm) == pytest.approx(40 * 3 ** 0.5, rel=1e-5)
    assert torch.linalg.vector_norm(before - model.weight.detach()) == pytest.approx(2.0, rel=1e-5)  # the step: lr x 2
    model.zero_grad()
    (model(torch.full((1, 3), 10.0)).sum() * 4).backward()
    unclipped = model.weight.detach().clone()
    Precision("auto", torch.device("cpu")).step(optimizer, model.parameters())
    assert torch.linalg.vector_norm(unclipped - model.weight.detach()) == pytest.approx(40 * 3 ** 0.5, rel=1e-5)


def test_workers_reserve_their_share_of_a_gpu_and_share_one_over_gloo():
    from td_ray.distill import ddp_backend, worker_resources

    whole, half = _config(use_gpu=True, cpus_per_worker=4), _config(use_gpu=True, gpus_per_worker=0.5)
    assert worker_resources(whole) == {"CPU": 4, "GPU": 1} and ddp_backend(whole) == "nccl"
    assert worker_resources(half) == {"CPU": 1, "GPU": 0.5} and ddp_backend(half) == "gloo"
    assert worker_resources(_config()) == {"CPU": 1} and ddp_backend(_config()) == "gloo"
    with pytest.raises(ValueError, match="gpus_per_worker"):
        _config(use_gpu=True, gpus_per_worker=2)


def test_a_student_saved_in_bf16_trains_in_float32(assets_root, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    source = assets_root / "tiny-models" / "student"
    AutoModel.from_pretrained(source).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "bf16")
    for kind in ("dense", "colbert"):
        student = Student(_config(student_kind=kind, colbert_dim=16), str(tmp_path / "bf16"))
        assert {parameter.dtype for parameter in student.model.parameters()} == {torch.float32}, kind


def test_run_identity_resumes_on_unrelated_changes_and_restarts_on_new_data(pipeline_run, make_workspace):
    config, _ = pipeline_run
    workspace = Workspace(config.workspace)
    key = training_key(config.distill, workspace)
    for changed in (dict(mlflow={"alias": "staging"}), dict(index={"num_shards": 3}),
                    dict(distill={"max_failures": 3, "checkpoint_every": 7, "checkpoint_keep": 5, "log_every": 3}),
                    dict(score={"teacher": "another/teacher"})):
        assert training_key(with_updates(config, **changed).distill, workspace) == key, changed
    for changed in (dict(distill={"lr": 1e-4}), dict(distill={"nway": 3}), dict(distill={"seed": 1})):
        assert training_key(with_updates(config, **changed).distill, workspace) != key, changed
    # the same paths, other data: a new score table (another source at the same path) is a new run
    other = make_workspace()
    copy = Workspace(other.workspace)
    from td_ray.distill import training_tables

    for table in training_tables(config.distill):
        metadata = workspace.file_metadata(table)
        copy.write_table(workspace.read_table(table), table, metadata=metadata)
    assert training_key(other.distill, copy) == training_key(other.distill, Workspace(other.workspace))
    first = training_key(other.distill, copy)
    scores = workspace.read_table(SCORES)
    copy.write_table(scores, SCORES, metadata=workspace.file_metadata(SCORES) | {"td_ray_inputs": "rescored"})
    assert training_key(other.distill, copy) != first


def test_lineage_comes_from_the_tables_trained_on_not_from_the_config(pipeline_run):
    config, _ = pipeline_run
    workspace = Workspace(config.workspace)
    changed = with_updates(config, score={"teacher": "someone/else"},
                           translate={"targets": [{"lang": "syn", "pretranslated": {"format": "tsv", "path": "x"}},
                                                  {"lang": "qaa", "model": "another-mt-model"}]})
    tags = lineage(changed.distill, workspace, changed.fingerprint())
    assert tags["td_ray.teacher"] == config.score.teacher  # what scored the table, not what the config now says
    assert tags["td_ray.passage_lang"] == "syn" and tags["td_ray.mt_model"] == "syn=pretranslated:passages.syn.tsv"
    assert tags["td_ray.teacher_revision"] == "None" or tags["td_ray.teacher_revision"]
    assert json.loads(tags["td_ray.scores"])["teacher"] == config.score.teacher
    assert "passages.tsv" in tags["td_ray.passages"] and tags["td_ray.training_key"] == training_key(config.distill, workspace)


def test_tracking_failures_are_retried_at_the_next_flush_and_never_raised(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    store = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = store.create_run(store.create_experiment("steps")).info.run_id
    logger = StepLogger(None, run_id, client=MlflowClient("http://127.0.0.1:9"))  # nothing listens there
    for step in range(1, 4):
        logger.log(step, {"loss": 1.0 / step, "lr": 0.1})
    assert not logger.flush() and len(logger.buffer) == 6 and logger.failures == 1
    logger.client = store  # the server is back
    logger.log(4, {"loss": 0.25, "lr": 0.1})
    assert logger.flush() and not logger.buffer
    assert [metric.step for metric in store.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]


def _average(rank: int, world: int, address: str, out) -> None:
    torch.distributed.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
    out[rank] = mean_over_workers(float(rank + 1), torch.device("cpu"))
    metrics = StepMetrics()  # as the training loop logs: each rank's loss on its device, averaged at the interval
    for step in (1, 2):
        metrics.add(step, 0.1, torch.tensor(float(rank + step)), torch.tensor(float(rank)))
    out[f"steps of {rank}"] = [(step, values["loss"], values["grad_norm"]) for step, values in
                               metrics.collect(torch.device("cpu"))]
    torch.distributed.destroy_process_group()


def test_the_logged_loss_is_averaged_over_the_workers(tmp_path):
    context = torch.multiprocessing.get_context("spawn")
    out = context.Manager().dict()
    workers = [context.Process(target=_average, args=(rank, 3, f"file://{tmp_path}/store", out)) for rank in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert {rank: out[rank] for rank in range(3)} == {0: 2.0, 1: 2.0, 2: 2.0}
    for rank in range(3):  # the loss is the workers' mean at each step; the gradient norm stays the rank's own
        assert out[f"steps of {rank}"] == [(1, 2.0, float(rank)), (2, 3.0, float(rank))]
    assert mean_over_workers(5.0, torch.device("cpu")) == 5.0  # one process: the value itself


def test_each_epoch_is_shuffled_by_its_seed_and_a_resume_reads_the_same_batches(tmp_path):
    import itertools

    import pyarrow.parquet as pq

    rows = 40
    pq.write_table(pa.table({"qid": [f"q{i:02d}" for i in range(rows)]}), tmp_path / "examples.parquet",
                   row_group_size=6)
    shard = ExampleShard(Workspace(str(tmp_path)), "examples.parquet", rank=0, world=1)
    config = _config(batch_size=4, shuffle_buffer=16, seed=3)
    per_epoch = rows // config.batch_size

    def batches(start: int, count: int, config=config) -> list[list[str]]:
        return [batch["qid"] for batch in itertools.islice(micro_batches(shard, config, start), count)]

    run = batches(0, 3 * per_epoch)
    epochs = [sum(run[e * per_epoch:(e + 1) * per_epoch], []) for e in range(3)]
    assert all(sorted(epoch) == [f"q{i:02d}" for i in range(rows)] for epoch in epochs)  # each epoch: every row once
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != [f"q{i:02d}" for i in range(rows)]
    assert batches(13, 5) == run[13:18]  # resumed mid-epoch 1 at micro-batch 13: the same batches follow
    assert epoch_seed(3, 0) != epoch_seed(3, 1) and epoch_seed(3, 1) == epoch_seed(3, 1)
    plain = batches(0, per_epoch, _config(batch_size=4, shuffle_buffer=0))
    assert sum(plain, []) == sorted(epochs[0])  # no buffer: the table's order
    with pytest.raises(ValueError, match="holds no full batch of 64.*lower distill.batch_size"):
        next(micro_batches(shard, _config(batch_size=64), 0))


def test_workers_read_equal_disjoint_shares_of_the_examples_one_row_group_at_a_time(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"qid": [f"q{i:03d}" for i in range(103)]}), tmp_path / "examples.parquet",
                   row_group_size=10)
    workspace = Workspace(str(tmp_path))
    shards = [ExampleShard(workspace, "examples.parquet", rank, world=4) for rank in range(4)]
    assert {shard.rows for shard in shards} == {25}  # 103 // 4: the ranks step in lockstep; 3 rows left out
    assert all(rows <= 10 for shard in shards for _, _, rows in shard.pieces)  # never more than a row group
    read = [[qid for batch in shard.batches(5, 8, seed=1) for qid in batch["qid"]] for shard in shards]
    assert [sorted(share) for share in read] == [[f"q{i:03d}" for i in range(25 * r, 25 * (r + 1))] for r in range(4)]
    again = ExampleShard(workspace, "examples.parquet", 2, world=4)  # a restarted rank: the same share, same order
    assert [qid for batch in again.batches(5, 8, seed=1) for qid in batch["qid"]] == read[2]


@pytest.mark.parametrize("kind", ["dense", "colbert"])
def test_passages_encoded_in_length_buckets_score_as_one_padded_batch(assets_root, kind):
    path = str(assets_root / "tiny-models" / "student")
    texts = ["balto", "fobe kanu lete rima sote " * 4, "mirek dusa", "kanu " * 30, "lete fobe", "rima sote balto"]
    scores = {}
    for buckets in (1, 3):
        config = DistillConfig(student=path, passage_lang="syn", nway=3, student_kind=kind, colbert_dim=16,
                               query_maxlen=8, passage_maxlen=64, length_buckets=buckets)
        torch.manual_seed(0)
        student = Student(config, path)
        student.model.eval()
        query, passages = student.tokenize(["balto mirek", "fobe kanu"], texts)
        if buckets > 1:  # each bucket padded to its own longest: fewer positions than the batch's longest x 6
            assert len(passages["buckets"]) == 3
            assert sum(part["input_ids"].numel() for part in passages["buckets"]) < 0.7 * 6 * max(
                part["input_ids"].shape[1] for part in passages["buckets"])
        with torch.no_grad():
            scores[buckets] = student.model(query, passages)
    torch.testing.assert_close(scores[3], scores[1], atol=1e-5, rtol=1e-5)


def test_step_metrics_reach_the_host_once_per_logging_interval():
    metrics = StepMetrics()
    for step in range(1, 6):
        metrics.add(step, 0.1, torch.tensor(1.0 / step), torch.tensor(float(step)))
    assert metrics.host_syncs == 0  # five steps: nothing read back yet
    collected = metrics.collect(torch.device("cpu"))
    assert metrics.host_syncs == 1 and [step for step, _ in collected] == [1, 2, 3, 4, 5]
    assert collected[3][1] == pytest.approx({"loss": 0.25, "grad_norm": 4.0, "lr": 0.1})
    assert metrics.collect(torch.device("cpu")) == [] and metrics.host_syncs == 1


def test_the_prefetcher_hands_batches_over_in_order_and_raises_what_the_producer_raised():
    def produce(fail_at=None):
        for item in range(6):
            if item == fail_at:
                raise ValueError(f"no text for passage {item}")
            yield item

    ahead = Prefetcher(produce(), depth=2)
    assert list(ahead) == list(range(6))
    failing = Prefetcher(produce(fail_at=3))
    assert [next(failing) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="passage 3"):
        next(failing)
    stopped = Prefetcher(produce(), depth=1)
    assert next(stopped) == 0
    stopped.close()  # training ended early: the thread blocked on a full queue ends too
    assert not stopped.thread.is_alive()
