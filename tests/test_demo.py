"""The CLI demo end to end in a fresh process: outputs, MLflow runs, the registered model, and a safe re-run."""
from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from td_ray.distill.model import StudentEncoder

pytestmark = pytest.mark.slow

STAGES = ["translate", "score", "distill", "index", "evaluate"]


def _demo(workspace) -> subprocess.CompletedProcess:
    # The demo's default store is under its workspace: no tracking URI inherited from this test process.
    env = {name: value for name, value in os.environ.items() if name not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    return subprocess.run([sys.executable, "-m", "td_ray.cli", "demo", "--workspace", str(workspace)],
                          check=False, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def demo_twice(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("demo") / "ws"
    first = _demo(workspace)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _demo(workspace)
    assert second.returncode == 0, second.stderr[-3000:]
    return workspace, first, second


def test_summary_names_every_stage_its_metrics_and_outputs(demo_twice):
    workspace, first, _ = demo_twice
    lines = first.stdout.splitlines()
    for stage in STAGES:
        assert any(line.startswith(stage) for line in lines), first.stdout
    assert "nDCG@20=" in first.stdout and "R@100=" in first.stdout and "RR@10=" in first.stdout
    assert f"workspace: {workspace}" in first.stdout and "evaluate.run:" in first.stdout


def test_mlflow_holds_parent_and_five_children_per_run_and_the_registered_model(demo_twice, monkeypatch):
    workspace, _, _ = demo_twice
    uri = f"sqlite:///{workspace}/mlflow/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("td-ray")
    runs = client.search_runs([experiment.experiment_id])
    parents = sorted((run for run in runs if run.info.run_name == "pipeline"), key=lambda run: run.info.start_time)
    assert len(parents) == 2  # one per demo run
    for parent in parents:
        children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(run.info.run_name for run in children) == sorted(STAGES)
        assert all(run.info.status == "FINISHED" for run in children)
        evaluate = next(run for run in children if run.info.run_name == "evaluate")
        assert {"nDCG_20", "R_100", "RR_10"} <= set(evaluate.data.metrics)
        assert "run.trec" in [item.path for item in client.list_artifacts(evaluate.info.run_id)]
        distill = next(run for run in children if run.info.run_name == "distill")
        assert distill.data.params["distill.nway"] == "4"
    first_distill = client.search_runs([experiment.experiment_id], "tags.`td_ray.stage` = 'distill'",
                                       order_by=["attributes.start_time ASC"])[0]
    losses = client.get_metric_history(first_distill.info.run_id, "loss")
    assert sorted(metric.step for metric in losses) == list(range(1, 31))  # every step logged by rank 0

    versions = client.search_model_versions("name='td-ray-student'")
    assert len(versions) == 1  # the second run trained nothing new, so registered nothing new
    current = client.get_model_version_by_alias("td-ray-student", "candidate")
    assert int(current.version) == max(int(v.version) for v in versions)
    assert current.tags["td_ray.passage_lang"] == "syn" and "cross_encoder" in current.tags["td_ray.teacher"]

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # MLflow exports these; undo it after the test
        monkeypatch.setenv(name, uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/td-ray-student@candidate")
    texts = ["balto mirek", "a second query"]
    expected = StudentEncoder(str(workspace / "distill" / "student")).encode(texts)
    np.testing.assert_allclose(np.asarray(model.predict(texts)), expected, atol=1e-5)


def test_rerun_keeps_every_id_exactly_once_and_skips_unchanged_training(demo_twice):
    workspace, _, _ = demo_twice
    for table, key in (("translate/passages.qaa.parquet", "id"), ("score/scores.parquet", None),
                       ("index/docids.parquet", "docid")):
        data = pq.read_table(workspace / table)
        keys = list(zip(data["qid"].to_pylist(), data["pid"].to_pylist())) if key is None else data[key].to_pylist()
        assert len(keys) == len(set(keys))
    assert not list(workspace.rglob("*.tmp-*"))
    uri = f"sqlite:///{workspace}/mlflow/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("td-ray")
    distills = client.search_runs([experiment.experiment_id], "tags.`td_ray.stage` = 'distill'",
                                  order_by=["attributes.start_time ASC"])
    # the second run found the same settings and tables and reused the registered student instead of training
    assert distills[0].data.metrics["start_step"] == 0.0 and distills[0].data.metrics["steps"] == 30.0
    assert distills[1].data.metrics["unchanged"] == 1.0
    assert distills[1].data.metrics["model_version"] == distills[0].data.metrics["model_version"]
