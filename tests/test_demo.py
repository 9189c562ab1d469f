"""The demo end to end in fresh processes: the demo job submitted with `ray job submit` to a real local head
(`ray start --head`), then the CLI demo over the same workspace, as a re-run. Checks the outputs, the MLflow runs,
the registered model, and that the re-run keeps every id once and trains nothing new."""
from __future__ import annotations

import json
import os
import signal
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

from td_ray.encoders.dense import StudentEncoder

pytestmark = pytest.mark.slow

STAGES = ["translate", "score", "distill", "index", "evaluate"]
REPO = Path(__file__).resolve().parents[1]


def _clean_env() -> dict:
    """This process's environment without an inherited MLflow store: the demo's default is under its workspace."""
    return {name: value for name, value in os.environ.items() if name not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


def _demo(workspace) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "td_ray.cli", "demo", "--workspace", str(workspace)],
                          check=False, capture_output=True, text=True, timeout=600, env=_clean_env())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_head() -> tuple[subprocess.Popen, str, dict]:
    """A head node on 127.0.0.1 with free ports, token auth on (Ray's secure default: the head writes
    ~/.ray/auth_token and the CLI reads it). The test session's own in-process cluster is shut down first: two
    clusters on one 2-core machine starve each other, and later tests start a fresh one on demand."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    port, dashboard = _free_port(), _free_port()
    env = _clean_env() | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    temp_dir = tempfile.mkdtemp(prefix="tdray-head-", dir="/tmp")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         f"--dashboard-agent-listen-port={_free_port()}",  # not the default 52365, which another cluster may hold
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
    _stop_head(head)
    pytest.fail("the Ray head did not open its dashboard port within 90 s")


def _stop_head(head: subprocess.Popen) -> None:
    os.killpg(head.pid, signal.SIGINT)  # `ray start --block` stops the node's processes on SIGINT
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def _ray_job(env: dict, *args: str) -> subprocess.CompletedProcess:
    """The `ray job` CLI, in a process that reads RAY_AUTH_MODE from `env` at start (as a user's shell would)."""
    return subprocess.run([str(Path(sys.executable).parent / "ray"), "job", *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO, check=False)


def _submit_demo_job(address: str, env: dict, workspace: Path) -> tuple[str, str]:
    """Submit `jobs/pipeline.py --demo` and wait for it; returns its final state and its logs."""
    submission = f"tdray-demo-{int(time.time())}"
    deadline = time.time() + 120
    while True:  # the head's job agent starts a little after its dashboard port opens
        submitted = _ray_job(env, "submit", "--address", address, "--working-dir", str(REPO), "--submission-id",
                             submission, "--no-wait", "--", "python", "jobs/pipeline.py", "--demo", "--workspace",
                             str(workspace))
        if "No available agent" not in submitted.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    deadline = time.time() + 480
    while True:
        checked = _ray_job(env, "status", "--address", address, submission)
        status = checked.stdout + checked.stderr  # the CLI logs the status line to stderr
        final = [word for word in ("succeeded", "failed", "stopped") if f"job '{submission}' {word}" in status.lower()]
        if final:
            break
        assert time.time() < deadline, _ray_job(env, "logs", "--address", address, submission).stdout[-3000:]
        time.sleep(3)
    return final[0], _ray_job(env, "logs", "--address", address, submission).stdout


@pytest.fixture(scope="module")
def demo_twice(tmp_path_factory):
    """The demo job submitted to a Ray head on a fresh workspace, then the CLI demo over the same workspace (a
    re-run). Returns the workspace, the job's final state and logs, and the CLI run."""
    workspace = tmp_path_factory.mktemp("demo") / "ws"
    head, address, env = _start_head()
    try:
        state, logs = _submit_demo_job(address, env, workspace)
    finally:
        _stop_head(head)
    assert state == "succeeded", logs[-5000:]
    second = _demo(workspace)
    assert second.returncode == 0, second.stderr[-3000:]
    return workspace, logs, second


def test_summary_names_every_stage_its_metrics_and_outputs(demo_twice):
    workspace, logs, _ = demo_twice  # the job's driver prints the CLI's summary
    lines = logs.splitlines()
    for stage in STAGES:
        assert any(line.startswith(stage) for line in lines), logs[-5000:]
    assert "nDCG@20=" in logs and "R@100=" in logs and "RR@10=" in logs
    assert f"workspace: {workspace}" in logs and "evaluate.run:" in logs


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
    for table, key in (("translate/passages.qaa.parquet", "id"), ("score/scores.parquet", None)):
        data = pq.read_table(workspace / table)
        keys = list(zip(data["qid"].to_pylist(), data["pid"].to_pylist())) if key is None else data[key].to_pylist()
        assert len(keys) == len(set(keys))
    meta = json.loads((workspace / "index" / "index_meta.json").read_text())
    builds = list((workspace / "index" / "builds").iterdir())
    assert [f"index/builds/{build.name}" for build in builds] == [meta["build"]]  # one build, reused
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


def test_the_demo_job_ran_on_the_head_it_was_submitted_to_and_the_cli_rerun_reports_every_stage(demo_twice):
    workspace, logs, second = demo_twice
    assert "joined Ray cluster" in logs  # it ran on the submitted-to cluster, not a cluster of its own
    for stage in STAGES:
        assert any(line.startswith(stage) for line in second.stdout.splitlines()), second.stdout
    meta = json.loads((workspace / "index" / "index_meta.json").read_text())
    assert all((workspace / meta["build"] / name).is_file() for name in meta["files"])
    assert (workspace / "evaluate" / "run.trec").read_text().count("\n") > 100
