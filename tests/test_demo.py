"""The demo as a user submits it: the session's pipeline run (the demo's settings, run in this process) is followed
by the demo job, submitted with `ray job submit` to a real local head (`ray start --head`) over the same workspace,
through the CLI's `demo` command, after the index was deleted. Checks the outputs, the MLflow runs, the registered
model, and that the re-run rebuilds the lost index on the head into the same run, skips the other stages, rewrites
none of their outputs, keeps every id once and trains nothing new."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from processes import free_port, stop, submit, wait_for_job

from td_ray.encoders.dense import StudentEncoder
from td_ray.stage import record_path
from td_ray.workspace import SCORES, translated

pytestmark = pytest.mark.slow

STAGES = ["translate", "score", "distill", "index", "evaluate"]


def _clean_env() -> dict:
    """This process's environment without an inherited MLflow store: the demo's default is under its workspace."""
    return {name: value for name, value in os.environ.items() if name not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


def _start_head() -> tuple[subprocess.Popen, str, dict]:
    """A head node on 127.0.0.1 with free ports, token auth on (Ray's secure default: the head writes
    ~/.ray/auth_token and the CLI reads it). The test session's own in-process cluster is shut down first: two
    clusters on one 2-core machine starve each other, and later tests start a fresh one on demand."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    port, dashboard = free_port(), free_port()
    env = _clean_env() | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    temp_dir = tempfile.mkdtemp(prefix="tdray-head-", dir="/tmp")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         f"--dashboard-agent-listen-port={free_port()}",  # not the default 52365, which another cluster may hold
         "--disable-usage-stats", f"--temp-dir={temp_dir}", "--include-dashboard=true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", dashboard), timeout=1):
                return head, f"http://127.0.0.1:{dashboard}", env
        except OSError:
            time.sleep(1)
    stop(head)
    pytest.fail("the Ray head did not open its dashboard port within 90 s")


def _submit_demo_job(address: str, env: dict, workspace: Path) -> tuple[str, str]:
    """Submit `jobs/pipeline.py --demo` and wait for it; returns its final state and its logs."""
    submission = f"tdray-demo-{int(time.time())}"
    submit(address, env, submission, ["python", "jobs/pipeline.py", "--demo", "--workspace", str(workspace)])
    return wait_for_job(address, env, submission, seconds=480)


def _outputs(workspace: Path) -> list[Path]:
    """The outputs of the stages before index, which the job's re-run must leave untouched."""
    return [workspace / translated("passages", "syn"), workspace / translated("passages", "qaa"),
            workspace / SCORES, workspace / record_path("distill")]


@pytest.fixture(scope="module")
def demo_job(pipeline_run):
    """The demo job submitted to a Ray head over the session pipeline's workspace, its index deleted first (a lost
    output): the job rebuilds it with Ray tasks on the head and skips the other stages' work. Returns the
    workspace, the job's logs, and the earlier outputs' modification times and TREC run before the job."""
    config, _ = pipeline_run
    workspace = Path(config.workspace)
    written = {path: path.stat().st_mtime_ns for path in _outputs(workspace)}
    trec = (workspace / "evaluate" / "run.trec").read_text()
    shutil.rmtree(workspace / "index")
    head, address, env = _start_head()
    try:
        state, logs = _submit_demo_job(address, env, workspace)
    finally:
        stop(head)
    assert state == "succeeded", logs[-5000:]
    return workspace, logs, (written, trec)


def _parents(client, experiment: str) -> list:
    """The pipeline (parent) runs, oldest first."""
    runs = client.search_runs([experiment], "attributes.run_name = 'pipeline'")
    return sorted(runs, key=lambda run: run.info.start_time)


def _children(client, experiment: str, parent) -> dict:
    """A pipeline run's stage runs by stage name."""
    runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {run.info.run_name: run for run in runs}


def test_summary_names_every_stage_its_metrics_and_outputs(demo_job):
    workspace, logs, _ = demo_job  # the job's driver prints the CLI's summary
    lines = logs.splitlines()
    for stage in STAGES:
        assert any(line.startswith(stage) for line in lines), logs[-5000:]
    assert any(line.startswith("index (untrained)") for line in lines)
    header = next(line for line in lines if line.startswith("evaluation (16 topics)"))
    assert header.split()[-3:] == ["nDCG@20", "R@100", "RR@10"]
    for system in ("student, trained", "student, untrained", "BM25 of the topics"):
        assert any(line.strip().startswith(system) for line in lines), system
    assert f"workspace: {workspace}" in logs and "evaluate.run:" in logs
    assert f"report: {workspace}/report/report.html" in logs
    used = next(line for line in lines if line.startswith("all stages")).split()[2:5]  # the run's CPU-h, GPU-h, cost
    cpu_hours, gpu_hours, cost = (float(value) for value in used)
    assert cpu_hours > 0 and cost == pytest.approx(cpu_hours * 0.05 + gpu_hours * 3.0, abs=2e-4)


