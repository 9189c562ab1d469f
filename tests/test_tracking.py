"""MLflow store selection, what a stage used (CPU, start-up), and a stage tracked over HTTP by a real
`mlflow server`."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from conftest import with_updates

from td_ray import evaluate, tracking
from td_ray.tracking import metric_key
from td_ray.usage import StageUsage, mark_first_row


def test_store_is_the_workspace_sqlite_unless_env_or_config_say_otherwise(make_workspace, monkeypatch):
    config = make_workspace()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(config) == f"sqlite:///{config.workspace}/mlflow/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(config) == "http://127.0.0.1:5999"
    configured = with_updates(config, mlflow={"tracking_uri": "sqlite:////tmp/other.db"})
    assert tracking.tracking_uri(configured) == "sqlite:////tmp/other.db"


def _measure_a_child(out) -> None:
    """In a process of its own: no Ray node of the test session descends from it, so only the child's CPU counts."""
    usage = StageUsage().start()
    burn = "import time\nend = time.process_time() + 2.0\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)  # sampled while it runs, then exits and is reaped
    time.sleep(0.3)
    mark_first_row()
    mark_first_row()  # only the first counts
    usage.stop()
    mark_first_row()  # no stage running: nothing to note, no error
    out.put({"seen_alive": len(usage.cpu_last) > len(usage.cpu_at_start), "seconds": usage.seconds} | usage.metrics())


def test_usage_counts_an_exited_child_once_in_full_and_the_wait_for_the_first_row():
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    process = context.Process(target=_measure_a_child, args=(out,))
    process.start()
    metrics = out.get(timeout=120)
    process.join(timeout=60)
    assert metrics["seen_alive"]  # the child was seen alive, so it could be counted twice
    assert 2.0 <= metrics["cpu_seconds"] <= 2.0 + 0.6  # in full (not up to its last sample), and once
    assert 2.0 <= metrics["startup_seconds"] <= metrics["seconds"] and metrics["gpu_seconds"] == 0.0


def test_metric_names_drop_the_at_sign():
    assert [metric_key(name) for name in ("nDCG@20", "R@100", "RR@10", "AP")] == ["nDCG_20", "R_100", "RR_10", "AP"]


@pytest.fixture
def mlflow_server(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait for the port first: the client's own retries back off for many seconds
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    else:
        server.terminate()
        pytest.fail("mlflow server did not answer within 60 s")
    yield uri
    os.killpg(server.pid, signal.SIGKILL)  # a throwaway store: no graceful shutdown to wait for (it took 10 s)
    server.wait(timeout=30)


def test_a_stage_logs_to_an_http_tracking_server(pipeline_run, mlflow_server):
    config, results = pipeline_run
    remote = with_updates(config, mlflow={"tracking_uri": mlflow_server, "experiment": "td-ray-http"})
    before = os.environ.get("MLFLOW_TRACKING_URI")
    result = evaluate.run(remote)
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # the server's URI does not leak into later configs
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.data.tags["td_ray.stage"] == "evaluate"
    assert run.data.metrics["nDCG_20"] == pytest.approx(results["evaluate"].metrics["nDCG@20"], abs=1e-6)
    assert [item.path for item in client.list_artifacts(run.info.run_id) if item.path == "run.trec"] == ["run.trec"]


def test_runs_a_killed_job_left_running_are_ended_as_failed_by_the_next_run(make_workspace):
    """A job killed mid-stage leaves its parent and stage runs RUNNING; the next pipeline run in the same workspace
    ends them as FAILED and says so, and leaves another workspace's runs alone."""
    config = make_workspace()
    other = with_updates(config, workspace=str(Path(config.workspace) / "elsewhere"))
    experiment = tracking.configure(config)
    client = mlflow.MlflowClient()
    killed = [client.create_run(experiment, run_name=name, tags={"td_ray.workspace": config.workspace}).info.run_id
              for name in ("pipeline", "distill")]
    alive = client.create_run(experiment, run_name="index", tags={"td_ray.workspace": other.workspace}).info.run_id
    with tracking.pipeline_run(config) as run_id:
        assert client.get_run(run_id).info.status == "RUNNING"
    for run in killed:
        assert client.get_run(run).info.status == "FAILED"
        assert "ended by the next run" in client.get_run(run).data.tags["td_ray.ended"]
    assert client.get_run(alive).info.status == "RUNNING"
    assert client.get_run(run_id).info.status == "FINISHED"
    client.set_terminated(alive)


def test_the_runs_and_the_model_version_carry_params_inputs_evaluation_and_lineage(pipeline_run):
    """What MLflow users look for: the whole config as the parent run's params, each ingested table as a run
    input (name, digest, source), and a model version with its evaluation, a description, an input example and
    requirements an index can install."""
    import yaml

    config, results = pipeline_run
    tracking.configure(config)  # the registry too: models:/ URIs resolve there
    client = mlflow.MlflowClient()
    translate_run = client.get_run(results["translate"].run_id)
    parent = client.get_run(translate_run.data.tags["mlflow.parentRunId"])
    assert parent.data.params["distill.nway"] == str(config.distill.nway)
    assert parent.data.params["data.passages.path"] == config.data.passages.path
    assert parent.data.params["evaluate.measures"] == str(config.evaluate.measures)
    inputs = {item.dataset.name: item for item in translate_run.inputs.dataset_inputs}
    assert set(inputs) == {"passages", "train_queries", "pretranslated_passages.syn"}
    passages = inputs["passages"]
    assert Path(config.data.passages.path).as_uri() in passages.dataset.source and len(passages.dataset.digest) == 12
    assert [tag.value for tag in passages.tags if tag.key == "mlflow.data.context"] == ["docs"]
    evaluate_inputs = client.get_run(results["evaluate"].run_id).inputs.dataset_inputs
    assert {item.dataset.name for item in evaluate_inputs} == {"eval_topics", "eval_qrels"}

    name, number = config.mlflow.registered_model, str(int(results["distill"].metrics["model_version"]))
    version = client.get_model_version(name, number)
    assert version.description.startswith("A dense student distilled by td-ray (loss kl) from the teacher ")
    assert version.tags["td_ray.training_key"][:12] in version.description
    assert float(version.tags["td_ray.eval.nDCG_20"]) == pytest.approx(results["evaluate"].metrics["nDCG@20"])
    model = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{number}"))
    requirements = (model / "requirements.txt").read_text().split()
    assert not any("+" in line for line in requirements)
    from packaging.specifiers import SpecifierSet

    [torch_pin] = [line for line in requirements if line.startswith("torch")]
    assert SpecifierSet(torch_pin.removeprefix("torch")) == SpecifierSet(">=2.13.0,<3")
    assert "saved_input_example_info" in yaml.safe_load((model / "MLmodel").read_text())