def test_mlflow_holds_parent_and_five_children_per_run_and_the_registered_model(demo_job, monkeypatch):
    workspace, _, _ = demo_job
    uri = f"sqlite:///{workspace}/mlflow/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("td-ray").experiment_id
    parents = _parents(client, experiment)
    assert len(parents) == 2  # the session's pipeline run, then the job
    for parent in parents:
        children = _children(client, experiment, parent)
        assert sorted(children) == sorted(STAGES + ["index (untrained)", "evaluate (untrained)"])
        assert all(run.info.status == "FINISHED" for run in children.values())
        assert {"nDCG_20", "R_100", "RR_10"} <= set(children["evaluate"].data.metrics)
        assert "run.trec" in [item.path for item in client.list_artifacts(children["evaluate"].info.run_id)]
        assert children["distill"].data.params["distill.nway"] == "10"
    losses = client.get_metric_history(_children(client, experiment, parents[0])["distill"].info.run_id, "loss")
    assert sorted(metric.step for metric in losses) == list(range(1, 101))  # every step logged by rank 0

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


def test_the_rerun_rebuilds_the_lost_index_into_the_same_run_and_skips_the_rest(demo_job):
    workspace, _, (written, trec) = demo_job
    assert {path: path.stat().st_mtime_ns for path in _outputs(workspace)} == written
    assert (workspace / "evaluate" / "run.trec").read_text() == trec  # the same student and documents: the same run
    for table, key in (("translate/passages.qaa.parquet", "id"), ("score/scores.parquet", None)):
        data = pq.read_table(workspace / table)
        keys = list(zip(data["qid"].to_pylist(), data["pid"].to_pylist())) if key is None else data[key].to_pylist()
        assert len(keys) == len(set(keys))
    meta = json.loads((workspace / "index" / "index_meta.json").read_text())
    builds = list((workspace / "index" / "builds").iterdir())
    assert [f"index/builds/{build.name}" for build in builds] == [meta["build"]]  # one build, reused
    assert not list(workspace.rglob("*.tmp-*")) and not list(workspace.rglob(".*.tmp"))  # tables; whole files
    uri = f"sqlite:///{workspace}/mlflow/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("td-ray").experiment_id
    first, job = (_children(client, experiment, parent) for parent in _parents(client, experiment))
    for stage in ("translate", "score", "distill"):
        assert job[stage].data.metrics["unchanged"] == 1.0, stage
    assert "unchanged" not in job["index"].data.metrics and job["index"].data.metrics["rows"] > 0
    # the job found the same settings and tables and reused the registered student instead of training
    assert first["distill"].data.metrics["start_step"] == 0.0 and first["distill"].data.metrics["steps"] == 100.0
    assert job["distill"].data.metrics["model_version"] == first["distill"].data.metrics["model_version"]
    measures = ("nDCG_20", "R_100", "RR_10")
    assert [job["evaluate"].data.metrics[name] for name in measures] == [first["evaluate"].data.metrics[name]
                                                                         for name in measures]


def test_the_trained_student_beats_the_untrained_one_by_a_clear_margin(pipeline_run):
    """The demo's point: the same index and evaluate code over the student before and after distill."""
    _, results = pipeline_run
    trained, untrained = results["evaluate"].metrics, results["evaluate (untrained)"].metrics
    assert trained["nDCG@20"] >= untrained["nDCG@20"] + 0.25 and trained["nDCG@20"] >= 2 * untrained["nDCG@20"]
    assert trained["R@100"] > untrained["R@100"] + 0.2
    assert trained["bm25_nDCG@20"] < 0.05  # English topics share no term with syn documents: the gap crossed


def test_the_demo_job_ran_on_the_head_it_was_submitted_to(demo_job):
    workspace, logs, _ = demo_job
    assert "joined Ray cluster" in logs  # it ran on the submitted-to cluster, not a cluster of its own
    meta = json.loads((workspace / "index" / "index_meta.json").read_text())
    assert all((workspace / meta["build"] / name).is_file() for name in meta["files"])
    assert (workspace / "evaluate" / "run.trec").read_text().count("\n") > 100
